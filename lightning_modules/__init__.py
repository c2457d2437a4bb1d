"""The Lightning layer: the LightningModule, its priors, its callbacks and EMA, over the diffusion maths of
`diffusion` (networks, SDEs, samplers, data consistency, losses, inference, checkpoint I/O).

- `module` (the LightningModule `ScoreModel`), `priors` (its two kinds of prior), `ema`, `callbacks` (the
  validation sampler, interrupt checkpoints, the finite-loss guard, the prediction writer), `metric_classes`
  (torchmetrics `Metric`s of fastMRI's metrics, `lfmri_utils.metrics`) and `figures`.

Exports are loaded lazily (PEP 562): `import lightning_modules` stays cheap until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EMA": "lightning_modules.ema",
    "ScoreModel": "lightning_modules.module",
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
