"""SamplerCallback: regime metrics and an image grid at validation, deterministic, same on 1 or 2 ranks."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, TINY_MODEL_NET
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from datamodules import BundledSource, LowFieldDataModule
from diffusion.networks.ddpm import DDPMConfig
from diffusion.sampling.samplers import SamplerOptions
from lightning_modules.callbacks import COLUMNS, SamplerCallback, validation_subset
from lightning_modules.module import OptimConfig, ScoreModel

REGIMES = ["noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0"]
NAMES = [f"val/{m}/{r}" for m in ("ssim", "psnr", "nmse") for r in REGIMES]
#: trains with the default dropout
TINY = {**TINY_MODEL, "net": DDPMConfig(**{**TINY_MODEL_NET, "dropout": 0.1}),
        "optim": OptimConfig(lr=1e-3, warmup_steps=1, ema_decay=0.5)}
DATA = dict(slices={"image_size": 32, "eval_per_volume": 4}, loader={"batch_size": 2, "num_workers": 0})
BUNDLED = dict(n_train=2, n_val=1)  # the data module's source: BundledSource(**BUNDLED)
CALLBACK = dict(n_slices=2, batch_size=2, seed=3)  # 4 batches: both ranks get 2 in DDP
SAMPLING = dict(steps=2)  # the callback's sampler: SamplerOptions(**SAMPLING)
DDP_SCRIPT = Path(__file__).with_name("ddp_validate.py")


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def datamodule() -> LowFieldDataModule:
    dm = LowFieldDataModule(BundledSource(**BUNDLED), **DATA)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def fitted(datamodule, tmp_path_factory):
    """A 2-step fit validating after every step (after a 1-batch sanity check), with a CSV logger."""
    tmp = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    model = ScoreModel(**TINY)
    callback = SamplerCallback(SamplerOptions(**SAMPLING), **CALLBACK)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=1, limit_val_batches=1,
                         num_sanity_val_steps=1, logger=CSVLogger(tmp, name="logs"), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(tmp / "fitted.ckpt")
    return SimpleNamespace(trainer=trainer, model=model, callback=callback, log_dir=Path(trainer.log_dir),
                           ckpt=tmp / "fitted.ckpt", metrics=dict(callback.last_metrics))


def test_fit_logs_finite_metrics_per_regime_and_skips_the_sanity_check(fitted):
    callback, log_dir = fitted.callback, fitted.log_dir
    rows = [r for r in read_metrics(log_dir / "metrics.csv") if r.get("val/ssim/noise")]
    assert [int(r["step"]) for r in rows] == [0, 1]  # two validations; the sanity check logs nothing
    assert callback.n_validations == 2
    for row in rows:
        values = {n: float(row[n]) for n in NAMES}
        assert all(math.isfinite(v) for v in values.values()), values
        assert all(-1 <= values[f"val/ssim/{r}"] <= 1 and values[f"val/nmse/{r}"] >= 0 for r in REGIMES)
    assert set(callback.last_metrics) == set(NAMES)
    assert callback.last_metrics["val/psnr/noise"] == pytest.approx(float(rows[-1]["val/psnr/noise"]), abs=0)
    # the grid: one PNG per validation, named by global step; none at step 0 (the sanity check)
    pngs = sorted(p.name for p in (log_dir / "samples").iterdir())
    assert pngs == ["step_000001.png", "step_000002.png"]
    import matplotlib.image

    image = matplotlib.image.imread(log_dir / "samples" / pngs[-1])
    assert image.ndim == 3 and image.shape[0] > image.shape[1] * 0.8  # 4 rows x 4 columns of panels
    assert image[..., :3].std() > 0.05


def test_repeated_validation_gives_identical_numbers(fitted, datamodule):
    n_before = fitted.callback.n_validations
    fitted.trainer.validate(fitted.model, datamodule=datamodule, verbose=False)
    # the fit's last validation had the same EMA weights, slices, degradations and noise
    assert fitted.callback.last_metrics == fitted.metrics
    assert fitted.callback.n_validations == n_before + 1


def test_zero_score_near_t0_reconstructs_the_degraded_input_of_the_chosen_slices(fitted, datamodule,
                                                                                 monkeypatch):
    """With a zero score and a start time near 0, DDIM returns DC(degraded + small noise), and DC leaves the
    degraded image of the noise regime unchanged: the logged metrics are those of |degraded| vs |clean| on the
    same slices, computed here independently."""
    from diffusion.sampling.samplers import magnitude
    from lfmri_utils.metrics import psnr_volume, ssim_volume

    monkeypatch.setattr(fitted.model, "score_fn", lambda use_ema=True: lambda x, t: torch.zeros_like(x))
    callback = SamplerCallback(SamplerOptions(steps=1, t0=0.002), regimes=["noise"], n_slices=3, batch_size=2,
                               log_images=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, limit_val_batches=1, logger=False,
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(fitted.model, datamodule=datamodule, verbose=False)
    dataset = datamodule.val_dataset
    (idx,) = validation_subset([item[-1] for item in dataset.items], ["noise"], 3).values()
    samples = [dataset[i] for i in idx]
    deg = [magnitude(s.degraded[None]) for s in samples]
    ref = [magnitude(s.clean[None]) for s in samples]
    psnr = np.mean([psnr_volume(d, r) for d, r in zip(deg, ref, strict=True)])
    ssim = np.mean([ssim_volume(d, r) for d, r in zip(deg, ref, strict=True)])
    assert callback.last_metrics["val/psnr/noise"] == pytest.approx(psnr, abs=0.1)
    assert callback.last_metrics["val/ssim/noise"] == pytest.approx(ssim, abs=0.005)


def test_subset_is_evenly_spaced_per_regime_and_fixed():
    items = ["a", "b"] * 6  # entry i has regime "a" for even i: 6 entries each
    assert validation_subset(items, None, 3) == {"a": [0, 4, 10], "b": [1, 5, 11]}  # rounds 2.5 to 2
    assert validation_subset(items, ["b"], 10) == {"b": [1, 3, 5, 7, 9, 11]}
    with pytest.raises(ValueError, match="regime.*c.*not in the validation dataset"):
        validation_subset(items, ["a", "c"], 2)


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerCallback(SamplerOptions(sampler="euler"))
    with pytest.raises(ValueError, match="unknown regime"):
        SamplerCallback(regimes=["noise", "motion"])
    with pytest.raises(ValueError, match="every_n_val"):
        SamplerCallback(every_n_val=0)


def test_every_n_val_counts_validations_and_skips_sanity(monkeypatch):
    callback = SamplerCallback(every_n_val=2)
    runs = []
    monkeypatch.setattr(callback, "run", lambda trainer, module: runs.append(callback.n_validations))
    for sanity in (True, False, False, False, False, False):
        callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=sanity), None)
    assert runs == [2, 4]
    restored = SamplerCallback(every_n_val=2)
    restored.load_state_dict(callback.state_dict())
    assert restored.n_validations == 5


class _RecordingWandb(WandbLogger):
    """A WandbLogger that records `log_image` calls instead of talking to W&B."""

    def __init__(self) -> None:  # no W&B run
        self.calls: list[dict] = []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.calls.append(dict(key=key, images=images, step=step, **kwargs))


def test_grid_goes_to_wandb_as_an_image_instead_of_a_png(tmp_path):
    wandb = _RecordingWandb()
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), loggers=[wandb],
                              is_global_zero=True, global_step=7, log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path))
    panels = torch.rand(2, 4, 16, 16)
    SamplerCallback()._log_grid(trainer, ["noise", "noise_blur"], panels)
    (call,) = wandb.calls
    assert call["key"] == "val/samples" and call["step"] == 7 and len(call["images"]) == 1
    image = call["images"][0]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[-1] == 3
    assert call["caption"] == [" | ".join(COLUMNS)]
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_ddp_two_processes_log_the_same_numbers_as_one(fitted, tmp_path):
    """The fitted checkpoint validated on 2 CPU processes (gloo DDP): both ranks log exactly the numbers of
    the fit's last validation (same weights) on this 1 process."""
    one_process = fitted.metrics
    settings = json.dumps({"callback": CALLBACK, "sampling": SAMPLING, "data": DATA, "bundled": BUNDLED})
    # each rank uses as many threads as this process, so the CPU kernels sum in the same order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(DDP_SCRIPT), str(fitted.ckpt), "2", settings, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == one_process
    (metrics_csv,) = tmp_path.glob("logs/version_*/metrics.csv")
    (row,) = [r for r in read_metrics(metrics_csv) if r.get("val/ssim/noise")]
    assert {n: float(row[n]) for n in NAMES} == one_process
    assert len(list(tmp_path.glob("logs/version_*/samples/step_*.png"))) == 1
