"""The Lightning layer: the LightningModule, its priors, its callbacks and EMA, over the diffusion maths of
`diffusion` (networks, SDEs, samplers, data consistency, losses, inference, checkpoint I/O).

- `module` (the LightningModule `ScoreModel`), `priors` (its two kinds of prior), `ema`, `callbacks` (the
  validation sampler, interrupt checkpoints, the finite-loss guard, the prediction writer), `metric_classes`
  (torchmetrics `Metric`s of fastMRI's metrics, `lfmri_utils.metrics`) and `figures`.

Exports are loaded lazily (PEP 562): `import lightning_modules` stays cheap until a name is used.
"""

from __future__ import annotations

from lfmri_utils.lazy import lazy_exports

_CALLBACKS = ("FiniteLossGuard", "InterruptCheckpoint", "TrainingInterrupted", "SamplerCallback")
_EXPORTS = {"EMA": "lightning_modules.ema", "ScoreModel": "lightning_modules.module",
            **dict.fromkeys(_CALLBACKS, "lightning_modules.callbacks")}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
