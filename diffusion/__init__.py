"""The diffusion maths, with no Lightning in it: score networks, SDEs, samplers, data consistency, the
training losses, inference and checkpoint import / export.

- `networks/`: the score networks (`networks.ddpm.DDPM`, score_sde's DDPM U-Net; NCSN++, ADM) and the
  pretrained checkpoint families (`networks.families`).
- `sampling/`: the SDEs and their one denoiser interface (`sampling.sde`), data consistency
  (`sampling.data_consistency`), the reverse-diffusion samplers with their registry (`sampling.samplers`) and
  the sampler options a user chooses (`sampling.options`, torch-free).
- `losses` (denoising score matching, the supervised loss), `inference` (`Reconstructor`: a measurement in,
  the posterior estimate out), `checkpoint` (score_sde import / export) and `torch_files` (the safe
  `torch.load` and its one-line errors, below both `checkpoint` and `networks.families`).
- `pretrained/`: the shipped reference prior (`--ckpt reference-small`, `checkpoint.SHIPPED_CHECKPOINTS`).

The Lightning layer (`lightning_modules`: the `ScoreModel`, its priors, callbacks, EMA) builds on this
package; nothing here imports it, Lightning, the data modules or the command line (`tests/test_layers.py`).
Exports are loaded lazily (PEP 562): `import diffusion` stays cheap until a name is used.
"""

from __future__ import annotations

from lfmri_utils.lazy import lazy_exports

_EXPORTS = {
    "DDPM": "diffusion.networks.ddpm",
    "VPSDE": "diffusion.sampling.sde",
    "VESDE": "diffusion.sampling.sde",
    "DiscreteVPSDE": "diffusion.sampling.sde",
    "get_score_fn": "diffusion.sampling.sde",
    "dsm_loss": "diffusion.losses",
    "supervised_loss": "diffusion.losses",
    "load_score_sde_checkpoint": "diffusion.checkpoint",
    "export_score_sde_checkpoint": "diffusion.checkpoint",
    "CheckpointError": "diffusion.checkpoint",
    "load_pretrained": "diffusion.networks.families",
    "Pretrained": "diffusion.networks.families",
    "FAMILIES": "diffusion.networks.families",
    "build_sampler": "diffusion.sampling.samplers",
    "SAMPLERS": "diffusion.sampling.samplers",
    "GradientDC": "diffusion.sampling.data_consistency",
    "ProximalDC": "diffusion.sampling.data_consistency",
    "Reconstructor": "diffusion.inference",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
