"""ScoreModel's `pretrained` import: channel adaptation without a config file, and score_sde configs whose
`sigmas` buffer (sigma_min / sigma_max / num_scales) differs from the defaults."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoint import export_score_sde_checkpoint
from diffusion.networks.ddpm import DDPM, DDPMConfig
from lightning_modules.module import ScoreModel
from lightning_modules.priors import PretrainedSource

TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, num_groups=4)


def test_a_two_channel_checkpoint_loads_into_a_one_channel_model_without_a_config(tmp_path):
    torch.manual_seed(0)
    clinical = DDPM(DDPMConfig(num_channels=2, **TINY))
    export_score_sde_checkpoint(clinical, tmp_path / "c.pth")
    model = ScoreModel(net=DDPMConfig(num_channels=1, **TINY),
                       pretrained=PretrainedSource(str(tmp_path / "c.pth"), adapt_channels=1))
    model.load_pretrained()
    x, labels = torch.rand(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    expected = clinical.eval()(torch.cat([x, torch.zeros_like(x)], 1), labels)[:, :1]  # the 2 -> 1 rule
    torch.testing.assert_close(model.net.eval()(x, labels), expected, atol=1e-5, rtol=1e-5)


def test_non_default_sigmas_are_configurable(tmp_path):
    ckpt, config = tmp_path / "lsun.pth", tmp_path / "lsun.json"
    export_score_sde_checkpoint(DDPM(DDPMConfig(num_channels=2, sigma_max=378.0, **TINY)), ckpt,
                                config_path=config)
    source = PretrainedSource(str(ckpt), config=str(config))
    ScoreModel(net=DDPMConfig(sigma_max=378.0, **TINY), pretrained=source).load_pretrained()
    with pytest.raises(ValueError, match="sigma_max=378"):  # the config says 378, this model 50
        ScoreModel(net=DDPMConfig(**TINY), pretrained=source).load_pretrained()
