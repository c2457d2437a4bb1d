"""`ScoreModel.predict_step`: measured slices in, magnitude reconstructions out, data consistency applied."""

from __future__ import annotations

import torch
from helpers import TINY_MODEL_NET
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from datamodules.samples import MeasuredSample
from degradations import complex_to_channels, fft2c, neutral_params
from diffusion.networks.ddpm import DDPMConfig
from diffusion.sampling.samplers import SamplerOptions
from lightning_modules.module import OptimConfig, ScoreModel


def _batch_samples(n: int = 2, size: int = 16, noise_sigma: float | None = None) -> list[MeasuredSample]:
    """Measured slices as `PredictSliceDataset` serves them: the operator's params, with `noise_sigma` only
    when the noise std is known (given or recorded)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        x = torch.rand(1, 1, size, size, generator=g).to(torch.complex64)
        params = {k: v[0] for k, v in neutral_params(1, size, size).items() if k != "noise_sigma"}
        if noise_sigma is not None:
            params["noise_sigma"] = torch.tensor(noise_sigma)
        samples.append(MeasuredSample(
            degraded=complex_to_channels(x)[0], y=fft2c(x)[0], regime="measured", params=params,
            volume_id="s", slice=torch.tensor(i), scale=torch.tensor(2.0), shape=torch.tensor([size, size])))
    return samples


def _model() -> ScoreModel:
    model = ScoreModel(net=DDPMConfig(**{**TINY_MODEL_NET, "attn_resolutions": (8,), "image_size": 16}),
                       optim=OptimConfig(warmup_steps=1))
    model.predict_options = SamplerOptions(steps=3, t0=0.3, dc="gradient", dc_weight=1.0)
    return model


def test_predict_with_full_data_consistency_returns_the_measured_magnitude():
    # with dc weight 1 and fully sampled noiseless y, the last DC step projects exactly onto the measurement
    samples = _batch_samples()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(_model(), DataLoader(samples, batch_size=2))
    rec = out[0]["reconstruction"]
    assert rec.shape == (2, 1, 16, 16)
    expected = torch.stack([s.degraded for s in samples]).norm(dim=1, keepdim=True)
    torch.testing.assert_close(rec, expected, atol=1e-4, rtol=1e-4)
    assert out[0]["volume_id"] == ("s", "s") and out[0]["scale"].tolist() == [2.0, 2.0]


def test_a_known_noise_std_among_the_params_is_used_else_it_is_estimated():
    """`lfmri predict`'s `predict.noise_sigma` (or a recorded one) reaches the measurement as the sample's
    `params["noise_sigma"]` (normalised units); without it the level is estimated from y."""
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    given = trainer.predict(_model(), DataLoader(_batch_samples(noise_sigma=0.25), batch_size=2))[0]
    assert given["noise_sigma"].tolist() == [0.25, 0.25]
    estimated = trainer.predict(_model(), DataLoader(_batch_samples(), batch_size=2))[0]
    assert not torch.allclose(estimated["noise_sigma"], given["noise_sigma"])
