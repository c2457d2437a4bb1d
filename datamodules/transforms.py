"""Per-volume normalisation and slice geometry (pure functions; numpy in, torch out).

- Slices: a volume [X, Y, Z] becomes a stack [S, H, W] with `to_slices(data, axis)` = `np.moveaxis(data, axis,
  0)`: the slice axis moves first and the other two keep their order and direction (no rotation or flip), so H
  is the first remaining array axis and W, the readout direction of the k-space the degradations simulate, the
  last. This is the one slice convention of `lfmri degrade`, the data module, `lfmri reconstruct` and the
  metrics. `from_slices` is the exact inverse.
- Normalisation: `robust_scale(volume)` is the 99.5th percentile of |volume| over all voxels (robust to a few
  bright voxels); normalised = volume / scale (not clipped), and input units = normalised * scale.
- Crops (training at native resolution): `crop_origin(shape, size, generator, coverage)` draws the top-left
  corner of a size x size window and `crop(x, top, left, size)` cuts it, zero-filled where the window reaches
  past the slice. Coverage "inside" (`random_crop_origin`): the window lies inside the slice (the data module
  then refuses a crop larger than a training slice), so border pixels are seen less often than central
  ones. "uniform": the window's centre is uniform over the slice's pixels and the window reaches past an edge
  by up to size / 2: along an axis of n >= size pixels, a pixel at least size / 2 from both edges is in the
  window with probability size / n and an edge pixel with about half that (a corner about a quarter).
- Resize (the data module's explicit `image_size` path): `fit_to_square(x, size)` zero-pads a slice [.., h, w]
  centred to a square of side max(h, w), then resizes it to size x size with bilinear interpolation and
  antialiasing (torch `interpolate(mode="bilinear", antialias=True, align_corners=False)`; real and imaginary
  parts separately). `restore_shape` inverts it (bilinear back to the square side, then the centre crop).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lfmri_utils.errors import InputError

NORMALISE_PERCENTILE = 99.5
#: where training crops may lie (`crop_origin`)
CROP_COVERAGES = ("inside", "uniform")


def to_slices(data: np.ndarray, axis: int) -> np.ndarray:
    """A 3D volume -> a view [S, H, W]: `np.moveaxis(data, axis, 0)` (the in-plane axes keep their order; W,
    the last, is the readout)."""
    return np.moveaxis(data, axis, 0)


def check_slice_axis(axis: int, label: str = "--slice-axis") -> int:
    """`axis` of a 3D volume (0, 1, 2, or -3 to -1 counted from the end) as 0, 1 or 2; InputError (one line,
    naming `label`) otherwise. The one check of the commands' `--slice-axis`."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
        raise InputError(f"{label}: {axis} is not an axis of a 3D volume (0, 1 or 2)")
    return int(axis) % 3


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `to_slices`: a stack [S, H, W] -> the volume with its slices along `axis`."""
    return np.moveaxis(stack, 0, axis)


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


def random_crop_origin(shape: tuple[int, int], size: int, generator: torch.Generator) -> tuple[int, int]:
    """The top-left corner (top, left) in pixels of a size x size window inside a slice of `shape` (h, w),
    each offset uniform over [0, n - size]; two draws from `generator` (top, then left). ValueError when the
    slice is smaller than the window."""
    if min(shape) < size:
        raise ValueError(f"a {size}x{size} crop does not fit in a {shape[0]}x{shape[1]} slice")
    top, left = (int(torch.randint(0, int(n) - size + 1, (1,), generator=generator)) for n in shape)
    return top, left


def crop_origin(
    shape: tuple[int, int], size: int, generator: torch.Generator, coverage: str = "inside"
) -> tuple[int, int]:
    """The top-left corner (top, left) in pixels of a size x size window on a slice of `shape` (h, w); two
    draws from `generator` (top, then left). "inside": `random_crop_origin`. "uniform": the window's centre
    pixel (top + size // 2, left + size // 2) is uniform over the slice's pixels, so each offset is uniform
    over [-(size // 2), n - 1 - size // 2] (the window may reach past the edges; any slice size)."""
    if coverage == "inside":
        return random_crop_origin(shape, size, generator)
    if coverage != "uniform":
        raise ValueError(f"crop coverage {coverage!r} is not one of {', '.join(CROP_COVERAGES)}")
    top, left = (int(torch.randint(0, int(n), (1,), generator=generator)) - size // 2 for n in shape)
    return top, left


def crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """The window [..., top : top + size, left : left + size] of x [..., h, w] (real or complex); pixels of
    the window outside x (negative or too large offsets) are 0."""
    h, w = x.shape[-2:]
    if 0 <= top and top + size <= h and 0 <= left and left + size <= w:
        return x[..., top : top + size, left : left + size]
    out = x.new_zeros(*x.shape[:-2], size, size)
    t0, t1, l0, l1 = max(top, 0), min(top + size, h), max(left, 0), min(left + size, w)
    if t0 < t1 and l0 < l1:
        out[..., t0 - top : t1 - top, l0 - left : l1 - left] = x[..., t0:t1, l0:l1]
    return out


def smooth_background_phase(
    shape: tuple[int, int], generator: torch.Generator, max_rad: float = math.pi, grid: int = 4
) -> torch.Tensor:
    """A smooth random phase map [H, W] in radians: bicubic upsampling of a grid x grid field, in [-max_rad,
    max_rad]."""
    coarse = (torch.rand(1, 1, grid, grid, generator=generator) * 2 - 1) * max_rad
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0].clamp(
        -max_rad, max_rad
    )
