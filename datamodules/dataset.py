"""Map-style slice datasets that degrade clean slices on the fly.

Geometry. H x W is the slice's native matrix (the stack [S, H, W] of `transforms.to_slices`) by default;
with `image_size` every slice is zero-padded to a square and resized to image_size x image_size (the explicit
resize path, `transforms.fit_to_square`); training samples with `crop_size` are crop_size x crop_size windows
(see `TrainSliceDataset`). `SliceDataset.item_shapes()` gives the (H, W) of each item, so a loader can batch
only items of one shape.

A sample is a `samples.SliceSample` (train / val / test: clean, degraded, y, regime, params, volume_id,
slice, scale) or, for prediction, a `samples.MeasuredSample` (no clean; the slice's native shape); their
fields' shapes, dtypes and units are documented there. The default collate stacks samples of one shape into a
batch of the same type.

The one seeding rule of the data: a training sample is a pure function of (seed, epoch, index) —
`TrainSliceDataset.generator` seeds the generator every draw of the sample comes from (regime, parameters,
noise, crop position, then the noise outside the slice of a crop that reaches past it); the epoch is set by
the loader's sampler (`set_epoch`). Epochs differ, the global RNG, worker counts and DDP ranks do not matter,
and a resumed run sees the same samples. (The model's own draws — DSM noise, diffusion times, dropout — follow
the loader's per-step seed, `datamodules.resumable`.)
Evaluation samples (val/test) use a generator seeded with a sha256 hash of (seed, volume id, slice, regime)
only: identical across runs, worker counts and DDP ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from datamodules import measured
from datamodules.kspace_files import is_kspace_input
from datamodules.samples import MeasuredSample, SliceSample
from datamodules.sources import VolumeRecord, VolumeSource
from datamodules.transforms import (
    CROP_COVERAGES,
    NORMALISE_PERCENTILE,
    crop,
    crop_origin,
    fit_to_square,
    foreground_fractions,
    from_slices,
    robust_scale,
    smooth_background_phase,
)
from degradations import (
    REGIMES,
    ComplexGaussianNoise,
    LowFieldDegradation,
    complex_to_channels,
    fft2c,
    make_regime,
)
from degradations.measurement import zero_filled_image
from lfmri_utils.errors import InputError
from lfmri_utils.options import Rule, check_options, number
from lfmri_utils.seeding import SEED_MOD, stable_hash
from lfmri_utils.volumes import check_volume

MIN_SIZE = 8  # smallest image_size / crop_size in pixels


@dataclass(frozen=True)
class SliceOptions:
    """How volumes become samples: one group, handed whole to every dataset (YAML `slices: {crop_size: 64,
    ...}`, command line `--data.init_args.slices.crop_size=64`), checked when made (InputError naming
    `slices.<field>`).

    Fields:
        image_size: None (default): every slice keeps its native matrix H x W (the stack of
            `transforms.to_slices`). An int (>= 8) opts into resizing: slices are zero-padded to a square and
            resized to image_size x image_size pixels (bilinear, antialiased; `transforms.fit_to_square`),
            which changes the pixel size the degradations act on.
        crop_size: None (default) or an int >= 8: training samples are random crop_size x crop_size pixel
            windows of the slice, degraded as a whole first (`TrainSliceDataset`). Validation, test, predict
            and whole volumes always see whole slices.
        crop_coverage: where the crops lie (`transforms.crop_origin`): "inside" (default) the slice, or
            "uniform": the crop's centre uniform over the slice, the crop reaching past the edges by up to
            crop_size / 2 (there the clean crop is 0 and the degraded one noise).
        slice_axis: the array axis of NIfTI volumes along which slices are taken (-3 to 2; fastMRI: always its
            axis 0).
        min_foreground_fraction: in [0, 1): slices whose fraction of pixels above 0.1 x the volume scale is
            smaller are dropped (training, validation, test; prediction keeps every slice).
        background_phase: multiply training and evaluation slices by a smooth random phase
            (`SliceDataset.normalised_slice` says why it is off by default).
        eval_per_volume: keep this many evenly spaced slices per validation / test volume (None: all).
    """

    image_size: int | None = None
    crop_size: int | None = None
    crop_coverage: Literal["inside", "uniform"] = "inside"
    slice_axis: int = 2
    min_foreground_fraction: float = 0.05
    background_phase: bool = False
    eval_per_volume: int | None = None

    #: ranges of the fields (their types are the annotations), checked in `__post_init__`
    RULES: ClassVar[dict[str, Rule]] = {
        "image_size": number(MIN_SIZE, integer=True, optional=True),
        "crop_size": number(MIN_SIZE, integer=True, optional=True),
        "crop_coverage": Rule(lambda v: isinstance(v, str) and v in CROP_COVERAGES,
                              f"one of {', '.join(CROP_COVERAGES)}"),
        "slice_axis": number(-3, 2, integer=True),
        "min_foreground_fraction": number(0, 1, high_open=True),
        "background_phase": Rule(lambda v: isinstance(v, bool), "true or false"),
        "eval_per_volume": number(1, integer=True, optional=True),
    }

    def __post_init__(self) -> None:
        check_options({f"slices.{k}": v for k, v in vars(self).items()},
                      {f"slices.{k}": rule for k, rule in self.RULES.items()})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (YAML, checkpoint hyper-parameters)."""
        return asdict(self)


