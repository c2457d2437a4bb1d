"""One rule for what a volume or measurement may be (`lfmri_utils.volumes.check_volume`), at every entry:
`lfmri degrade`, `lfmri reconstruct` (NIfTI and `--kspace`), `lfmri metrics` and the data module. Slices
under 7x7 (SSIM's window), an all-zero volume and a magnitude with negative voxels are refused in one line
naming the file (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules import LowFieldDataModule
from datamodules.measured import read_kspace
from lfmri.cli import main
from lfmri_utils.errors import InputError
from lfmri_utils.metrics import ssim_map
from lfmri_utils.volumes import MIN_SLICE_SIZE, check_volume

FAST = ["--sampling.steps", "2", "--device", "cpu", "--sampling.sampler", "warm_ddim"]


def _blob(shape: tuple[int, int, int] = (16, 16, 3)) -> np.ndarray:
    """A positive square of 100 in the middle of each slice, zero around it."""
    data = np.zeros(shape, np.float32)
    data[shape[0] // 4: 3 * shape[0] // 4, shape[1] // 4: 3 * shape[1] // 4] = 100.0
    return data


def _negative() -> np.ndarray:
    data = _blob()
    data[0, 0, :] = -5.0  # three negative voxels, e.g. a resampling kernel's undershoot
    return data


#: name -> (volume, extra arguments, what the one-line message must say)
BAD = {
    "1x1x1": (np.ones((1, 1, 1), np.float32), [], "are 1x1"),
    "2x2x2": (np.ones((2, 2, 2), np.float32), [], "are 2x2"),
    "thin along the slice axis": (_blob((16, 16, 3)), ["--slice-axis", "0"], "are 16x3"),
    "negative": (_negative(), [], "3 voxel(s) are negative (minimum -5)"),
}


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _refused(argv: list[str], capsys: pytest.CaptureFixture, named: Path | str, problem: str,
             outdir: Path) -> None:
    """The command exits 2 with one stderr line `lfmri CMD: error: NAMED: ...PROBLEM...`, writes nothing."""
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lfmri {argv[0]}: error: {named}: ") and problem in lines[0], lines[0]
    assert list(outdir.iterdir()) == []  # no output, no sidecar, no temporary file


# ---------------------------------------------------------------------------------------------- the rule
def test_the_minimum_slice_is_one_ssim_window() -> None:
    ok = np.random.default_rng(0).random((2, MIN_SLICE_SIZE, MIN_SLICE_SIZE))
    assert ssim_map(ok, ok).shape == (2, 1, 1)
    check_volume(ok, "ok.nii", 0, kind="magnitude")
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim_map(ok[:, 1:], ok[:, 1:])
    with pytest.raises(InputError, match=r"^small.nii: the slices along axis 0 .* are 6x7 "):
        check_volume(ok[:, 1:], "small.nii", 0, kind="magnitude")


def test_negative_magnitudes_within_round_off_are_accepted_beyond_it_refused() -> None:
    data = _blob() * 10  # peak 1000
    data[0, 0, 0] = -1e-4  # 1e-7 of the peak: interpolation round-off
    check_volume(data, "t.nii", 2, kind="magnitude")
    data[0, 1, 0] = -0.01  # 1e-5 of the peak: real undershoot
    with pytest.raises(InputError, match=r"^t.nii: 1 voxel\(s\) are negative \(minimum -0.01\)"):
        check_volume(data, "t.nii", 2, kind="magnitude")


def test_kspace_has_no_sign_rule_but_the_size_and_not_empty_rules() -> None:
    kspace = (np.ones((2, 8, 8)) * (-1 - 1j)).astype(np.complex64)
    check_volume(kspace, "k.h5", 0, kind="kspace")
    with pytest.raises(InputError, match="every k-space sample is zero"):
        check_volume(np.zeros_like(kspace), "k.h5", 0, kind="kspace")
    with pytest.raises(InputError, match="are 8x6"):
        check_volume(kspace[..., :6], "k.h5", 0, kind="kspace")


# ---------------------------------------------------------------------------------------------- degrade
@pytest.mark.parametrize("case", sorted(BAD))
def test_degrade_refuses(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                         case: str) -> None:
    data, extra, problem = BAD[case]
    src, outdir = _write(tmp_path / "in.nii.gz", data), tmp_path / "out"
    outdir.mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("degraded before the input was checked")

    monkeypatch.setattr("lfmri.commands.degrade.degrade_volume", no_work)
    _refused(["degrade", str(src), str(outdir / "d.nii.gz"), "--regime", "noise", *extra,
              "--kspace-out", str(outdir / "k.h5")], capsys, src, problem, outdir)


def test_degrade_takes_7x7_slices(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _write(tmp_path / "in.nii.gz", _blob((7, 7, 3)) + 1.0)
    out = tmp_path / "d.nii.gz"
    assert main(["degrade", str(src), str(out), "--regime", "noise_blur_t2star_b0"]) == 0, capsys.readouterr()
    assert nib.load(str(out)).shape == (7, 7, 3)


# ---------------------------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("case", sorted(BAD))
def test_reconstruct_refuses_the_nifti(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_checkpoint: Path,
                                       case: str) -> None:
    data, extra, problem = BAD[case]
    src, outdir = _write(tmp_path / "in.nii.gz", data), tmp_path / "out"
    outdir.mkdir()
    _refused(["reconstruct", str(src), str(outdir / "r.nii.gz"), "--ckpt", str(tiny_checkpoint),
              "--regime", "noise", *FAST, *extra], capsys, src, problem, outdir)


def test_reconstruct_refuses_kspace_with_slices_under_7x7(tmp_path: Path) -> None:
    path = tmp_path / "k.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=np.ones((2, 5, 5), np.complex64))
    with pytest.raises(InputError, match=rf"^--kspace {path}: the slices along axis 0 .* are 5x5 "):
        read_kspace(path, (2, 5, 5), "noise")


OUT_OF_RANGE = [("fwhm_px", -3.0, "fwhm_px of slice 1 is -3; it must be >= 0"),
                ("readout_ms", 0.0, "readout_ms of slice 1 is 0; it must be > 0"),
                ("te_ms", float("nan"), "te_ms of slice 1 is nan"),
                ("t2star_gre", 0.5, "t2star_gre of slice 1 is 0.5; it must be 0")]


@pytest.mark.parametrize("key,value,problem", OUT_OF_RANGE)
def test_reconstruct_refuses_recorded_parameters_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              tiny_checkpoint: Path, key: str, value: float,
                                                              problem: str) -> None:
    """A params JSON whose operator parameter is outside its physical range (a negative blur, a zero
    readout, NaN, a gradient-echo flag of 0.5) is refused in one line naming the file, the key and the
    slice."""
    src = _write(tmp_path / "in.nii.gz", _blob() + 1.0)
    low = tmp_path / "low.nii.gz"
    assert main(["degrade", str(src), str(low), "--regime", "noise_blur_t2star", "--seed", "0"]) == 0
    sidecar = Path(f"{low}.json")
    record = json.loads(sidecar.read_text())
    record["slices"][1][key] = value
    sidecar.write_text(json.dumps(record))
    outdir = tmp_path / "out"
    outdir.mkdir()
    capsys.readouterr()
    _refused(["reconstruct", str(low), str(outdir / "r.nii.gz"), "--ckpt", str(tiny_checkpoint),
              "--regime", "noise_blur_t2star", *FAST], capsys, f"--params {sidecar}", problem, outdir)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_refuses_negative_or_empty_references(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs, outdir = tmp_path / "in", tmp_path / "out"  # metrics writes nothing: out stays empty
    inputs.mkdir()
    outdir.mkdir()
    good, bad = _write(inputs / "ref.nii.gz", _blob()), _write(inputs / "neg.nii.gz", _negative())
    for ref, pred in ((bad, good), (good, bad)):
        _refused(["metrics", str(ref), str(pred)], capsys, bad, "3 voxel(s) are negative", outdir)
    empty = _write(inputs / "zero.nii.gz", np.zeros((16, 16, 3), np.float32))
    _refused(["metrics", str(empty), str(good)], capsys, empty, "every voxel is zero", outdir)
    assert main(["metrics", str(good), str(empty)]) == 0  # an empty reconstruction is scored (NMSE 1)
    assert '"nmse": 1.0' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- data module
@pytest.mark.parametrize("case", ["2x2x2", "negative"])
def test_the_data_module_names_the_bad_volume(tmp_path: Path, case: str) -> None:
    data, _, problem = BAD[case]
    root = tmp_path / "data"
    root.mkdir()
    _write(root / "a.nii.gz", _blob())
    bad = _write(root / "b.nii.gz", data)
    (root / "split.yaml").write_text("train: [a, b]\nval: []\ntest: []\n")
    dm = LowFieldDataModule(source=str(root), split_file=str(root / "split.yaml"), loader={"batch_size": 1})
    with pytest.raises(InputError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert message.startswith(f"{bad}: ") and problem in message and "\n" not in message
    predict = LowFieldDataModule(source="bundled", predict={"path": str(bad)})
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        predict.setup("predict")


def test_a_complex_image_volume_has_no_sign_rule() -> None:
    image = torch.polar(torch.ones(2, 8, 8), torch.full((2, 8, 8), 3.0)).numpy()  # real part negative
    check_volume(image, "fastmri.h5", 0, kind="image")
    with pytest.raises(InputError, match="negative"):
        check_volume(image.real.copy(), "fastmri.h5", 0, kind="magnitude")
