"""Undersampled multi-coil data through the data module (issue 24): `regime_overrides` {acceleration, coils}
give training and evaluation samples whose y is the coils' masked k-space and whose `degraded` image is the
measurement's coil-combined zero-filled one; masks are seeded like every other draw; `lfmri fit` trains and
validates (SamplerCallback) on them."""

import csv
import math
import os
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import LFMRI, QUICKSTART, REPO, TINY_QUICKSTART_ARGS
from torch.utils.data import default_collate

from datamodules.datamodule import LowFieldDataModule
from datamodules.sources import BundledSource
from datamodules.transforms import crop, crop_origin
from degradations import REGIMES, Measurement, channels_to_complex, fft2c, ifft2c
from lfmri.evaluation import measurement

SIZE, COILS = 32, 4
OVERRIDES = {"acceleration": 4, "coils": COILS}


def _dm(seed: int = 0, overrides: dict | None = None, **slices) -> LowFieldDataModule:
    """The tiny bundled data module (2 training subjects, 1 validation subject, 32 x 32 slices)."""
    dm = LowFieldDataModule(source=BundledSource(n_train=2, n_val=1),
                            loader={"batch_size": 2, "num_workers": 0}, seed=seed,
                            slices={"image_size": SIZE, "eval_per_volume": 1, **slices},
                            regime_overrides=OVERRIDES if overrides is None else overrides)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm() -> LowFieldDataModule:
    return _dm()


def _combined(batch, degradation) -> torch.Tensor:
    """The coil-combined zero-filled image of a batch's measurement, complex64 [B, 1, H, W]."""
    return Measurement.simulated(batch.y, batch.params, degradation).degraded


def test_training_batch_shapes(dm):
    ds = dm.train_dataloader().dataset
    batch = default_collate([ds[0], ds[1]])
    assert batch.clean.shape == batch.degraded.shape == (2, 2, SIZE, SIZE)
    assert batch.y.shape == (2, COILS, SIZE, SIZE) and batch.y.dtype == torch.complex64
    assert batch.params["mask"].shape == (2, 1, SIZE, SIZE) and batch.params["mask"].dtype == torch.float32
    assert batch.params["sensitivities"].shape == (2, COILS, SIZE, SIZE)
    for i, regime in enumerate(batch.regime):
        one = default_collate([ds[i]])
        torch.testing.assert_close(channels_to_complex(one.degraded), _combined(one, ds.degradations[regime]))


def test_val_batch_is_the_measurement(dm):
    ds = dm.val_dataloader().dataset
    assert [item[-1] for item in ds.items] == list(REGIMES)  # one slice, every regime
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch.y.shape == (len(REGIMES), COILS, SIZE, SIZE)
    assert batch.degraded.shape == (len(REGIMES), 2, SIZE, SIZE)
    mask = batch.params["mask"]
    rows = mask[:, 0, :, 0] > 0  # [B, H]: the sampled phase-encoding rows
    assert bool((mask == rows[:, None, :, None].float()).all())  # Cartesian: whole rows
    assert 0.15 < float(rows.float().mean()) < 0.4  # acceleration 4 (with the fully sampled centre)
    unsampled = (~rows)[:, None, :, None].expand_as(batch.y)
    assert bool((batch.y[unsampled] == 0).all()) and bool((batch.y[~unsampled] != 0).all())
    for i, regime in enumerate(batch.regime):
        one = default_collate([ds[i]])
        combined = _combined(one, ds.degradations[regime])
        torch.testing.assert_close(channels_to_complex(one.degraded), combined)
        # not the first coil's image, nor the plain inverse FFT of the coil stack
        assert not torch.allclose(combined, ifft2c(one.y)[:, :1], atol=1e-3)


def test_masks_are_seeded():
    a, b, other = _dm(seed=3), _dm(seed=3), _dm(seed=4)
    for split in ("train", "val"):
        ds_a, ds_b, ds_o = (getattr(d, f"{split}_dataloader")().dataset for d in (a, b, other))
        masks = [[ds[i].params["mask"] for i in range(len(ds_a))] for ds in (ds_a, ds_b, ds_o)]
        assert all(torch.equal(x, y) for x, y in zip(masks[0], masks[1], strict=True))
        assert any(not torch.equal(x, y) for x, y in zip(masks[0], masks[2], strict=True))
    train = a.train_dataloader().dataset
    first = train[0].params["mask"]
    train.set_epoch(1)
    assert not torch.equal(first, train[0].params["mask"])  # a fresh mask every epoch, as every draw


