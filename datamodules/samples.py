"""The samples of the slice datasets (`datamodules.dataset`) and their batches, as named tuples.

`SliceSample` is a training / validation / test sample (a clean slice and its simulated degradation),
`MeasuredSample` a prediction sample (a user's measured low-field slice: no clean reference). H x W is the
sample's grid: the slice's native matrix, image_size x image_size with the explicit resize, or a training
crop (see `datamodules.dataset`). Images are normalised: input units = normalised * `scale`.

A batch is the same type. Both are named tuples (`typing.NamedTuple` classes whose fields share one
spec, `COMMON_FIELDS`): torch's `default_collate` stacks samples of one shape into a `SliceSample` /
`MeasuredSample` whose tensors have a leading batch dimension B (`clean` float32 [B, 2, H, W], `slice` int64
[B], each `params` value batched), and whose strings are tuples of B strings (`regime`, `volume_id`:
default_collate zips a named tuple's fields, where a dict's values became lists); Lightning's device transfer
(`apply_to_collection`) and the loaders' `pin_memory` keep the type.
`sample._replace(clean=..., ...)` is a copy with other values.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

#: the fields both sample types have, in this order (`SliceSample` puts `clean` before them, `MeasuredSample`
#: adds `shape` after them): one spec, so the two types cannot drift apart
COMMON_FIELDS: tuple[tuple[str, type], ...] = (
    # float32 [2, H, W]: the image (real, imag): a SliceSample's degraded image, that of its measurement
    # (`degradations.Measurement.degraded`): the coil-combined zero-filled image sum_c conj(s_c) ifft2c(y_c),
    # i.e. complex_to_channels(ifft2c(y)) for single-coil data; a training crop's is cut from it (see
    # `TrainSliceDataset`); a MeasuredSample's normalised measured image
    ("degraded", Tensor),
    # complex64 [C, H, W]: the k-space (orthonormal `fft2c`): a SliceSample's simulated k-space of C coils
    # (C = 1 unless the regime has coils; exactly 0 on rows its `mask` does not sample); for a training crop
    # [1, H, W], fft2c of the cropped degraded image (not the measured k-space, no mask: see
    # `TrainSliceDataset`); a MeasuredSample's [1, H, W] fft2c of `degraded` (a NIfTI's), or a k-space
    # file's measured k-space of the slice [C, H, W] (`PredictSliceDataset.from_kspace_file`)
    ("y", Tensor),
    # the regime's name (`degradations.REGIMES`); "measured" for a MeasuredSample
    ("regime", str),
    # the forward operator's parameters (`degradations.build_operator`), one sample's slice of the full key
    # set (`degradations.neutral_params`): scalars [] (`fwhm_px` in pixels, `t2star_ms`, `snr_db`,
    # `noise_sigma` per complex k-space sample in normalised units, ...), `b0_map_hz` [1, H, W] in Hz; with
    # undersampling / coils (`make_regime`'s acceleration / coils) also `mask` float32 [1, H, W] (0/1) and
    # `sensitivities` complex64 [C, H, W] (not in training crops). A SliceSample's are the realised ones;
    # a MeasuredSample's are its volume's (`measured.load_measured_volume`: lfmri degrade's recorded ones,
    # else the regime's mid-range ones), with
    # `noise_sigma` only when the noise std is known (given or recorded; else it is estimated from y)
    ("params", dict[str, Tensor]),
    # the volume's id, unique in the source (`VolumeRecord.volume_id`): the subject id, or the file stem if
    # the subject has several volumes
    ("volume_id", str),
    # int64 []: the slice index in the volume's stack [S, H, W] (`transforms.to_slices`)
    ("slice", Tensor),
    # float32 []: the volume's normalisation scale (input units per normalised unit)
    ("scale", Tensor),
)


class SliceSample(NamedTuple("_SliceSampleFields", [("clean", Tensor), *COMMON_FIELDS])):
    """A training / validation / test sample (or a collated batch of them: module docstring).

    `clean`: float32 [2, H, W], the normalised clean slice (real, imag); then `COMMON_FIELDS`.
    """

    __slots__ = ()


class MeasuredSample(NamedTuple("_MeasuredSampleFields", [*COMMON_FIELDS, ("shape", Tensor)])):
    """A prediction sample: one slice of a user's low-field volume, without a reference (or a collated batch
    of them: module docstring). See `PredictSliceDataset`.

    `COMMON_FIELDS`, then `shape`: int64 [2], the slice's native (h, w) in pixels; equals (H, W) unless
    resized with `image_size`, where `transforms.restore_shape` puts outputs back on this grid.
    """

    __slots__ = ()
