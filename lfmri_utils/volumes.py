"""The one rule for what an input volume or measurement may be (numpy only), checked at every entry: `lfmri
degrade`'s input, `lfmri reconstruct`'s NIfTI and `--kspace` file, `lfmri metrics`' REF and PRED, and every
volume the data module indexes.

`check_volume` refuses, with an `InputError` naming the file (one line), an array that is not 3D, has NaN or
Inf, has no slice along the slice axis or slices smaller than `MIN_SLICE_SIZE` x `MIN_SLICE_SIZE` in either
in-plane axis, is all zero, or (a magnitude) has negative values beyond `NEGATIVE_TOLERANCE`.

Minimum slice: SSIM's 7 x 7 window (fastMRI's metric; `lfmri_utils.metrics` takes `SSIM_WIN_SIZE` from
here): a smaller slice cannot be scored. The networks need no more: they pad any H x W to their size multiple
(reflect, or replicate on an axis shorter than the pad: `diffusion.sampling.sde.pad_to_multiple`), and
the degradations and the noise estimate work on any matrix.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lfmri_utils.errors import InputError

__all__ = ["MIN_SLICE_SIZE", "NEGATIVE_TOLERANCE", "SSIM_WIN_SIZE", "VolumeKind", "check_volume"]

#: the side of SSIM's uniform window (fastMRI, scikit-image: 7 x 7)
SSIM_WIN_SIZE = 7
#: the smallest in-plane slice side lfmri takes: a slice must hold one SSIM window
MIN_SLICE_SIZE = SSIM_WIN_SIZE
#: a magnitude voxel may be this far below 0, relative to the volume's largest |value|, before it counts as
#: negative: float32 round-off of interpolation (about 1e-7 of the peak); real undershoot is refused
NEGATIVE_TOLERANCE = 1e-6

#: what the array holds: a real magnitude volume, a complex image volume, or measured k-space
VolumeKind = Literal["magnitude", "image", "kspace"]
_UNITS = {"magnitude": "voxel", "image": "voxel", "kspace": "k-space sample"}


def check_volume(data: np.ndarray, where: str, slice_axis: int, *, kind: VolumeKind,
                 allow_all_zero: bool = False) -> None:
    """Refuse (`InputError`, one line starting with `where`) what lfmri cannot take as a volume / measurement.

    `data` is 3D with its slices along `slice_axis`; the checks, in order: 3D; finite; at least one slice,
    each at least `MIN_SLICE_SIZE` x `MIN_SLICE_SIZE`; not all zero (unless `allow_all_zero`: a prediction
    may be empty, a measurement may not); and for `kind` "magnitude" real with no value below
    `-NEGATIVE_TOLERANCE * max|data|` (the message gives the count and the minimum). Values within that
    tolerance are accepted unchanged: they are round-off of interpolated templates, not signal. Complex
    images and k-space have no sign rule.
    """
    shape = tuple(int(n) for n in data.shape)
    if len(shape) != 3:
        raise InputError(f"{where}: expected a 3D volume, got a {len(shape)}D array of shape {shape}")
    unit = _UNITS[kind]
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{where}: {bad} {unit}(s) are NaN or Inf")
    axis = slice_axis % 3
    height, width = (n for i, n in enumerate(shape) if i != axis)
    if shape[axis] < 1 or min(height, width) < MIN_SLICE_SIZE:
        raise InputError(f"{where}: the slices along axis {axis} of this {shape} array are {height}x{width} "
                         f"({shape[axis]} of them); lfmri needs at least one slice of at least "
                         f"{MIN_SLICE_SIZE}x{MIN_SLICE_SIZE} (SSIM's window)")
    if not allow_all_zero and not np.any(data):
        raise InputError(f"{where}: every {unit} is zero: nothing was measured")
    if kind == "magnitude":
        if np.iscomplexobj(data):
            raise InputError(f"{where}: complex data; expected a magnitude (real) volume")
        negative = data < -NEGATIVE_TOLERANCE * float(np.max(np.abs(data), initial=0.0))
        count = int(np.count_nonzero(negative))
        if count:
            raise InputError(f"{where}: {count} voxel(s) are negative (minimum {float(data.min()):g}); a "
                             "magnitude volume has none (clip interpolation undershoot to 0 first)")
