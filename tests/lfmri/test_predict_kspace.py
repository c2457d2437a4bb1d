"""`lfmri predict` takes a k-space HDF5 file (fastMRI's layout) as `predict.path`, as `lfmri reconstruct K.h5`
takes it: both read it through `datamodules.measured.load_measured_volume` (mask, ESPIRiT maps for several
coils, the noise std given, recorded or estimated) and write the same NIfTI (array, affine, slice axis) for
the same checkpoint, sampler and seed; `predict.kspace` / `predict.params` are refused with such a path, and a
broken file is named by the reader's one-line message."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI, TINY_16_MODEL, predict_config

import datamodules.measured as measured
from datamodules.dataset import PredictOptions
from lfmri.cli import main
from lfmri_utils.errors import InputError

STEPS = 3
#: fastMRI's file layout of the synthetic files: [S, C, H_f, W_f], readout along H_f, phase encoding along W_f
SLICES, COILS, H_F, W_F = 2, 4, 24, 20

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER = f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>
<encodedSpace><matrixSize><x>{H_F}</x><y>{W_F}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>{2 * H_F}</x><y>{1.5 * W_F}</y><z>3</z></fieldOfView_mm></encodedSpace>
</encoding></ismrmrdHeader>""".encode()


def _fastmri_file(path: Path, coils: int, mask: np.ndarray | None, sigma: float = 0.02) -> Path:
    """A fastMRI-layout file written by hand with h5py: an MNI-derived image (24 x 20, 2 slices) times smooth
    coil sensitivities (none for one coil), its centred orthonormal k-space plus complex noise of std `sigma`,
    zeros where the 1D `mask` [W_f] does not sample (bool, as fastMRI ships it), an ISMRMRD header."""
    data = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)
    image = np.stack([data[30:150:5, 40:140:5, z] for z in (80, 95)]).astype(np.complex64)  # [S, H_f, W_f]
    image /= np.abs(image).max()
    hh, ww = np.meshgrid(np.linspace(-1, 1, H_F), np.linspace(-1, 1, W_F), indexing="ij")
    centres = [(-1, -1), (-1, 1), (1, 1), (1, -1)][:coils]
    maps = np.stack([np.exp(-((hh - a) ** 2 + (ww - b) ** 2) / 2) * np.exp(1j * (a * hh + b * ww))
                     for a, b in centres]).astype(np.complex64)  # [C, H_f, W_f]
    coil_images = image[:, None] * maps[None] if coils > 1 else image[:, None]
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1))
    rng = np.random.default_rng(7)
    kspace = kspace + sigma * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
    kspace = kspace.astype(np.complex64)
    if mask is not None:
        kspace = kspace * mask
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace if coils > 1 else kspace[:, 0])
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(bool))
        f.create_dataset("ismrmrd_header", data=np.bytes_(HEADER))
        f.attrs.update({"acquisition": "AXT1", "patient_id": "synthetic"})
    return path


