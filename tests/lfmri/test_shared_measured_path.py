"""`lfmri reconstruct` and `lfmri predict` share their whole path below the argument parsing: both prepare the
input through `datamodules.measured.load_measured_volume` (slices, normalisation, the operator's parameters
from `lfmri degrade`'s JSON beside the NIfTI, the explicit resize) and assemble the output through
`datamodules.measured.volume_from_slices`, so the same volume, checkpoint, sampler and seed give the same
array, at the native matrix and resized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from helpers import MNI, TINY_16_MODEL, predict_config

import datamodules.measured as measured
from lfmri.cli import main

TINY = TINY_16_MODEL
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny16_checkpoint: Path) -> dict[str, Path]:
    """The tiny 16 px checkpoint and a real MNI-derived volume of 38 x 45 x 3 voxels."""
    d = tmp_path_factory.mktemp("shared_path")
    img = nib.load(str(MNI))
    vol = np.asarray(img.dataobj, dtype=np.float32)[10:162:4, 20:200:4, 70:110:15]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), img.affine), d / "clean.nii.gz")
    return {"dir": d, "ckpt": tiny16_checkpoint, "clean": d / "clean.nii.gz"}


class SharedSpy:
    """Records the calls of the shared input preparation and output assembly."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads: list[Path] = []
        self.outputs = 0
        load, assemble = measured.load_measured_volume, measured.volume_from_slices

        def load_spy(path: Any, *args: Any, **kwargs: Any) -> measured.MeasuredVolume:
            self.loads.append(Path(path))
            return load(path, *args, **kwargs)

        def assemble_spy(*args: Any, **kwargs: Any) -> np.ndarray:
            self.outputs += 1
            return assemble(*args, **kwargs)

        monkeypatch.setattr(measured, "load_measured_volume", load_spy)
        monkeypatch.setattr(measured, "volume_from_slices", assemble_spy)


@pytest.mark.parametrize(("regime", "resize"), [("noise", False), ("noise_blur_t2star", False),
                                                 ("noise", True)])
def test_reconstruct_and_predict_call_the_same_functions_and_give_the_same_array(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, regime: str,
        resize: bool) -> None:
    deg = tmp_path / "deg.nii.gz"  # with lfmri degrade's parameters JSON beside it (read by both commands)
    assert main(["degrade", str(files["clean"]), str(deg), "--regime", regime, "--seed", "1"]) == 0
    spy = SharedSpy(monkeypatch)
    rec = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", str(deg), str(rec), "--ckpt", str(files["ckpt"]), "--regime", regime,
                 "--sampling.steps", str(STEPS), "--device", "cpu", "--seed", "0", "--batch-size", "2",
                 *(["--resize"] if resize else [])]) == 0
    assert spy.loads == [deg] and spy.outputs == 1

    config = predict_config(tmp_path, deg, TINY, {"loader": {"eval_batch_size": 2},
                                                  "slices": {"image_size": 16 if resize else None}})
    assert main(["predict", "--config", str(config), "--ckpt_path", str(files["ckpt"]),
                 f"--sampling.steps={STEPS}"]) == 0
    assert spy.loads == [deg, deg] and spy.outputs == 2
    predicted, reconstructed = nib.load(str(tmp_path / "pred" / "deg_recon.nii.gz")), nib.load(str(rec))
    assert predicted.shape == reconstructed.shape == nib.load(str(deg)).shape
    np.testing.assert_array_equal(predicted.affine, reconstructed.affine)
    a, b = np.asarray(predicted.dataobj), np.asarray(reconstructed.dataobj)
    assert np.abs(b).max() > 0
    assert np.array_equal(a, b)  # bit for bit: one path


@pytest.mark.parametrize("regime", ["noise", "noise_blur_t2star", "noise_blur_t2star_b0"])
def test_predict_takes_reconstructs_kspace_params_and_noise_sigma(
        files: dict[str, Path], tmp_path: Path, regime: str) -> None:
    """`lfmri predict` with the data module's `predict` group (a k-space file, a parameters JSON that is not
    beside the NIfTI, a given noise std, the regime) writes the array `lfmri reconstruct --kspace --params
    --noise-sigma --regime` writes, bit for bit; without the k-space file and the given std (what predict read
    before) the output differs, so each option is read."""
    deg, kspace = tmp_path / "deg.nii.gz", tmp_path / "deg_k.h5"
    assert main(["degrade", str(files["clean"]), str(deg), "--regime", regime, "--seed", "2", "--snr-db", "4",
                 "--kspace-out", str(kspace)]) == 0
    params = tmp_path / "elsewhere.json"  # not beside the NIfTI: read only when given
    (tmp_path / "deg.nii.gz.json").rename(params)
    sigma = "0.5"
    rec = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", str(deg), str(rec), "--ckpt", str(files["ckpt"]), "--regime", regime,
                 "--kspace", str(kspace), "--params", str(params), "--noise-sigma", sigma,
                 "--sampling.steps", str(STEPS), "--device", "cpu", "--seed", "0", "--batch-size", "2"]) == 0
    reconstructed = np.asarray(nib.load(str(rec)).dataobj)
    assert np.abs(reconstructed).max() > 0

    given = {"kspace": str(kspace), "params": str(params), "noise_sigma": float(sigma), "regime": regime}
    outputs = {}
    for name, options in (("all", given), ("nifti_only", {"regime": regime})):
        config = predict_config(tmp_path / name, deg, TINY, {"loader": {"eval_batch_size": 2},
                                                             "predict": options})
        assert main(["predict", "--config", str(config), "--ckpt_path", str(files["ckpt"]),
                     f"--sampling.steps={STEPS}"]) == 0
        outputs[name] = np.asarray(nib.load(str(tmp_path / name / "pred" / "deg_recon.nii.gz")).dataobj)
    assert np.array_equal(outputs["all"], reconstructed)  # bit for bit: one path, the same inputs
    assert not np.allclose(outputs["nifti_only"], reconstructed, atol=1e-3 * np.abs(reconstructed).max())