def test_training_crop_of_the_combined_image():
    """A crop is cut from the whole slice's coil-combined image; its y is the crop's own one-channel
    Fourier pair and its params have no mask or coils."""
    crop_size = 16
    ds = _dm(crop_size=crop_size, crop_coverage="inside").train_dataloader().dataset
    sample = ds[0]
    assert sample.degraded.shape == (2, crop_size, crop_size) and sample.y.shape == (1, crop_size, crop_size)
    assert "mask" not in sample.params and "sensitivities" not in sample.params
    assert sample.params["b0_map_hz"].shape == (1, crop_size, crop_size)
    torch.testing.assert_close(sample.y, fft2c(channels_to_complex(sample.degraded[None])[0]))
    # the same draws, in the dataset's order: regime, the whole slice's degradation, the crop's position
    g = ds.generator(0)
    regime = ds.regimes[int(torch.randint(len(ds.regimes), (1,), generator=g))]
    v, s = ds.items[0]
    x = ds.normalised_slice(v, s, g)
    y, params = ds.degradations[regime](x, g)
    whole = Measurement.simulated(y, params, ds.degradations[regime]).degraded
    top, left = crop_origin(x.shape[-2:], crop_size, g, "inside")
    torch.testing.assert_close(channels_to_complex(sample.degraded[None]), crop(whole, top, left, crop_size))


def test_evaluate_measurement_of_a_volume(dm):
    """`lfmri evaluate`'s measurement of a data-module volume: the masked coils, the same combined image."""
    regime = "noise_blur"
    vol = next(dm.volumes("val", regime))
    m = measurement(vol, dm.val_dataloader().dataset.degradations[regime])
    assert m.n_coils == COILS and m.mask is not None and m.noise_origin == "recorded"
    torch.testing.assert_close(m.degraded, channels_to_complex(vol.degraded))


def test_single_coil_fully_sampled_is_unchanged(dm):
    """Without the overrides no acquisition keys appear and degraded is ifft2c(y) of one channel, exactly."""
    plain = _dm(overrides={})
    for ds in (plain.train_dataloader().dataset, plain.val_dataloader().dataset):
        sample = ds[0]
        assert "mask" not in sample.params and "sensitivities" not in sample.params
        assert sample.y.shape == (1, SIZE, SIZE)
        assert torch.equal(channels_to_complex(sample.degraded[None]), ifft2c(sample.y[None]))


@pytest.mark.slow
@pytest.mark.e2e
def test_fit_trains_and_validates_undersampled_multicoil(tmp_path):
    """`lfmri fit` (the quickstart, tiny) with 4x undersampled 4-coil data: 2 training steps, one validation
    with the SamplerCallback; every logged loss and metric is finite."""
    root = tmp_path / "run"
    argv = [str(LFMRI), "fit", "--config", str(QUICKSTART), "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}", "--trainer.callbacks.init_args.sampling.steps=2",
            "--trainer.callbacks.init_args.n_slices=1", *TINY_QUICKSTART_ARGS,
            "--data.init_args.regime_overrides={acceleration: 4, coils: 4, mask: equispaced}"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(next(root.glob("logs/*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith(("train/", "val/"))}
    metrics = (f"val/{m}/{r}" for m in ("ssim", "psnr", "nmse") for r in REGIMES)
    expected = {"train/loss", "val/loss", *metrics}
    assert expected <= set(logged), sorted(expected - set(logged))
    assert all(math.isfinite(v) for v in logged.values()), logged
    assert max(int(row["step"]) for row in rows) == 1  # steps 0 and 1: two training steps


def test_crop_outside_the_slice_has_the_zero_filled_noise_level(tmp_path):
    """Where a "uniform" crop reaches past the slice, the degraded crop is the noise of a zero-filled image:
    std noise_sigma * sqrt(sampled fraction) per complex pixel (about half the fully sampled level at 4x)."""
    values = 1 + np.arange(24 * 20, dtype=np.float32).reshape(24, 20)  # every slice pixel > 0
    for name in "abc":
        volume = nib.Nifti1Image(np.repeat(values[:, :, None], 4, 2), np.eye(4))
        nib.save(volume, str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "split.yaml").write_text("train: [a, b]\nval: [c]\ntest: []\n")
    dm = LowFieldDataModule(source=str(tmp_path), split_file=str(tmp_path / "split.yaml"), seed=1,
                            loader={"batch_size": 2}, slices={"crop_size": 16, "crop_coverage": "uniform"},
                            regimes=["noise"], regime_overrides={**OVERRIDES, "mask": "equispaced"})
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    whitened = []
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            sample = ds[i]
            outside = sample.clean.abs().sum(0) == 0
            whitened.append(sample.degraded[:, outside].flatten() / float(sample.params["noise_sigma"]))
    noise = torch.cat(whitened)
    assert noise.numel() > 2000
    ratio = float(noise.std()) * math.sqrt(2)  # the std per complex pixel over noise_sigma
    assert 0.45 < ratio < 0.65, ratio  # sqrt(f), f the sampled fraction (1/4 plus the centre), not 1
