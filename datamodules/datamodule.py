"""`LowFieldDataModule`: subject splits, slice datasets that degrade on the fly, and their loaders.

YAML (LightningCLI):

    data:
      class_path: datamodules.LowFieldDataModule
      init_args:
        source: bundled   # or a path (a BIDS directory, a fastMRI directory, a file), or a source block:
        slices:           # how volumes become samples (dataset.SliceOptions), handed to every dataset
          crop_size: 128  # train on random 128 x 128 crops; validate / test / predict on whole native slices
          crop_coverage: inside   # or uniform: crops reach past the slice edges (its borders seen as often)
        loader: {batch_size: 8, num_workers: 2}   # LoaderOptions
        predict: {path: lowfield.nii.gz, kspace: lowfield_k.h5}   # dataset.PredictOptions (lfmri predict)

    data:
      init_args:
        source:
          class_path: datamodules.sources.NiftiDirSource   # or FastMRISource, BundledSource, your own
          init_args: {root: /data/bids, pattern: "**/*_T2w.nii*"}

A string is shorthand, on the command line too: `--data.init_args.source=/data/bids`,
`--data.init_args.source=bundled`.
A source block carries its own options (root, pattern, fastMRI key, numbers of bundled subjects...); the data
module's `slices.slice_axis` applies to the shorthand, to a source block that leaves its slice_axis unset, and
to `predict.path` (a source block that sets a different one is refused).

The options that were flat init_args before they were grouped (`crop_size`, `batch_size`, `predict_path`,
...) are refused with one line naming their new spelling (`MOVED_OPTIONS`, `moved_option_message`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, default_collate

from datamodules.dataset import (
    EvalSliceDataset,
    PredictOptions,
    PredictSliceDataset,
    SliceDataset,
    SliceOptions,
    TrainSliceDataset,
    VolumeInfo,
    index_volume,
)
from datamodules.kspace_files import is_kspace_input
from datamodules.resumable import IgnoreStopSignals, resumable_loader
from datamodules.sources import (
    NiftiDirSource,
    VolumeRecord,
    VolumeSource,
    check_shorthand,
    make_source,
    skipped_summary,
    warn_skipped,
)
from datamodules.splits import SPLITS, Split, hash_split, load_split_file
from degradations import REGIMES, make_regime
from lfmri_utils.errors import InputError
from lfmri_utils.options import Rule, check_options, number

#: the data module's former flat init_args -> their place in today's groups (`moved_option_message`)
MOVED_OPTIONS: dict[str, str] = {
    **{name: f"slices.{name}" for name in ("image_size", "crop_size", "crop_coverage", "slice_axis",
                                           "min_foreground_fraction", "background_phase")},
    "eval_slices_per_volume": "slices.eval_per_volume",
    **{name: f"loader.{name}" for name in ("batch_size", "eval_batch_size", "num_workers", "pin_memory")},
    "predict_path": "predict.path",
}


def moved_option_message(name: str) -> str | None:
    """The one line for `name`, a former flat option of the data module ("crop_size"):
    "data.init_args.crop_size moved to data.init_args.slices.crop_size (YAML: slices: {crop_size: ...})";
    None for any other name."""
    if name not in MOVED_OPTIONS:
        return None
    return (f"data.init_args.{name} moved to data.init_args.{MOVED_OPTIONS[name]} "
            f"(YAML: {_nested(MOVED_OPTIONS[name])})")


def _nested(dotted: str) -> str:
    """"slices.crop_size" -> "slices: {crop_size: ...}"."""
    group, _, name = dotted.partition(".")
    return f"{group}: {{{name}: ...}}"


@dataclass(frozen=True)
class LoaderOptions:
    """How the data loaders run (YAML `loader: {batch_size: 8, num_workers: 2}`, command line
    `--data.init_args.loader.batch_size=4`), checked when made (InputError naming `loader.<field>`).

    Fields:
        batch_size: training batch size (>= 1).
        eval_batch_size: validation / test / predict batch size (default batch_size): at most that many
            consecutive items of one shape (`ShapeGroupedBatchSampler`), so a batch never mixes matrices.
        num_workers: DataLoader worker processes (>= 0).
        pin_memory: DataLoader pin_memory.
    """

    batch_size: int = 8
    eval_batch_size: int | None = None
    num_workers: int = 0
    pin_memory: bool = False

    #: ranges of the fields (their types are the annotations), checked in `__post_init__`
    RULES: ClassVar[dict[str, Rule]] = {
        "batch_size": number(1, integer=True),
        "eval_batch_size": number(1, integer=True, optional=True),
        "num_workers": number(0, integer=True),
        "pin_memory": Rule(lambda v: isinstance(v, bool), "true or false"),
    }

    def __post_init__(self) -> None:
        check_options({f"loader.{k}": v for k, v in vars(self).items()},
                      {f"loader.{k}": rule for k, rule in self.RULES.items()})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (YAML, checkpoint hyper-parameters)."""
        return asdict(self)


