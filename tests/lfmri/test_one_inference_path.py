"""One inference path: `lfmri reconstruct`, `lfmri predict`, `lfmri evaluate` and the validation callback give
the same reconstruction for the same slice, seed and settings, at the slices' native (non-square, not a
multiple of the U-Net's) matrix, from a model trained on smaller crops; `lfmri predict` writes NIfTI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import MNI, TINY_16_MODEL

import diffusion.inference as inference
from diffusion.sampling.samplers import SamplerOptions
from lfmri.cli import main
from lightning_modules.callbacks import SamplerCallback
from lightning_modules.module import ScoreModel

TINY = TINY_16_MODEL
STEPS = 3
REGIME = "noise_blur_t2star_b0"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny16_checkpoint: Path) -> dict[str, Path]:
    """The tiny model trained on 16 x 16 and three real MNI-derived subjects of 38 x 45 x 3 voxels."""
    d = tmp_path_factory.mktemp("one_path")
    img = nib.load(str(MNI))
    data = np.asarray(img.dataobj, dtype=np.float32)
    (d / "data").mkdir()
    for i in range(3):
        vol = data[10 + i:162:4, 20:200:4, 70 + 5 * i:110:15]  # 38 x 45 x 3
        nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), img.affine), d / "data" / f"sub-0{i}_T1w.nii.gz")
    return {"dir": d, "ckpt": tiny16_checkpoint, "volume": d / "data" / "sub-00_T1w.nii.gz"}


class Spy:
    """Records every `Reconstructor` call: (x_init, slice ids) -> the reconstruction."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
        original = inference.Reconstructor.__call__

        def spy(rec, measurement, x_init, slice_ids, *args, **kwargs):
            out = original(rec, measurement, x_init, slice_ids, *args, **kwargs)
            self.calls.append((x_init.clone(), [int(s) for s in slice_ids], out.mean.clone()))
            return out

        monkeypatch.setattr(inference.Reconstructor, "__call__", spy)

    def by_slice(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {s: (x[j], mean[j]) for x, ids, mean in self.calls for j, s in enumerate(ids)}


def test_reconstruct_and_predict_give_the_same_native_reconstruction(files: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    deg = tmp_path / "deg.nii.gz"
    assert main(["degrade", str(files["volume"]), str(deg), "--regime", "noise", "--seed", "1"]) == 0
    rec = tmp_path / "rec.nii.gz"
    spy = Spy(monkeypatch)
    assert main(["reconstruct", str(deg), str(rec), "--ckpt", str(files["ckpt"]), "--regime", "noise",
                 "--sampling.steps", str(STEPS), "--device", "cpu", "--seed", "0"]) == 0
    assert len(spy.calls) == 1 and spy.calls[0][0].shape[-2:] == (38, 45)  # native: nothing resampled

    config = tmp_path / "predict.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning_modules.callbacks.NiftiPredictionWriter",
                                   "init_args": {"output_dir": str(tmp_path / "pred"), "write_std": True}}]},
        "model": {"class_path": "lightning_modules.module.ScoreModel",
                  "init_args": TINY},
        "data": {"class_path": "datamodules.LowFieldDataModule",
                 "init_args": {"predict": {"path": str(deg)}, "loader": {"eval_batch_size": 2}}},
    }))
    assert main(["predict", "--config", str(config), "--ckpt_path", str(files["ckpt"]),
                 f"--sampling.steps={STEPS}"]) == 0
    written = tmp_path / "pred" / "deg_recon.nii.gz"
    assert written.is_file() and (tmp_path / "pred" / "deg_std.nii.gz").is_file()
    predicted, reconstructed = nib.load(str(written)), nib.load(str(rec))
    assert predicted.shape == reconstructed.shape == nib.load(str(deg)).shape
    np.testing.assert_allclose(predicted.affine, reconstructed.affine)
    a, b = np.asarray(predicted.dataobj), np.asarray(reconstructed.dataobj)
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, atol=2e-4 * np.abs(b).max(), rtol=0)


def _split(path: Path, **splits: list[str]) -> Path:
    path.write_text(yaml.safe_dump({k: v for k, v in splits.items()}))
    return path


def _datamodule_block(files: dict[str, Path], split_file: Path) -> dict:
    return {"class_path": "datamodules.LowFieldDataModule",
            "init_args": {"source": str(files["dir"] / "data"), "split_file": str(split_file),
                          "eval_regimes": [REGIME], "loader": {"batch_size": 2},
                          "slices": {"crop_size": 16, "eval_per_volume": 2, "min_foreground_fraction": 0.0}}}


def test_evaluate_and_the_validation_callback_give_the_same_reconstruction(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same subject as evaluate's test subject and as the callback's validation subject: the same
    deterministic degradation, the same noise level, the same per-slice seeds, the same reconstruction."""
    as_test = _split(tmp_path / "test.yaml", train=["sub-01"], val=["sub-02"], test=["sub-00"])
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"data": _datamodule_block(files, as_test)}))
    spy = Spy(monkeypatch)
    assert main(["evaluate", "--ckpt", str(files["ckpt"]), "--config", str(config), "--regimes", REGIME,
                 "--out", str(tmp_path / "eval"), "--sampling.steps", str(STEPS), "--baselines", "none",
                 "--device", "cpu"]) == 0
    evaluated = spy.by_slice()
    assert len(evaluated) == 2

    spy.calls.clear()
    from datamodules import LowFieldDataModule

    as_val = _split(tmp_path / "val.yaml", train=["sub-01"], val=["sub-00"], test=["sub-02"])
    dm = LowFieldDataModule(**_datamodule_block(files, as_val)["init_args"])
    model = ScoreModel.load_from_checkpoint(files["ckpt"], map_location="cpu")
    callback = SamplerCallback(SamplerOptions(steps=STEPS), n_slices=2, regimes=[REGIME], log_images=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], limit_val_batches=1)
    trainer.validate(model, datamodule=dm)
    validated = spy.by_slice()
    assert set(validated) == set(evaluated)
    for s, (x_eval, rec_eval) in evaluated.items():
        x_val, rec_val = validated[s]
        assert x_eval.shape[-2:] == (38, 45)
        torch.testing.assert_close(x_val, x_eval)  # the same degraded slice
        torch.testing.assert_close(rec_val, rec_eval, atol=2e-4, rtol=2e-4)
    assert set(callback.last_metrics) == {f"val/{m}/{REGIME}" for m in ("ssim", "psnr", "nmse")}
