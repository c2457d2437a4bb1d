"""The score networks, the SDEs and samplers, losses, metrics, checkpoint import and export, the
LightningModule and its callbacks.

- `networks/`: the score networks (`networks.ddpm.DDPM`, score_sde's DDPM U-Net; NCSN++, ADM) and the
  pretrained checkpoint families.
- `sampling/`: plain-torch sampling code: the SDEs (`sampling.sde`), data consistency
  (`sampling.data_consistency`) and the reverse-diffusion samplers with their registry (`sampling.samplers`).
- `module` (the LightningModule `ScoreModel`), `priors` (its two kinds of prior), `losses`, `ema`, `metrics`
  (and their torchmetrics `Metric`s, `metric_classes`), `figures`, `inference` (`Reconstructor`),
  `checkpoint` (score_sde import / export), `torch_files` (the safe `torch.load` and its one-line errors,
  below both `checkpoint` and `networks.families`) and `callbacks`.

Exports are loaded lazily (PEP 562): `import lightning_modules` stays cheap until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DDPM": "lightning_modules.networks.ddpm",
    "VPSDE": "lightning_modules.sampling.sde",
    "get_score_fn": "lightning_modules.sampling.sde",
    "EMA": "lightning_modules.ema",
    "dsm_loss": "lightning_modules.losses",
    "supervised_loss": "lightning_modules.losses",
    "load_score_sde_checkpoint": "lightning_modules.checkpoint",
    "export_score_sde_checkpoint": "lightning_modules.checkpoint",
    "CheckpointError": "lightning_modules.checkpoint",
    "load_pretrained": "lightning_modules.networks.families",
    "Pretrained": "lightning_modules.networks.families",
    "FAMILIES": "lightning_modules.networks.families",
    "VESDE": "lightning_modules.sampling.sde",
    "DiscreteVPSDE": "lightning_modules.sampling.sde",
    "ScoreModel": "lightning_modules.module",
    "build_sampler": "lightning_modules.sampling.samplers",
    "GradientDC": "lightning_modules.sampling.data_consistency",
    "ProximalDC": "lightning_modules.sampling.data_consistency",
    "Reconstructor": "lightning_modules.inference",
    "SAMPLERS": "lightning_modules.sampling.samplers",
    "FiniteLossGuard": "lightning_modules.callbacks",
    "InterruptCheckpoint": "lightning_modules.callbacks",
    "TrainingInterrupted": "lightning_modules.callbacks",
    "SamplerCallback": "lightning_modules.callbacks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
