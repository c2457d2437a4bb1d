"""Exponential moving average of a network's parameters, in score_sde's format.

The state dict is `{'decay', 'num_updates', 'shadow_params'}` with `shadow_params` a list of tensors in the
order of `net.parameters()` (trainable parameters only; buffers excluded), exactly what score_sde checkpoints
hold, so an EMA state moves between lfmri and score_sde unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """EMA of parameters: shadow <- shadow - (1 - d) (shadow - param) after each optimiser step.

    With `use_num_updates` (score_sde's default) the effective decay is min(decay, (1 + n) / (10 + n)) at the
    n-th update, so early averages are not dominated by the initial weights.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float = 0.9999,
                 use_num_updates: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]

    @staticmethod
    def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in parameters if p.requires_grad]

    def _follow(self, params: list[nn.Parameter]) -> None:
        """Move the shadows to the parameters' device (they are created before Lightning moves the model)."""
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA holds {len(self.shadow_params)} tensors but the network has {len(params)} "
                             "trainable parameters")
        if self.shadow_params and self.shadow_params[0].device != params[0].device:
            self.shadow_params = [s.to(p.device) for s, p in zip(self.shadow_params, params, strict=True)]

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        """Fold the current parameters into the average (call after each optimiser step)."""
        params = self._trainable(parameters)
        self._follow(params)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow_params, params, strict=True):
            s.sub_((1.0 - decay) * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Overwrite the parameters with the averages."""
        params = self._trainable(parameters)
        self._follow(params)
        for s, p in zip(self.shadow_params, params, strict=True):
            p.copy_(s)

    @contextmanager
    def average_parameters(self, parameters: Iterable[nn.Parameter]) -> Iterator[None]:
        """Context in which the parameters hold the averages; the training values are restored on exit."""
        params = self._trainable(parameters)
        stored = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for c, p in zip(stored, params, strict=True):
                    p.copy_(c)

    def state_dict(self) -> dict:
        """`{'decay', 'num_updates', 'shadow_params'}` (score_sde's layout)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": list(self.shadow_params)}

    def load_state_dict(self, state: dict) -> None:
        """Load a state in score_sde's layout; the number and shapes of the tensors must match."""
        shadows: list[Tensor] = list(state["shadow_params"])
        if len(shadows) != len(self.shadow_params):
            raise ValueError(f"EMA state has {len(shadows)} tensors, expected {len(self.shadow_params)}")
        for i, (new, old) in enumerate(zip(shadows, self.shadow_params, strict=True)):
            if new.shape != old.shape:
                raise ValueError(f"EMA tensor {i}: shape {tuple(new.shape)} in the state, expected "
                                 f"{tuple(old.shape)}")
        self.decay = float(state["decay"])
        self.num_updates = state["num_updates"]
        self.shadow_params = [new.detach().to(device=old.device, dtype=old.dtype).clone()
                              for new, old in zip(shadows, self.shadow_params, strict=True)]
