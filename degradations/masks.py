"""Undersampling masks: fastMRI's Cartesian line masks and SigPy's variable-density Poisson disc.

A Cartesian mask selects whole phase-encoding lines, i.e. rows of `H` (readout along `W`): a 1D mask of
length `n_lines = H`, constant along `W` in the `[B, 1, H, W]` k-space weights. 1 = sampled.

fastMRI's conventions (`fastmri.data.subsample`, matched as facts so that for the same
`np.random.RandomState` seed our mask equals fastMRI's `MaskFunc([center_fraction], [acceleration])` mask
`(shape, seed=seed)`; with one (fraction, acceleration) pair their choice of pair draws nothing):

- centre: `num_low_freqs = round(n * center_fraction)` lines (Python's round, half to even) at
  `pad = (n - num_low_freqs + 1) // 2`, i.e. lines `pad .. pad + num_low_freqs - 1` are always sampled;
- `"random"` (`RandomMaskFunc`): one draw `u = rng.uniform(size=n)` for all `n` lines; line `i` is sampled if
  it is a centre line or `u[i] < p` with `p = (n / acceleration - num_low_freqs) / (n - num_low_freqs)`,
  so the expected number of lines is `n / acceleration`;
- `"equispaced"` (`EquispacedMaskFractionFunc`, fastMRI's multi-coil data): the outer spacing is
  `a = acceleration * (num_low_freqs - n) / (num_low_freqs * acceleration - n)` (so the total fraction is
  about `1 / acceleration`), the offset is one draw `rng.randint(0, round(a))`, and the lines
  `np.around(offset + k * a)` for `offset + k * a < n - 1` (`np.arange(offset, n - 1, a)`) are sampled,
  plus the centre lines.

`acceleration = 1` means fully sampled (all lines, no draw). The centre must hold fewer than
`n / acceleration` lines (otherwise the acceleration is not reachable).

Poisson disc (2D phase encoding of 3D acquisitions): `sigpy.mri.poisson((H, W), acceleration,
calib=(calib, calib), seed=seed)` with its defaults (corners cropped, acceleration within 0.1 of the
target); its centred `calib x calib` block (rows `int(H/2 - calib/2) .. int(H/2 + calib/2) - 1`, same for
columns) is fully sampled.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

__all__ = ["cartesian_mask", "poisson_disc_mask", "UndersamplingMask", "MASK_KINDS"]

#: the kinds of mask `UndersamplingMask` draws
MASK_KINDS = ("random", "equispaced", "poisson")


def _check_acceleration(acceleration: float) -> float:
    if not (math.isfinite(acceleration) and acceleration >= 1):
        raise ValueError(f"acceleration must be a finite number >= 1 (1 = fully sampled), got {acceleration}")
    return float(acceleration)


def _check_center_fraction(center_fraction: float) -> float:
    if not (0 < center_fraction < 1):
        raise ValueError(f"center_fraction must be in (0, 1), got {center_fraction}")
    return float(center_fraction)


def cartesian_mask(kind: Literal["random", "equispaced"], n_lines: int, acceleration: float,
                   center_fraction: float, rng: np.random.RandomState) -> np.ndarray:
    """fastMRI-convention line mask, bool `[n_lines]` (True = sampled), drawn with `rng` (module docstring).

    Args:
        kind: `"random"` (RandomMaskFunc) or `"equispaced"` (EquispacedMaskFractionFunc).
        n_lines: number of phase-encoding lines (`H`).
        acceleration: target acceleration (>= 1; 1 = fully sampled, no draw).
        center_fraction: fraction of the lines kept at the centre of k-space, in (0, 1).
        rng: numpy RandomState (`np.random.RandomState(seed)` reproduces fastMRI's `seed=seed` mask).
    """
    if kind not in ("random", "equispaced"):
        raise ValueError(f"kind must be 'random' or 'equispaced', got {kind!r}")
    if n_lines < 1:
        raise ValueError(f"n_lines must be >= 1, got {n_lines}")
    acceleration = _check_acceleration(acceleration)
    center_fraction = _check_center_fraction(center_fraction)
    if acceleration == 1:
        return np.ones(n_lines, dtype=bool)
    n_low = round(n_lines * center_fraction)
    if n_low >= n_lines / acceleration:
        raise ValueError(f"center_fraction {center_fraction} gives {n_low} centre lines of {n_lines}, "
                         f"not fewer than n_lines / acceleration = {n_lines / acceleration:.1f}")
    mask = np.zeros(n_lines, dtype=bool)
    start = (n_lines - n_low + 1) // 2
    mask[start:start + n_low] = True
    if kind == "random":
        p = (n_lines / acceleration - n_low) / (n_lines - n_low)
        mask |= rng.uniform(size=n_lines) < p
    else:
        spacing = acceleration * (n_low - n_lines) / (n_low * acceleration - n_lines)
        offset = rng.randint(0, high=round(spacing))
        mask[np.around(np.arange(offset, n_lines - 1, spacing)).astype(np.int64)] = True
    return mask


def poisson_disc_mask(height: int, width: int, acceleration: float, calib: int, seed: int) -> np.ndarray:
    """Variable-density Poisson-disc mask, bool `[height, width]` (SigPy's `sigpy.mri.poisson`).

    The centred `calib x calib` block is fully sampled; `acceleration = 1` gives the full grid. SigPy reaches
    the target acceleration within 0.1 (ValueError from SigPy when it cannot).
    """
    acceleration = _check_acceleration(acceleration)
    if not (0 <= calib <= min(height, width)):
        raise ValueError(f"calib must be in [0, min(height, width)] = [0, {min(height, width)}], got {calib}")
    if acceleration == 1:
        return np.ones((height, width), dtype=bool)
    import sigpy.mri  # here, not at module level: importing SigPy (and numba) takes ~2 s

    mask = sigpy.mri.poisson((height, width), acceleration, calib=(calib, calib), dtype=np.float32,
                             seed=int(seed))
    return mask > 0


class UndersamplingMask:
    """k-space undersampling as a degradation step: a 0/1 mask that multiplies the k-space weights of `A`.

    Each slice gets its own mask, from an int seed drawn from the torch generator (`torch.randint`), so
    the same generator state gives the same masks. Cartesian kinds select rows of `H` (module docstring);
    `"poisson"` is a 2D pattern with a `round(center_fraction * min(H, W))`-wide fully sampled square.

    Args:
        kind: `"random"`, `"equispaced"` (fastMRI's line masks) or `"poisson"` (2D Poisson disc).
        acceleration: target acceleration (>= 1; 1 = fully sampled).
        center_fraction: fraction of k-space (lines, or the calibration square's side) fully sampled at
            the centre, in (0, 1).
    """

    def __init__(self, kind: Literal["random", "equispaced", "poisson"], acceleration: float,
                 center_fraction: float = 0.08) -> None:
        if kind not in MASK_KINDS:
            raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
        self.kind = kind
        self.acceleration = _check_acceleration(acceleration)
        self.center_fraction = _check_center_fraction(center_fraction)

    def mask(self, height: int, width: int, seed: int) -> np.ndarray:
        """One mask, bool `[height, width]`, for the int `seed` (a RandomState seed for the line masks)."""
        if self.kind == "poisson":
            calib = round(self.center_fraction * min(height, width))
            return poisson_disc_mask(height, width, self.acceleration, calib, seed)
        lines = cartesian_mask(self.kind, height, self.acceleration, self.center_fraction,
                               np.random.RandomState(seed))
        return np.broadcast_to(lines[:, None], (height, width))

    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`{"mask": float32 [B, 1, H, W]}`, one mask per slice, seeds drawn with `generator`."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2 ** 31 - 1, (batch,), generator=generator, device=gen_device).tolist()
        masks = np.stack([self.mask(height, width, seed) for seed in seeds])
        return {"mask": torch.from_numpy(masks[:, None].astype(np.float32)).to(device)}

    @staticmethod
    def kspace_weights(params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The k-space weights this step contributes to `A`: `params["mask"]` (float32 `[B, 1, H, W]`), or
        `None` when the data are fully sampled (no `"mask"` key)."""
        return params.get("mask")
