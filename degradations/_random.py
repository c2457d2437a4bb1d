"""Small helpers for drawing physical parameters with an explicit `torch.Generator`."""

from __future__ import annotations

import math

import torch


def check_range(name: str, value_range: tuple[float, float], low: float = -math.inf) -> tuple[float, float]:
    """Validate a `(min, max)` range and return it as floats; `ValueError` naming `name` otherwise."""
    lo, hi = (float(v) for v in value_range)
    if not (low <= lo <= hi) or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be a finite range (min, max) with {low} <= min <= max, "
                         f"got {value_range}")
    return lo, hi


def uniform(batch: int, value_range: tuple[float, float], fixed: float | None,
            generator: torch.Generator | None, device: torch.device | str | None = None) -> torch.Tensor:
    """`[batch]` float32 values: `fixed` everywhere if given, else i.i.d. uniform in `value_range`.

    The draw happens on the generator's device (CPU when `generator` is None), then moves to `device`.
    """
    if fixed is not None:
        return torch.full((batch,), float(fixed), dtype=torch.float32, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    lo, hi = value_range
    return (lo + (hi - lo) * u).to(device=device, dtype=torch.float32)