def _group(cls: type, value: Any, name: str) -> Any:
    """An options group (`SliceOptions`, `LoaderOptions`, `PredictOptions`) from itself, a mapping of its
    fields (a checkpoint's hyper-parameters, a Python caller), or None (the defaults); InputError naming
    `name` and an unknown key."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise InputError(f"{name}: expected a {cls.__name__} or a mapping of its fields, got "
                         f"{type(value).__name__}")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise InputError(f"{name}: unknown option(s) {', '.join(unknown)}; choose from {', '.join(fields)}")
    return cls(**value)


class ShapeGroupedBatchSampler(BatchSampler):
    """Batches of at most `batch_size` consecutive indices of `sampler` that share one image shape.

    `shapes[i]` is item i's (H, W) (`SliceDataset.item_shapes()`). A batch ends early where the shape changes,
    so batches of native-size slices never mix matrices, and items ordered by volume keep their order. It is a
    `BatchSampler` taking `sampler` first, so Lightning can swap in its distributed (or prediction) sampler,
    whose indices are grouped the same way. `drop_last` drops batches smaller than `batch_size`.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        shapes: Sequence[tuple[int, int]],
        drop_last: bool = False,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.shapes = [tuple(shape) for shape in shapes]

    def _grouped(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            if batch and (len(batch) == self.batch_size or self.shapes[index] != self.shapes[batch[0]]):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._grouped():
            if not (self.drop_last and len(batch) < self.batch_size):
                yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class EvalVolume:
    """One whole evaluation volume, its slices at their native matrix [H, W] (image_size x image_size with the
    data module's explicit `image_size`).

    clean [S, 2, H, W] float32 (normalised; input units = clean * scale), slices [S] (indices in the stack),
    scale (input units), meta (the source's metadata). With a regime: y [S, C, H, W] complex64 (C coils, 1
    without the coil step; zeros on unsampled rows), degraded [S, 2, H, W] (the coil-combined zero-filled
    image) and params (batched), identical to the val/test dataset's samples.
    """

    volume_id: str
    clean: torch.Tensor
    slices: torch.Tensor
    scale: float
    meta: dict[str, Any]
    regime: str | None = None
    y: torch.Tensor | None = None
    degraded: torch.Tensor | None = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class LowFieldDataModule(L.LightningDataModule):
    """Clean high-field slices and their simulated low-field versions, split by subject.

    Args:
        source: a `VolumeSource` (`datamodules.sources`: `NiftiDirSource(root, pattern)`,
            `FastMRISource(root, pattern, key)`, `BundledSource(n_train, n_val, seed)`, or your own subclass;
            a `class_path` block in YAML), which carries its own options; or a string as shorthand: "bundled"
            (`BundledSource()`: real MRI shipped with the environment; its split is fixed) or a path to a
            directory or file (`FastMRISource(path)` if it holds .h5 files, else `NiftiDirSource(path)`, with
            their default patterns "**/*.h5" / "**/*.nii*" and key "auto"). "nifti" / "fastmri" without a
            path are refused. A source object is kept in the hyperparameters (and checkpoints) as its
            `class_path` block (`VolumeSource.config()`).
        slices: how volumes become samples, one group handed whole to every dataset
            (`dataset.SliceOptions`: image_size, crop_size, crop_coverage, slice_axis,
            min_foreground_fraction, background_phase, eval_per_volume; a mapping of them is read too).
            What the data module adds: with crop_size (and crop_coverage "inside") a training slice smaller
            than the crop is refused at setup (InputError); without crops (and without image_size) training
            uses whole native slices, which batch only when all training slices share a shape (setup raises
            InputError otherwise, unless loader.batch_size is 1). On the bundled training data (slice axis 2)
            the background fraction (|clean| < 0.1 x the slice's maximum; mean over all slices and window
            positions) is 0.53 in whole slices, 0.29 in "inside" 64 x 64 crops and 0.55 in "uniform" ones.
            slice_axis applies to the string shorthand's source, to a source object whose own slice_axis is
            None (it is set to this), and to predict.path; a source object with another slice_axis is
            refused (InputError).
        regimes: training regimes, one drawn per sample (default: all four).
        eval_regimes: val/test regimes, each slice enumerated with each (default: all four).
        regime_overrides: keyword arguments for every `make_regime` call (e.g. {snr_db_range: [2, 7]}),
            checked by the degradations themselves when the data module is built.
        seed: seeds the hash split, the training draws and the val/test degradations.
        val_fraction, test_fraction: hash split fractions of subjects (ignored with split_file or bundled).
        split_file: YAML {train: [...], val: [...], test: [...]} of subject ids.
        skip_bad_files: skip unreadable / invalid volumes with one warning listing them, instead of an error.
        loader: `LoaderOptions` (batch_size, eval_batch_size, num_workers, pin_memory).
        predict: `dataset.PredictOptions` of `predict` (path: a low-field NIfTI file or directory, or one
            k-space HDF5 file as `lfmri reconstruct K.h5` takes it, no reference, all slices kept; kspace,
            params, noise_sigma, regime: as `lfmri reconstruct`'s).

    What a crop-trained prior can and cannot do: the U-Net is convolutional, so a prior trained on crops
    runs on whole slices of any matrix (the network pads to its size multiple). It learns the local statistics
    of the anatomy (edges, textures, contrast, noise-free appearance) within a crop's field of view, at the
    pixel size of the native grid. It does not learn global shape or position priors beyond the crop (where
    the brain sits in the field of view, the symmetry of the hemispheres, the overall outline), and its
    attention blocks see only crop-sized context in training, so on whole slices they extrapolate. Make crops
    large enough to hold the structures that matter, and keep the pixel size of training and reconstruction
    data alike (no resizing on either side).
    """

    #: ranges of the options (their types are the signature's); checked first in `__init__` (the groups check
    #: their own fields when they are made)
    OPTION_RULES = {
        "val_fraction": number(0, 1, high_open=True),
        "test_fraction": number(0, 1, high_open=True),
    }

    def __init__(
        self,
        source: VolumeSource | str = "bundled",
        slices: SliceOptions = SliceOptions(),
        regimes: list[str] | None = None,
        eval_regimes: list[str] | None = None,
        regime_overrides: dict[str, Any] | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_file: str | None = None,
        skip_bad_files: bool = False,
        loader: LoaderOptions = LoaderOptions(),
        predict: PredictOptions = PredictOptions(),
    ) -> None:
        # the groups as options objects, and as plain mappings in the hyper-parameters (which
        # `save_hyperparameters` reads from this frame): checkpoints load with weights_only=True
        slices_options = _group(SliceOptions, slices, "slices")
        loader_options = _group(LoaderOptions, loader, "loader")
        predict_options = _group(PredictOptions, predict, "predict")
        slices, loader = slices_options.to_dict(), loader_options.to_dict()
        predict = predict_options.to_dict()
        super().__init__()
        # Kept in checkpoints but not merged into the loggers' hyperparameters: Lightning refuses to log one
        # key that the model and the data module both have with two values. `lfmri` logs the whole config
        # (data included) itself (`LogConfigCallback`).
        self.save_hyperparameters(logger=False)
        check_options(self.hparams, self.OPTION_RULES)  # before anything is read or built
        if isinstance(source, str):
            check_shorthand(source)
        elif isinstance(source, VolumeSource):
            source.use_slice_axis(slices_options.slice_axis % 3)
            # kept as its class_path block: plain values, so a checkpoint still loads with weights_only=True
            self.hparams["source"] = source.config()
        else:
            raise InputError(f"source: expected a VolumeSource or a string (bundled or a path), got "
                             f"{type(source).__name__}")
        self.regimes = list(regimes) if regimes else list(REGIMES)
        self.eval_regimes = list(eval_regimes) if eval_regimes else list(REGIMES)
        for option, names in (("regimes", self.regimes), ("eval_regimes", self.eval_regimes)):
            for name in names:
                if name not in REGIMES:
                    raise InputError(f"{option}: unknown regime {name!r}; choose from "
                                     f"{', '.join(REGIMES)}")
        for name in REGIMES:  # the degradations' own checks of the overrides, once, now
            try:
                make_regime(name, **dict(regime_overrides or {}))
            except (TypeError, ValueError) as err:
                raise InputError(f"regime_overrides: {err}") from None
        self.source_arg = source
        self.slices: SliceOptions = slices_options
        self.loader: LoaderOptions = loader_options
        self.predict: PredictOptions = predict_options
        self.regime_overrides = dict(regime_overrides or {})
        self.seed = seed
        self.val_fraction, self.test_fraction, self.split_file = val_fraction, test_fraction, split_file
        self.skip_bad_files = skip_bad_files
        self._source: VolumeSource | None = None
        self._split: Split | None = None
        self._infos: dict[str, list[VolumeInfo]] = {}
        self.skipped: list[str] = []
        self._skipped_by_split: dict[str, list[str]] = {}
        self.train_dataset: TrainSliceDataset | None = None
        self.val_dataset: EvalSliceDataset | None = None
        self.test_dataset: EvalSliceDataset | None = None
        self.predict_dataset: PredictSliceDataset | None = None

    # ---- sources and splits -------------------------------------------------------------------------------
    @property
    def source(self) -> VolumeSource:
        """The volume source (built on first use)."""
        if self._source is None:
            self._source = make_source(self.source_arg, self.slices.slice_axis % 3)
        return self._source

    @property
    def split(self) -> Split:
        """Subject ids per split: the source's own (bundled), the split file's, or the seeded hash split."""
        if self._split is None:
            subjects = sorted({r.subject for r in self.source.records()})
            if self.source.fixed_split is not None:
                if self.split_file:
                    raise InputError(
                        f"{self.split_file}: source {self.source.name!r} fixes its own split; "
                        "remove split_file"
                    )
                self._split = self.source.fixed_split
            elif self.split_file:
                self._split = load_split_file(self.split_file, subjects)
            else:
                self._split = hash_split(subjects, self.seed, self.val_fraction, self.test_fraction)
        return self._split

    def records(self, split: str) -> list[VolumeRecord]:
        """The volumes of the split's subjects."""
        subjects = set(self.split[split])
        return [r for r in self.source.records() if r.subject in subjects]

    def _index(self, source: VolumeSource, records: list[VolumeRecord], min_fg: float) -> list[VolumeInfo]:
        infos, skipped = [], []
        for record in records:
            try:
                infos.append(index_volume(source, record, min_fg))
            except InputError as err:
                if not self.skip_bad_files:
                    raise
                skipped.append(str(err))
        self.skipped += skipped
        warn_skipped(skipped)
        return infos

    def volume_infos(self, split: str) -> list[VolumeInfo]:
        """Indexed volumes of a split (each volume loaded once here to find its scale and kept slices)."""
        if split not in self._infos:
            before = len(self.skipped)
            infos = self._index(self.source, self.records(split), self.slices.min_foreground_fraction)
            self._skipped_by_split[split] = self.skipped[before:]
            if not infos and self.split[split]:
                message = self.empty_split_reason(split)
                if split == "train":
                    raise InputError(message)
                warnings.warn(message, stacklevel=2)
            self._infos[split] = infos
        return self._infos[split]

    def empty_split_reason(self, split: str) -> str:
        """Why `split` has no usable volume, on one line: no subjects, or every file of its subjects skipped
        (`skip_bad_files`: the first ones named with their reasons, and a count)."""
        if not self.split[split]:
            return f"the {split} split has no subjects"
        skipped = self._skipped_by_split.get(split, [])
        reason = f": {skipped_summary(skipped)}" if skipped else ""
        return f"no usable volume left in the {split} split{reason}"

    # ---- datasets -----------------------------------------------------------------------------------------
    def eval_dataset(self, volumes: list[VolumeInfo], regimes: list[str] | None = None) -> EvalSliceDataset:
        """The evaluation dataset of `volumes` (e.g. `volume_infos(split)`) with `regimes` (default
        `eval_regimes`), the data module's `slices`, seed and regime overrides."""
        return EvalSliceDataset(self.source, volumes, self.eval_regimes if regimes is None else regimes,
                                slices=self.slices, seed=self.seed, regime_overrides=self.regime_overrides)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs ("fit", "validate", "test", "predict"; None: fit + test)."""
        if stage in ("fit", None) and self.train_dataset is None:
            train = TrainSliceDataset(self.source, self.volume_infos("train"), self.regimes,
                                      slices=self.slices, seed=self.seed,
                                      regime_overrides=self.regime_overrides)
            crop_size = self.slices.crop_size
            slice_shapes = [SliceDataset.sample_shape(train, v) for v in range(len(train.volumes))]
            too_small = [(info, shape) for info, shape in zip(train.volumes, slice_shapes, strict=True)
                         if crop_size and self.slices.crop_coverage == "inside" and min(shape) < crop_size]
            if too_small:
                info, (h, w) = too_small[0]
                raise InputError(
                    f"slices.crop_size {crop_size} is larger than the {h}x{w} slices of training volume "
                    f"{info.record.path or info.record.volume_id} ({len(too_small)} volume(s) so): choose a "
                    "crop_size no larger than the smallest training slice, or slices.crop_coverage uniform"
                )
            shapes = sorted(set(train.item_shapes()))
            if len(shapes) > 1 and self.loader.batch_size > 1:
                listed = ", ".join(f"{h}x{w}" for h, w in shapes[:6]) + (", ..." if len(shapes) > 6 else "")
                raise InputError(
                    f"the training slices have {len(shapes)} different shapes ({listed}) and whole native "
                    "slices batch only when they share one: set slices.crop_size (random crops, e.g. the "
                    "model's image_size), or slices.image_size (resize every slice), or loader.batch_size 1"
                )
            self.train_dataset = train
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = self.eval_dataset(self.volume_infos("val"))
        if stage in ("test", None) and self.test_dataset is None:
            self.test_dataset = self.eval_dataset(self.volume_infos("test"))
        if stage == "predict" and self.predict_dataset is None:
            self.predict_dataset = self._predict_dataset()

    def _predict_dataset(self) -> PredictSliceDataset:
        """The `predict` group's volumes: InputError without a path, or with a k-space or parameters file for
        a directory of volumes (each file belongs to one NIfTI). A k-space HDF5 file as the path
        (`is_kspace_input`) is one volume, read as `lfmri reconstruct K.h5` reads it
        (`PredictSliceDataset.from_kspace_file`)."""
        path = self.predict.path
        if not path:
            raise InputError("predict needs a low-field NIfTI or a k-space file: "
                             "--data.init_args.predict.path=PATH")
        if is_kspace_input(path):
            return PredictSliceDataset.from_kspace_file(path, slices=self.slices, predict=self.predict)
        for name in ("kspace", "params"):
            if getattr(self.predict, name) and Path(path).is_dir():
                raise InputError(f"predict.{name}: belongs to one NIfTI, but predict.path {path} is a "
                                 "directory: give the NIfTI file")
        source = NiftiDirSource(path, "**/*.nii*", self.slices.slice_axis % 3)
        return PredictSliceDataset(source, self._index(source, source.records(), 0.0), slices=self.slices,
                                   predict=self.predict)

    def _eval_loader(self, dataset: SliceDataset | None) -> DataLoader:
        """In order, in batches of at most `eval_batch_size` consecutive items of one shape."""
        if dataset is None:
            raise RuntimeError("call setup() for this stage first")
        batches = ShapeGroupedBatchSampler(
            SequentialSampler(dataset), self.loader.eval_batch_size or self.loader.batch_size,
            dataset.item_shapes()
        )
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.loader.num_workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=False,
            # Ctrl-C / SIGTERM are the main process's to handle (InterruptCheckpoint), as in training; a
            # partly read validation loader (limit_val_batches) keeps its workers alive during training
            worker_init_fn=IgnoreStopSignals(),
        )

    def train_dataloader(self) -> DataLoader:
        """Seeded, shuffled, sharded over the trainer's ranks and resumable mid-epoch (see `resumable`)."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() for this stage first")
        trainer = self.trainer
        return resumable_loader(
            self.train_dataset,
            self.loader.batch_size,
            self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            num_workers=self.loader.num_workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_dataset)

    # ---- whole volumes ------------------------------------------------------------------------------------
    def volumes(self, split: str, regime: str | None = None) -> Iterator[EvalVolume]:
        """Whole volumes of a split (all kept slices, or `slices.eval_per_volume` of them), each slice at its
        native matrix (or at image_size with the explicit resize).

        With `regime`, each slice also carries the same degradation as the val/test dataset's sample.
        """
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        # without a regime the (cheapest) degradation is built but not returned
        ds = self.eval_dataset(self.volume_infos(split), [regime or "noise"])
        for v, info in enumerate(ds.volumes):
            batch = default_collate([ds[i] for i, item in enumerate(ds.items) if item[0] == v])
            out = EvalVolume(
                info.record.volume_id,
                batch.clean,
                batch.slice,
                info.scale,
                self.source.metadata(info.record),
            )
            if regime:
                out.regime, out.y, out.degraded, out.params = (
                    regime,
                    batch.y,
                    batch.degraded,
                    batch.params,
                )
            yield out