def _equispaced_mask(acceleration: int = 2, centre: int = 8) -> np.ndarray:
    """fastMRI's equispaced 1D mask over W_f: every `acceleration`-th line plus a fully sampled centre."""
    mask = np.zeros(W_F, bool)
    mask[::acceleration] = True
    mask[W_F // 2 - centre // 2: W_F // 2 + centre // 2] = True
    return mask


class LoadSpy:
    """Records the paths `load_measured_volume` reads (the one loader of both commands)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads: list[Path] = []
        load = measured.load_measured_volume

        def spy(path: str | Path, *args: object, **kwargs: object) -> measured.MeasuredVolume:
            self.loads.append(Path(path))
            return load(path, *args, **kwargs)

        monkeypatch.setattr(measured, "load_measured_volume", spy)


def _reconstruct(ckpt: Path, kspace: Path, out: Path, *extra: str) -> np.ndarray:
    assert main(["reconstruct", str(kspace), str(out), "--ckpt", str(ckpt), "--sampling.steps", str(STEPS),
                 "--device", "cpu", "--seed", "0", "--batch-size", "2", *extra]) == 0
    return out


def _predict(ckpt: Path, kspace: Path, folder: Path, predict: dict | None = None) -> Path:
    config = predict_config(folder, kspace, TINY_16_MODEL, {"loader": {"eval_batch_size": 2},
                                                           "predict": predict or {}})
    assert main(["predict", "--config", str(config), "--ckpt_path", str(ckpt),
                 f"--sampling.steps={STEPS}"]) == 0
    return folder / "pred" / f"{kspace.name.removesuffix('.h5')}_recon.nii.gz"


def _assert_same_output(predicted: Path, reconstructed: Path) -> np.ndarray:
    """Same shape, affine and array (bit for bit); returns the array."""
    a_img, b_img = nib.load(str(predicted)), nib.load(str(reconstructed))
    assert a_img.shape == b_img.shape
    np.testing.assert_array_equal(a_img.affine, b_img.affine)
    a, b = np.asarray(a_img.dataobj), np.asarray(b_img.dataobj)
    assert np.abs(b).max() > 0 and np.all(np.isfinite(b))
    assert np.array_equal(a, b)  # one path: the same volume, measurement and sampler
    return b


@pytest.mark.parametrize(("coils", "undersampled", "predict"), [
    (COILS, True, {}),                                      # multi-coil, undersampled: mask + ESPIRiT maps
    (1, False, {}),                                         # single-coil, fully sampled
    (COILS, True, {"noise_sigma": 0.03, "regime": "noise_blur"}),  # given std, a regime's operator
])
def test_predict_of_a_fastmri_file_is_reconstructs_output(
        tiny16_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coils: int,
        undersampled: bool, predict: dict) -> None:
    kspace = _fastmri_file(tmp_path / "scan.h5", coils, _equispaced_mask() if undersampled else None)
    spy = LoadSpy(monkeypatch)
    extra = [arg for key, flag in (("noise_sigma", "--noise-sigma"), ("regime", "--regime")) if key in predict
             for arg in (flag, str(predict[key]))]
    rec = _reconstruct(tiny16_checkpoint, kspace, tmp_path / "rec.nii.gz", *extra)
    assert spy.loads == [kspace]
    pred = _predict(tiny16_checkpoint, kspace, tmp_path / "predict", predict)
    assert spy.loads == [kspace, kspace]  # the same loader, once per command
    out = _assert_same_output(pred, rec)
    assert out.shape == (H_F, W_F, SLICES)  # the file's own in-plane order, slices along axis 2
    np.testing.assert_allclose(np.diag(nib.load(str(pred)).affine)[:3], (2.0, 1.5, 3.0))  # header's voxels


def test_predict_of_an_lfmri_degrade_file_is_reconstructs_output(tiny16_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    """`lfmri degrade --coils 4 --acceleration 4 --slice-axis 0 --kspace-out` (2 slices of 40 x 47, 8 of 40
    centre lines) then both commands: the same array, slices back along the recorded axis 0 (reconstruct's
    default; predict's slices.slice_axis, 2, applies only to a file that records none), the NIfTI's affine."""
    img = nib.load(str(MNI))
    clean = np.asarray(img.dataobj, dtype=np.float32)[::5, ::5, 80:110:20]  # 40 x 47 x 2
    clean = np.ascontiguousarray(np.moveaxis(clean, 2, 0))  # 2 x 40 x 47: slices along axis 0
    src, deg, kspace = tmp_path / "clean.nii.gz", tmp_path / "deg.nii.gz", tmp_path / "deg_k.h5"
    nib.save(nib.Nifti1Image(clean, img.affine), src)
    assert main(["degrade", str(src), str(deg), "--regime", "noise", "--coils", "4", "--acceleration", "4",
                 "--center-fraction", "0.2", "--slice-axis", "0", "--seed", "1", "--kspace-out",
                 str(kspace)]) == 0
    rec = _reconstruct(tiny16_checkpoint, kspace, tmp_path / "rec.nii.gz")
    pred = _predict(tiny16_checkpoint, kspace, tmp_path / "predict")
    assert pred.name == "deg_k_recon.nii.gz"
    assert _assert_same_output(pred, rec).shape == clean.shape
    np.testing.assert_allclose(nib.load(str(pred)).affine, img.affine)


def test_predict_kspace_file_refuses_nifti_only_options(tmp_path: Path) -> None:
    """`predict.kspace` / `predict.params` belong to a NIfTI: with a k-space file path they are refused in one
    line naming the option."""
    for name in ("kspace", "params"):
        with pytest.raises(InputError) as err:
            PredictOptions(path=str(tmp_path / "scan.h5"), **{name: str(tmp_path / "other")})
        message = str(err.value)
        assert message.startswith(f"predict.{name}: not with a k-space file predict.path")
        assert "\n" not in message


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The error line (the last on stderr) of an `lfmri predict` refused with exit code 2."""
    capsys.readouterr()
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lfmri predict: error: "), last
    return last


def test_predict_refusals_through_the_cli(tiny16_checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """From the command line: predict.kspace with a k-space file path is named; a corrupt .h5 is named by
    the reader (not a readable HDF5 file); slices.image_size is refused (no resampling of coils / masks)."""
    kspace = _fastmri_file(tmp_path / "scan.h5", COILS, _equispaced_mask())
    config = predict_config(tmp_path / "a", kspace, TINY_16_MODEL)
    base = ["predict", "--config", str(config), "--ckpt_path", str(tiny16_checkpoint)]
    err = _refused([*base, f"--data.init_args.predict.kspace={kspace}"], capsys)
    assert "predict.kspace: not with a k-space file predict.path" in err, err

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an HDF5 file at all")
    config = predict_config(tmp_path / "b", corrupt, TINY_16_MODEL)
    err = _refused(["predict", "--config", str(config), "--ckpt_path", str(tiny16_checkpoint)], capsys)
    assert f"predict.path {corrupt}: not a readable HDF5 file" in err, err
    assert not (tmp_path / "b" / "pred").exists() or not any((tmp_path / "b" / "pred").iterdir())

    err = _refused([*base, "--data.init_args.slices.image_size=16"], capsys)
    assert "slices.image_size: a k-space file predict.path" in err, err


def test_served_items_carry_the_measurement(tmp_path: Path) -> None:
    """The predict dataset of a multi-coil undersampled file serves y [C, H, W] (the file's k-space, lfmri's
    layout: phase encoding along H), its mask [1, H, W] and ESPIRiT sensitivities [C, H, W]; no noise std
    (estimated in predict_step, as reconstruct estimates it)."""
    from datamodules.dataset import PredictSliceDataset

    kspace = _fastmri_file(tmp_path / "scan.h5", COILS, _equispaced_mask())
    dataset = PredictSliceDataset.from_kspace_file(kspace, predict=PredictOptions(path=str(kspace)))
    assert len(dataset) == SLICES and dataset.item_shapes() == [(W_F, H_F)] * SLICES
    item = dataset[1]
    assert item.y.shape == (COILS, W_F, H_F) and item.y.dtype == torch.complex64
    assert item.degraded.shape == (2, W_F, H_F)
    assert item.params["mask"].shape == (1, W_F, H_F)
    np.testing.assert_array_equal(item.params["mask"][0, :, 0].numpy(), _equispaced_mask().astype(np.float32))
    assert item.params["sensitivities"].shape == (COILS, W_F, H_F) and "noise_sigma" not in item.params
    volume = dataset.measured_volume(0)
    torch.testing.assert_close(item.y, volume.kspace[1])