@dataclass(frozen=True)
class PredictOptions:
    """What `lfmri predict` reconstructs: the measured volume(s) and what `lfmri reconstruct` takes beside
    them (YAML `predict: {path: lowfield.nii.gz, kspace: lowfield_k.h5}`, command line
    `--data.init_args.predict.path=...`), handed to `measured.load_measured_volume` for each volume.

    Fields:
        path: a low-field magnitude NIfTI, or a directory of them ("**/*.nii*"; no reference needed); or one
            k-space HDF5 file (`.h5` / `.hdf5`, `kspace_files.is_kspace_input`: fastMRI's layout, single- or
            multi-coil, undersampled or not, as `lfmri reconstruct K.h5` takes it), which carries its own
            measurement and record: `kspace` and `params` are then refused.
        kspace: the measured k-space HDF5 of `path` (`lfmri degrade --kspace-out`; `path` must be one NIfTI).
        params: `lfmri degrade`'s parameters JSON of `path` (one NIfTI; default: each NIfTI's + ".json" when
            it exists).
        noise_sigma: the k-space noise std per complex sample, input units (a k-space file's own units), >= 0
            (default: recorded, else estimated per slice).
        regime: the regime of the forward operator (`degradations.REGIMES`; None: the files' record, else
            "noise", A = fft2c), as `lfmri reconstruct --regime`.
    """

    path: str | None = None
    kspace: str | None = None
    params: str | None = None
    noise_sigma: float | None = None
    regime: str | None = None

    def __post_init__(self) -> None:
        check_options({"predict.noise_sigma": self.noise_sigma},
                      {"predict.noise_sigma": number(0, optional=True)})
        if self.regime is not None and self.regime not in REGIMES:
            raise InputError(f"predict.regime: unknown regime {self.regime!r}; choose from "
                             f"{', '.join(REGIMES)}")
        for name in ("kspace", "params"):
            if getattr(self, name) and not self.path:
                raise InputError(f"predict.{name}: give the NIfTI it belongs to as predict.path")
            if getattr(self, name) and is_kspace_input(self.path):
                raise InputError(f"predict.{name}: not with a k-space file predict.path ({self.path}), which "
                                 "carries its own measurement and record; give it only with a NIfTI")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (YAML, checkpoint hyper-parameters)."""
        return asdict(self)


@dataclass(frozen=True)
class VolumeInfo:
    """A volume ready for slicing: its normalisation scale (input units), kept slices and in-plane shape (h,
    w)."""

    record: VolumeRecord
    scale: float
    slices: tuple[int, ...]
    shape: tuple[int, int]


def index_volume(
    source: VolumeSource,
    record: VolumeRecord,
    min_foreground_fraction: float,
    percentile: float = NORMALISE_PERCENTILE,
) -> VolumeInfo:
    """Load a volume once, compute its scale (the `percentile` of |x|) and the slices whose fraction of pixels
    above 0.1 * scale is >= `min_foreground_fraction`. Raises InputError naming the file for a volume that
    fails lfmri's input rule (`lfmri_utils.volumes.check_volume`: slices under 7x7, all zero, a magnitude
    with negative voxels...) or whose scale is 0."""
    stack = source.load(record)
    where = record.path or record.volume_id
    # checked as stored, slices along the source's axis (None: the format's axis 0, as fastMRI's), so that
    # the message gives the file's own shape
    axis = 0 if source.slice_axis is None else source.slice_axis
    kind = "image" if np.iscomplexobj(stack) else "magnitude"
    check_volume(from_slices(stack, axis), where, axis, kind=kind)
    scale = robust_scale(stack, percentile)
    if not scale > 0:
        raise InputError(f"{where}: volume is empty (its {percentile}th percentile is 0)")
    keep = np.flatnonzero(foreground_fractions(stack, scale) >= min_foreground_fraction)
    if keep.size == 0:
        raise InputError(f"{where}: no slice has a foreground fraction >= {min_foreground_fraction}")
    return VolumeInfo(record, scale, tuple(int(s) for s in keep), (int(stack.shape[1]), int(stack.shape[2])))


def evenly_spaced(items: tuple[int, ...], n: int | None) -> tuple[int, ...]:
    """At most n items, evenly spaced over the sequence (all of them when n is None)."""
    if n is None or n >= len(items):
        return tuple(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return tuple(items[i] for i in picks)


class SliceDataset(Dataset):
    """Common base: per-process volume cache (each volume opened once per worker), clean-slice preparation
    and the shape of each item.

    `items` (set by the subclasses) lists the entries in order; each is a tuple whose first element is the
    volume's position in `volumes`. `slices` (`SliceOptions`) is the one group of options every dataset
    takes; of it the base reads `image_size` (None keeps the native matrix; an int resizes: see the module
    docstring) and `background_phase`. `seed` seeds the datasets' draws.
    """

    items: list[tuple]

    def __init__(
        self, source: VolumeSource, volumes: list[VolumeInfo], *, slices: SliceOptions = SliceOptions(),
        seed: int = 0,
    ) -> None:
        self.source = source
        self.volumes = volumes
        self.slices = slices
        self.image_size = slices.image_size
        self.background_phase = slices.background_phase
        self.seed = int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def sample_shape(self, v: int) -> tuple[int, int]:
        """(H, W) in pixels of the images of volume v's samples: the native slice shape, or (image_size,
        image_size)."""
        if self.image_size is not None:
            return self.image_size, self.image_size
        return self.volumes[v].shape

    def item_shapes(self) -> list[tuple[int, int]]:
        """(H, W) of each item's images, in item order."""
        return [self.sample_shape(item[0]) for item in self.items]

    def __getitem__(self, index: int) -> SliceSample | MeasuredSample:
        # Per-sample work is tiny: several intra-op threads only contend (on a busy 2-core machine, 50x
        # slower), so the main process (num_workers=0) uses one thread here; DataLoader workers use one.
        if get_worker_info() is not None:
            return self._get(index)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._get(index)
        finally:
            torch.set_num_threads(threads)

    def _get(self, index: int) -> SliceSample | MeasuredSample:
        raise NotImplementedError

    def _stack(self, v: int) -> np.ndarray:
        if v not in self._cache:
            self._cache[v] = self.source.open(self.volumes[v].record)
        return self._cache[v]

    def normalised_slice(self, v: int, s: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Slice s of volume v divided by the volume's scale, complex64 [1, 1, H, W] (native, or resized with
        `image_size`): the clean reference of training / evaluation data (prediction's measured slices are
        `measured.load_measured_volume`'s, `PredictSliceDataset`).

        With `background_phase` a smooth random phase (from `generator`) multiplies the magnitude. It is off
        by default: magnitude data has no phase, and a made-up phase teaches the prior a phase distribution
        that real low-field data need not have; it is there to make complex training images from magnitude
        volumes, e.g. when fine-tuning a prior that was trained on complex fastMRI images.
        """
        raw = torch.from_numpy(np.array(self._stack(v)[s]))
        x = raw.to(torch.complex64) / self.volumes[v].scale
        if self.image_size is not None:
            x = fit_to_square(x, self.image_size)
        if self.background_phase:
            if generator is None:
                raise ValueError("background_phase needs a generator")
            x = x * torch.exp(1j * smooth_background_phase(x.shape[-2:], generator))
        return x[None, None]

    def _degrade(
        self, v: int, s: int, degradation: LowFieldDegradation, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(clean x [1, 1, H, W], k-space y [1, C, H, W], params) of slice s of volume v, drawn from
        `generator` (the background phase first, then the degradation)."""
        x = self.normalised_slice(v, s, generator)
        y, params = degradation(x, generator)
        return x, y, params

    @staticmethod
    def degraded_image(y: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The degraded image complex64 [1, 1, H, W] of simulated k-space y [1, C, H, W] with its `params`:
        what its measurement's `degraded` is (`degradations.measurement.zero_filled_image`), the
        coil-combined zero-filled image `sum_c conj(s_c) ifft2c(y_c)`; `ifft2c(y)` for single-coil data."""
        return zero_filled_image(y, params)

    def _sample(
        self,
        v: int,
        s: int,
        regime: str,
        clean: torch.Tensor,
        degraded: torch.Tensor,
        y: torch.Tensor,
        params: dict[str, torch.Tensor],
    ) -> SliceSample:
        """The sample of complex clean and degraded [1, 1, H, W], y [1, C, H, W] and batched params."""
        return SliceSample(
            clean=complex_to_channels(clean)[0],
            degraded=complex_to_channels(degraded)[0].float(),
            y=y[0].to(torch.complex64),
            regime=regime,
            params={k: val[0] for k, val in params.items()},
            volume_id=self.volumes[v].record.volume_id,
            slice=torch.tensor(s, dtype=torch.int64),
            scale=torch.tensor(self.volumes[v].scale, dtype=torch.float32),
        )


class RegimeSliceDataset(SliceDataset):
    """Common base of the datasets that degrade clean slices with named regimes (training, evaluation):
    `regimes`, the names in order, and `degradations`, each name's `degradations.make_regime` (given
    `regime_overrides` as keyword arguments, lists as tuples); `slices` and `seed` as `SliceDataset`'s."""

    def __init__(
        self, source: VolumeSource, volumes: list[VolumeInfo], regimes: list[str], *,
        slices: SliceOptions = SliceOptions(), seed: int = 0, regime_overrides: dict | None = None,
    ) -> None:
        super().__init__(source, volumes, slices=slices, seed=seed)
        self.regimes = list(regimes)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (regime_overrides or {}).items()}
        self.degradations = {name: make_regime(name, **kwargs) for name in self.regimes}
        self.items = self.index()

    def index(self) -> list[tuple]:
        """The dataset's entries in order (`items`), each starting with its volume's position."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)


class TrainSliceDataset(RegimeSliceDataset):
    """Every kept slice of the training volumes; each access draws a regime from `regimes` and fresh
    parameters.

    With `crop_size` a sample is a random crop_size x crop_size window of the slice: the WHOLE slice is
    degraded first (the physics acts on the slice's grid: blur FWHM, T2* readout and B0 map in its pixels),
    then clean and degraded images are cut at the same window (`transforms.crop_origin` from the sample's
    generator, after the degradation's draws); `crop_size` and `crop_coverage` are the `slices` group's.
    `crop_coverage` "inside" (default): the window lies inside the
    slice. "uniform": its centre is uniform over the slice, so it may reach past the edges by up to
    crop_size / 2 (and slices smaller than the crop are used); there the clean crop and `b0_map_hz` are 0 and
    the degraded crop is what a measurement of empty space is: complex white Gaussian noise of std
    `noise_sigma` per complex pixel (the orthonormal FFT's image-domain level), drawn last from the generator.
    `y` is fft2c(degraded crop): not the measured k-space (a crop of an image is not a sub-sampling of its
    k-space) but the crop's own Fourier pair; training does not use it. `params` are the whole slice's, with
    `b0_map_hz` cropped to the window; `noise_sigma` is also the noise std per complex sample of the crop's
    `y` (orthonormal FFTs keep the level of white noise).

    Multi-coil and undersampled regimes (`regime_overrides` `coils`, `acceleration`: `make_regime`): every
    `degraded` image is the coil-combined zero-filled image of the measurement (`Measurement.degraded`, with
    its aliasing), whole slices carry y [C, H, W] (0 on the unsampled rows) and the `mask` / `sensitivities`
    params. A crop is cut from that combined image and its y is still fft2c(degraded crop), ONE channel [1,
    crop, crop] with no zero rows: a k-space mask does not crop and the coils are combined, so its params drop
    `mask` and `sensitivities` (the undersampling shows as the aliasing in the crop). Outside the slice the
    noise of a zero-filled image is drawn: std `noise_sigma * sqrt(f)` per complex pixel, f the mask's
    sampled fraction.
    """

    def __init__(
        self, source: VolumeSource, volumes: list[VolumeInfo], regimes: list[str], *,
        slices: SliceOptions = SliceOptions(), seed: int = 0, regime_overrides: dict | None = None,
    ) -> None:
        super().__init__(source, volumes, regimes, slices=slices, seed=seed,
                         regime_overrides=regime_overrides)
        self.crop_size = slices.crop_size
        self.crop_coverage = slices.crop_coverage
        self.epoch = 0

    def index(self) -> list[tuple]:
        """(volume, slice) for every kept slice."""
        return [(v, s) for v, info in enumerate(self.volumes) for s in info.slices]

    def sample_shape(self, v: int) -> tuple[int, int]:
        """(crop_size, crop_size) with crops, else the slice's (see `SliceDataset.sample_shape`)."""
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        return super().sample_shape(v)

    def set_epoch(self, epoch: int) -> None:
        """Mix the epoch into the per-sample seeds (the loader's sampler calls it every epoch)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        """The generator of training sample `index` in the current epoch: a pure function of (seed, epoch,
        index). Two hashes, as the samples were first seeded (a 62-bit draw seeded by ('sample', seed,
        epoch, index), then ('train', seed, epoch, index, draw)): streams stay bit-identical to earlier
        versions."""
        first = torch.Generator().manual_seed(stable_hash("sample", self.seed, self.epoch, index) % SEED_MOD)
        draw = int(torch.randint(0, 2**62, (1,), generator=first))
        return torch.Generator().manual_seed(stable_hash("train", self.seed, self.epoch, index, draw))

    def _get(self, index: int) -> SliceSample:
        v, s = self.items[index]
        g = self.generator(index)
        regime = self.regimes[int(torch.randint(len(self.regimes), (1,), generator=g))]
        x, y, params = self._degrade(v, s, self.degradations[regime], g)
        degraded = self.degraded_image(y, params)
        if self.crop_size is None:
            return self._sample(v, s, regime, x, degraded, y, params)
        top, left = crop_origin(x.shape[-2:], self.crop_size, g, self.crop_coverage)

        def window(image: torch.Tensor) -> torch.Tensor:
            return crop(image, top, left, self.crop_size)

        degraded = window(degraded)
        inside = window(torch.ones(x.shape[-2:], dtype=torch.bool))  # [size, size]: pixels of the slice
        if not bool(inside.all()):  # the window reaches past the slice: there, noise alone is measured
            sigma = params["noise_sigma"]
            if "mask" in params:  # a zero-filled image holds the sampled fraction of the noise variance
                sigma = sigma * (params["mask"] > 0).float().mean(dim=(1, 2, 3)).sqrt()
            noise = ComplexGaussianNoise.draw(degraded, sigma, g)
            degraded = torch.where(inside, degraded, noise)
        params = {k: val for k, val in params.items() if k not in ("mask", "sensitivities")}
        params["b0_map_hz"] = window(params["b0_map_hz"])
        return self._sample(v, s, regime, window(x), degraded, fft2c(degraded), params)


class EvalSliceDataset(RegimeSliceDataset):
    """(slice x regime) for each volume, in order; the degradation is a pure function of
    (seed, volume id, slice, regime). The `slices` group's `eval_per_volume` keeps that many evenly spaced
    kept slices per volume."""

    def index(self) -> list[tuple]:
        """(volume, slice, regime) for every evaluated slice and regime."""
        return [(v, s, r) for v, info in enumerate(self.volumes)
                for s in evenly_spaced(info.slices, self.slices.eval_per_volume) for r in self.regimes]

    def generator(self, v: int, s: int, regime: str) -> torch.Generator:
        """The generator of one evaluation sample (a pure function of seed, volume id, slice and regime)."""
        return torch.Generator().manual_seed(
            stable_hash("eval", self.seed, self.volumes[v].record.volume_id, s, regime)
        )

    def _get(self, index: int) -> SliceSample:
        v, s, regime = self.items[index]
        degradation = self.degradations[regime]
        x, y, params = self._degrade(v, s, degradation, self.generator(v, s, regime))
        return self._sample(v, s, regime, x, self.degraded_image(y, params), y, params)


class KSpaceFileSource(VolumeSource):
    """`predict.path` as one k-space HDF5 file (`kspace_files.is_kspace_input`): its one record (volume id and
    subject: the file name without its suffix) for `PredictSliceDataset.from_kspace_file`, and `slice_axis`
    the output's slice axis when the file records none (lfmri's files record theirs, which wins, as in
    `lfmri reconstruct K.h5`). The file is read by `measured.load_measured_volume`, as reconstruct reads it;
    `load` gives its zero-filled coil-combined magnitude slices."""

    name = "kspace-file"

    def __init__(self, path: str | Path, slice_axis: int | None = None) -> None:
        self.path = Path(path)
        self.slice_axis = slice_axis

    def records(self) -> list[VolumeRecord]:
        stem = self.path.name[: -len(self.path.suffix)]
        return [VolumeRecord(stem, stem, str(self.path))]

    def load(self, record: VolumeRecord) -> np.ndarray:
        """float32 [S, H, W], the file's units, lfmri's in-plane layout (phase encoding along H)."""
        volume = _predict_volume(record.path, PredictOptions(), self.slice_axis, None)
        return (volume.image[:, 0].abs() * volume.scale).numpy().astype(np.float32)


def _predict_volume(path: str | Path, predict: PredictOptions, slice_axis: int | None,
                    size: int | None) -> measured.MeasuredVolume:
    """One volume of `predict.path` prepared as `lfmri reconstruct` prepares its INPUT
    (`measured.load_measured_volume` with the `predict` group's options): a NIfTI sliced along `slice_axis`;
    a k-space file along the axis it records (reconstruct's default), else `slice_axis`, its messages naming
    predict.path."""
    kspace_file = is_kspace_input(path)
    return measured.load_measured_volume(
        path, predict.regime, None if kspace_file else slice_axis, kspace=predict.kspace,
        params=predict.params, noise_sigma=predict.noise_sigma, size=size, label="predict.path",
        default_axis=2 if slice_axis is None else slice_axis)


class PredictSliceDataset(SliceDataset):
    """All slices of the user's low-field volumes, without a reference: `MeasuredSample`s (no `clean`).

    Each volume is prepared as `lfmri reconstruct` prepares its input, by the same function
    (`measured.load_measured_volume` with the `predict` group's kspace, params, noise_sigma and regime:
    normalisation, the operator's parameters from `lfmri degrade`'s parameters JSON (given, or beside the
    file) or the k-space file, else the regime's mid-range ones; with the `slices` group's `image_size`,
    `MeasuredVolume.resized`), and its slices are served one by one: `degraded` the normalised measured image
    (real, imag), `y` its k-space fft2c, `regime` "measured", `params` the operator's parameters, with
    `noise_sigma` (float32 [], normalised units) only when the volume's noise std is known (given or
    recorded; else `ScoreModel.predict_step` estimates it from y), and `shape` (h, w) the slice's native
    shape (the output is put back on it by `measured.volume_from_slices`).

    A k-space file as `predict.path` (`from_kspace_file`, the volume `lfmri reconstruct K.h5` reconstructs):
    `y` is the file's measured k-space of the slice, complex64 [C, H, W] (normalised), `degraded` its
    zero-filled coil-combined image, and `params` hold its sampling `mask` float32 [1, H, W] (when the file
    is undersampled) and, for C > 1, the ESPIRiT `sensitivities` complex64 [C, H, W] estimated once when
    the file is read, so that `predict_step`'s `Measurement.from_kspace` is reconstruct's measurement.
    """

    def __init__(
        self, source: VolumeSource, volumes: list[VolumeInfo], *, slices: SliceOptions = SliceOptions(),
        predict: PredictOptions = PredictOptions(),
    ) -> None:
        super().__init__(source, volumes, slices=slices)
        self.predict = predict
        self.items = [(v, s) for v, info in enumerate(volumes) for s in info.slices]
        self._measured: dict[int, measured.MeasuredVolume] = {}

    @classmethod
    def from_kspace_file(cls, path: str | Path, *, slices: SliceOptions = SliceOptions(),
                         predict: PredictOptions = PredictOptions()) -> PredictSliceDataset:
        """The dataset of one k-space HDF5 file (`predict.path`), read now (its ESPIRiT maps estimated once),
        every slice at the file's own matrix, slices put back along the axis the file records, else along
        `slices.slice_axis`.
        InputError (one line) naming slices.image_size when it is set (coils and masks are not resampled) or
        the file when it is broken (`PredictOptions` refuses predict.kspace / predict.params with it)."""
        if slices.image_size is not None:
            raise InputError(f"slices.image_size: a k-space file predict.path ({path}) is reconstructed at "
                             "its own matrix (its coils and sampling mask are not resampled); leave it unset")
        source = KSpaceFileSource(path, slices.slice_axis % 3)
        record = source.records()[0]
        volume = _predict_volume(path, predict, source.slice_axis, None)
        dataset = cls(source, [VolumeInfo(record, volume.scale, tuple(range(len(volume))), volume.shape)],
                      slices=slices, predict=predict)
        dataset._measured[0] = volume
        return dataset

    def __len__(self) -> int:
        return len(self.items)

    def measured_volume(self, v: int) -> measured.MeasuredVolume:
        """Volume v prepared for reconstruction (read once per process)."""
        if v not in self._measured:
            self._measured[v] = _predict_volume(self.volumes[v].record.path, self.predict,
                                                self.source.slice_axis, self.image_size)
        return self._measured[v]

    def _get(self, index: int) -> MeasuredSample:
        v, s = self.items[index]
        volume = self.measured_volume(v)
        x = volume.image[s : s + 1]
        params = {k: val[s].clone() for k, val in volume.params.items()}  # not views of the volume
        if volume.noise_sigma is not None:
            params["noise_sigma"] = volume.noise_sigma[s].clone()
        return MeasuredSample(
            degraded=complex_to_channels(x)[0],
            y=fft2c(x)[0] if volume.kspace is None else volume.kspace[s].clone(),
            regime="measured",
            params=params,
            volume_id=self.volumes[v].record.volume_id,
            slice=torch.tensor(s, dtype=torch.int64),
            scale=torch.tensor(volume.scale, dtype=torch.float32),
            shape=torch.tensor(volume.shape, dtype=torch.int64),
        )
