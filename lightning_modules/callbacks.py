"""Lightning callbacks of lfmri: the finite-loss guard (and, beside it, the validation sampler callback)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or Inf; the message names the step."""


class FiniteLossGuard(Callback):
    """Stop a fit at the first NaN/Inf training loss, with a message naming the global step.

    The check runs before the backward pass, so neither the weights nor `last.ckpt` ever see the bad
    step: the run is stopped by raising :class:`NonFiniteLossError` (no checkpoint is written on the way
    out), and `--ckpt_path last` restarts from the last good state.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach().float())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); stopping. The last good checkpoint is kept: resume with "
                "--ckpt_path last after lowering the learning rate or checking the data."
            )
