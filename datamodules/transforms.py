"""Per-volume normalisation and slice geometry (pure functions; numpy in, torch out).

- Slices: a NIfTI volume [X, Y, Z] becomes a stack [S, H, W] with `to_slices(data, axis)`: the slice axis
  moves first and each slice is turned by 90 degrees (np.rot90) so that, for an axial RAS volume, anterior is
  up. `from_slices` is the exact inverse.
- Normalisation: `robust_scale(volume)` is the 99.5th percentile of |volume| over all voxels (robust to a few
  bright voxels); normalised = volume / scale (not clipped), and input units = normalised * scale.
- Geometry: `fit_to_square(x, size)` zero-pads a slice [.., h, w] centred to a square of side max(h, w), then
  resizes it to size x size with bilinear interpolation and antialiasing (torch `interpolate(mode="bilinear",
  antialias=True, align_corners=False)`; real and imaginary parts separately). `restore_shape` inverts it
  (bilinear back to the square side, then the centre crop).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NORMALISE_PERCENTILE = 99.5


def to_slices(data: np.ndarray, axis: int) -> np.ndarray:
    """A 3D volume -> a view [S, H, W]: slice axis first, each slice turned 90 degrees (anterior up for
    RAS)."""
    return np.rot90(np.moveaxis(data, axis, 0), k=1, axes=(1, 2))


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `to_slices`: a stack [S, H, W] -> the volume with its slices along `axis`."""
    return np.moveaxis(np.rot90(stack, k=-1, axes=(1, 2)), 0, axis)


def robust_scale(volume: np.ndarray, percentile: float = NORMALISE_PERCENTILE) -> float:
    """The `percentile`-th percentile of |volume| (input units); 0 for an empty volume."""
    return float(np.percentile(np.abs(volume), percentile))


def foreground_fractions(stack: np.ndarray, scale: float, threshold: float = 0.1) -> np.ndarray:
    """Per slice of a stack [S, H, W]: the fraction of pixels with |x| > threshold * scale. Shape [S]."""
    return (np.abs(stack) > threshold * scale).reshape(stack.shape[0], -1).mean(axis=1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    if flat.is_complex():
        parts = [
            F.interpolate(p, size=size, mode="bilinear", antialias=True, align_corners=False)
            for p in (flat.real, flat.imag)
        ]
        out = torch.complex(parts[0], parts[1])
    else:
        out = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, *size)


def fit_to_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a slice [..., h, w] (real or complex) centred to a square, then resize it to [..., size,
    size]."""
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    x = F.pad(x, (left, side - w - left, top, side - h - top)) if (h, w) != (side, side) else x
    return _resize(x, (size, size))


def restore_shape(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `fit_to_square`: [..., size, size] -> [..., h, w] (bilinear back to the square, centre
    crop)."""
    h, w = int(shape[0]), int(shape[1])
    side = max(h, w)
    x = _resize(x, (side, side))
    top, left = (side - h) // 2, (side - w) // 2
    return x[..., top : top + h, left : left + w]


def smooth_background_phase(
    shape: tuple[int, int], generator: torch.Generator, max_rad: float = math.pi, grid: int = 4
) -> torch.Tensor:
    """A smooth random phase map [H, W] in radians: bicubic upsampling of a grid x grid field, in [-max_rad,
    max_rad]."""
    coarse = (torch.rand(1, 1, grid, grid, generator=generator) * 2 - 1) * max_rad
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0].clamp(
        -max_rad, max_rad
    )
