"""Volume sources: where the clean (high-field) volumes come from.

A source lists `VolumeRecord`s (one per volume, each with the subject it belongs to) and loads a volume as a
slice stack [S, H, W] (float32 magnitude or complex64), validated (3D, finite). Three kinds:

- `NiftiDirSource`: NIfTI files under a directory (recursive glob, default "**/*.nii*"); the subject id is the
  BIDS `sub-<label>` entity of the path, else the file name without its extension.
- `FastMRISource`: fastMRI HDF5 files; `reconstruction_rss` (magnitude) or `kspace` (multi-coil [S, C, H, W]
  -> root-sum-of-squares of the coil images; single-coil [S, H, W] -> the complex image), slices along axis 0.
- `BundledSource`: real MRI installed with the Python environment (no download); see its docstring.

A source object carries its own options (root, pattern, key, numbers of subjects...); in a LightningCLI
config it is a `class_path` block, e.g.
`source: {class_path: datamodules.sources.NiftiDirSource, init_args: {root: /data}}`.
`make_source(...)` turns the data module's string shorthand ("bundled" or a path) into one.

Slice axis: `NiftiDirSource` and `BundledSource` take slices along `slice_axis`; left None (the default), a
data module sets it to its own `slices.slice_axis` (`use_slice_axis`), and a source used alone slices along
axis 2.
fastMRI files are always sliced along their axis 0.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.io import NIFTI_SUFFIXES, load_nifti
from datamodules.splits import Split
from datamodules.transforms import to_slices
from degradations import ifft2c
from lfmri_utils.errors import InputError
from lfmri_utils.seeding import stable_hash

_BIDS_SUBJECT = re.compile(r"(?:^|[/_])(sub-[A-Za-z0-9]+)(?=[/_.]|$)")


@dataclass(frozen=True)
class VolumeRecord:
    """One volume: `volume_id` is unique in the source (the samples' `volume_id`); `subject` is the split
    unit (one subject may have several volumes)."""

    volume_id: str
    subject: str
    path: str | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class VolumeSource:
    """Base class: `records()` lists the volumes, `load(record)` reads one as a validated stack [S, H, W]."""

    name = "source"
    #: a source that fixes its own split (the bundled data) sets this
    fixed_split: Split | None = None
    #: the array axis slices are taken along, for a source with that option (None: not set, or fixed by the
    #: format as fastMRI's axis 0)
    slice_axis: int | None = None

    def use_slice_axis(self, axis: int) -> None:
        """A data module's `slices.slice_axis` for this source. The base class's formats fix their own
        slicing, so this does nothing; a source with a `slice_axis` option takes `axis` if it was left
        None."""

    def config(self) -> dict[str, Any]:
        """`{"class_path": ..., "init_args": {...}}`: the source as a LightningCLI block (plain values, for
        the data module's hyperparameters and checkpoints). init_args are the constructor's parameters read
        back from the attributes of the same name."""
        init_args = {}
        for name in list(inspect.signature(type(self).__init__).parameters)[1:]:
            if hasattr(self, name):
                value = getattr(self, name)
                init_args[name] = str(value) if isinstance(value, os.PathLike) else value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def records(self) -> list[VolumeRecord]:
        raise NotImplementedError

    def load(self, record: VolumeRecord) -> np.ndarray:
        """The whole volume, validated: float32 or complex64 [S, H, W]. Raises InputError naming the file."""
        raise NotImplementedError

    def open(self, record: VolumeRecord) -> np.ndarray:
        """The volume for a worker's cache (may be memory-mapped; already validated by `load`). [S, H, W]."""
        return self.load(record)

    def metadata(self, record: VolumeRecord) -> dict[str, Any]:
        """What the source knows about the volume (path, affine, header fields...)."""
        return {"path": record.path, **record.info}


class _AxisSource(VolumeSource):
    """A source with a `slice_axis` option: 0, 1 or 2, or None (the data module's `slices.slice_axis`; axis 2
    when the source is used alone)."""

    def _set_slice_axis(self, slice_axis: int | None) -> None:
        if slice_axis is not None and slice_axis not in (0, 1, 2):
            raise InputError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        self.slice_axis = slice_axis

    @property
    def _axis(self) -> int:
        return 2 if self.slice_axis is None else self.slice_axis

    def use_slice_axis(self, axis: int) -> None:
        if self.slice_axis is None:
            self.slice_axis = axis
        elif self.slice_axis != axis:
            raise InputError(f"slice_axis: the {self.name} source's slice_axis {self.slice_axis} differs "
                             f"from the data module's {axis}; set it once, on the data module (slices: "
                             f"{{slice_axis: {self.slice_axis}}}), which slices predict.path along it too")


def _check_stack(stack: np.ndarray, where: str) -> np.ndarray:
    if stack.ndim != 3:
        raise InputError(f"{where}: expected a 3D volume, got shape {tuple(stack.shape)}")
    if min(stack.shape) < 1:
        raise InputError(f"{where}: empty volume of shape {tuple(stack.shape)}")
    if not np.all(np.isfinite(stack)):
        raise InputError(f"{where}: volume contains NaN or infinite values")
    return stack


def _unique_ids(subjects: list[str], stems: list[str], rel: list[str]) -> list[str]:
    """Volume ids: the subject id if the subject has one volume, else the file stem (or relative path)."""
    ids = [subj if subjects.count(subj) == 1 else stem for subj, stem in zip(subjects, stems, strict=True)]
    return [i if ids.count(i) == 1 else r for i, r in zip(ids, rel, strict=True)]


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".h5", ".hdf5"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _glob(root: Path, pattern: str, kind: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files under `root` matching `pattern` (`root` itself if it is a file) whose names end with one of
    `suffixes` (case-insensitive; none: any), sorted; InputError when there are none."""
    if not root.exists():
        raise InputError(f"{root}: data directory not found")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.glob(pattern) if p.is_file() and p.name.lower().endswith(suffixes or ""))
    if not files:
        raise InputError(f"{root}: no {kind} files match the pattern {pattern!r}")
    return files


def _records_for(root: Path, files: list[Path]) -> list[VolumeRecord]:
    rel = [str(p.relative_to(root)) if root.is_dir() else p.name for p in files]
    subjects = []
    for r, p in zip(rel, files, strict=True):
        match = _BIDS_SUBJECT.search(r)
        subjects.append(match.group(1) if match else _stem(p))
    ids = _unique_ids(subjects, [_stem(p) for p in files], rel)
    return [VolumeRecord(i, s, str(p)) for i, s, p in zip(ids, subjects, files, strict=True)]


class NiftiDirSource(_AxisSource):
    """NIfTI volumes under `root` (a directory searched with the recursive glob `pattern`, or one file).

    Slices are taken along `slice_axis` of the stored array (see `transforms.to_slices`; None: the data
    module's `slice_axis`, axis 2 for the source alone). A 4D file whose last
    dimension is 1 is read as 3D; other 4D+ and 2D files, NaN voxels and unreadable files raise InputError.
    In a worker, uncompressed `.nii` files are memory-mapped (nibabel `mmap=True`), `.nii.gz` are read once.
    """

    name = "nifti"

    def __init__(
        self, root: str | os.PathLike, pattern: str = "**/*.nii*", slice_axis: int | None = None
    ) -> None:
        self._set_slice_axis(slice_axis)
        self.root = Path(root)
        self.pattern = pattern
        self._records: list[VolumeRecord] | None = None

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            # not the `.json` sidecars `lfmri degrade` writes beside its NIfTI (`**/*.nii*` matches them)
            self._records = _records_for(self.root, _glob(self.root, self.pattern, "NIfTI", NIFTI_SUFFIXES))
        return self._records

    def load(self, record: VolumeRecord) -> np.ndarray:
        data, _ = load_nifti(record.path)
        return _check_stack(
            np.ascontiguousarray(to_slices(np.asarray(data, np.float32), self._axis)), str(record.path)
        )

    def open(self, record: VolumeRecord) -> np.ndarray:
        data = np.asanyarray(nib.load(record.path, mmap=True).dataobj)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        return to_slices(data, self._axis)

    def metadata(self, record: VolumeRecord) -> dict[str, Any]:
        img = nib.load(record.path)
        return {
            "path": record.path,
            "affine": np.asarray(img.affine),
            "shape": tuple(img.shape),
            "zooms_mm": tuple(float(z) for z in img.header.get_zooms()[:3]),
            "slice_axis": self._axis,
        }


def _real_kspace_message(path: str | None, dtype: np.dtype, shape: tuple[int, ...]) -> str:
    """Why a real-valued `kspace` dataset is refused: its inverse FFT would be a Hermitian-symmetric image
    (the object plus its mirror image), silently."""
    pair = " (a real/imaginary pair in a last axis of 2? store kspace[..., 0] + 1j * kspace[..., 1])"
    return (f"{path}: the 'kspace' dataset is real-valued ({dtype}, shape {tuple(shape)}); fastMRI k-space "
            "is complex, and real k-space reconstructs as mirror-ghosted images"
            + (pair if shape and shape[-1] == 2 else ""))


class FastMRISource(VolumeSource):
    """fastMRI HDF5 files under `root` (recursive glob `pattern`, default "**/*.h5", or one file).

    `key`: "reconstruction_rss" (magnitude [S, H, W]), "kspace" (multi-coil [S, C, H, W] -> RSS of the coil
    images `ifft2c(kspace)`; single-coil [S, H, W] -> the complex image), or "auto" (the RSS reconstruction if
    the file has it, else k-space). Slices are along axis 0, as fastMRI stores them. The file's attributes and
    its `ismrmrd_header` (XML text) come back from `metadata`. One file is one volume; the subject id is the
    file stem.
    """

    name = "fastmri"
    KEYS = ("auto", "reconstruction_rss", "kspace")

    def __init__(self, root: str | os.PathLike, pattern: str = "**/*.h5", key: str = "auto") -> None:
        if key not in self.KEYS:
            raise InputError(f"fastmri key must be one of {', '.join(self.KEYS)}, got {key!r}")
        self.root = Path(root)
        self.pattern = pattern
        self.key = key
        self._records: list[VolumeRecord] | None = None

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            files = _glob(self.root, self.pattern, "HDF5")
            self._records = [VolumeRecord(_stem(p), _stem(p), str(p)) for p in files]
            ids = [r.volume_id for r in self._records]
            if len(set(ids)) != len(ids):
                self._records = _records_for(self.root, files)
        return self._records

    def _open_file(self, path: str):
        try:
            return h5py.File(path, "r")
        except OSError:
            raise InputError(f"{path}: not a readable HDF5 file") from None

    def load(self, record: VolumeRecord) -> np.ndarray:
        with self._open_file(record.path) as f:
            key = self.key
            if key == "auto":
                key = "reconstruction_rss" if "reconstruction_rss" in f else "kspace"
            if key not in f:
                raise InputError(f"{record.path}: no '{key}' dataset (has: {', '.join(sorted(f.keys()))})")
            if key == "kspace" and f[key].dtype.kind != "c":
                raise InputError(_real_kspace_message(record.path, f[key].dtype, f[key].shape))
            data = np.asarray(f[key][()])
        if key == "reconstruction_rss":
            stack = data.astype(np.float32)
        elif data.ndim == 4:
            images = ifft2c(torch.from_numpy(data.astype(np.complex64)))
            stack = images.abs().pow(2).sum(dim=1).sqrt().numpy()
        elif data.ndim == 3:
            stack = ifft2c(torch.from_numpy(data.astype(np.complex64))).numpy()
        else:
            raise InputError(
                f"{record.path}: k-space must be [slices, coils, H, W] or [slices, H, W], "
                f"got shape {tuple(data.shape)}"
            )
        return _check_stack(stack, str(record.path))

    def metadata(self, record: VolumeRecord) -> dict[str, Any]:
        with self._open_file(record.path) as f:
            attrs = {
                k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()
            }
            header = f["ismrmrd_header"][()] if "ismrmrd_header" in f else None
        if isinstance(header, bytes | np.bytes_):
            header = header.decode("utf-8", errors="replace")
        return {"path": record.path, "attrs": attrs, "ismrmrd_header": header}


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"the bundled data needs the package {package!r}: run `make setup`")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise InputError(f"{path}: bundled data file missing from the installed {package!r} package")
    return path


#: sha256 of the shipped Colin27 file (`datamodules/data/colin27_ch2.nii.gz`, see datamodules/data/README.md)
COLIN27_SHA256 = "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"


class BundledSource(_AxisSource):
    """Real MRI that ships with the package or the packages installed by `make setup` (never downloaded at run
    time).

    - test (real, held out whole, never used for training or tuning): one subject, `real-colin27`, the Colin27
      brain (a T1-weighted average of 27 scans of one adult, with skull; MRIcron's `ch2.nii.gz`, 181x217x181,
      1 mm, uint8), shipped as package data in `datamodules/data/` with its provenance and BSD-3-clause
      licence. It is read at its native resolution like any NIfTI volume (`io.load_nifti`, slices along
      `slice_axis`: None takes the data module's, axis 2 alone; the data module normalises it per volume as
      every other volume).
    - train: `n_train` pseudo-subjects `pseudo-mni-train-000`, ... and val: `n_val` pseudo-subjects
      `pseudo-mni-val-000`, ...: random smooth deformations (a random affine scaling/rotation plus a smooth 3D
      displacement field, std about 3 mm) and intensity changes (gamma 0.75-1.33 and a smooth multiplicative
      bias field, +-20 %) of the MNI ICBM152 2009 symmetric T1 template shipped in nilearn's wheel (1 mm,
      197x233x189, cropped to its non-zero box). Deterministic from `seed`; generated lazily, kept in memory.
      They are NOT independent subjects: validation on them measures fit to the template's anatomy.

    The split is fixed by the source (`fixed_split`).
    """

    name = "bundled"
    MNI = ("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    REAL_TEST = {"real-colin27": ("datamodules", "data", "colin27_ch2.nii.gz")}

    def __init__(
        self, n_train: int = 8, n_val: int = 2, seed: int = 0, slice_axis: int | None = None
    ) -> None:
        if n_train < 1 or n_val < 0:
            raise InputError(f"bundled source needs n_train >= 1 and n_val >= 0, got {n_train}, {n_val}")
        self._set_slice_axis(slice_axis)
        self.n_train, self.n_val, self.seed = n_train, n_val, seed
        train = [f"pseudo-mni-train-{i:03d}" for i in range(n_train)]
        val = [f"pseudo-mni-val-{i:03d}" for i in range(n_val)]
        self.fixed_split = Split(train=train, val=val, test=sorted(self.REAL_TEST))
        self._cache: dict[tuple[str, int], np.ndarray] = {}  # (volume id, slice axis) -> stack
        self._template: np.ndarray | None = None

    def records(self) -> list[VolumeRecord]:
        out = []
        for name in self.fixed_split.train + self.fixed_split.val:
            out.append(
                VolumeRecord(name, name, None, {"kind": "pseudo-subject", "base": "MNI ICBM152 2009 T1"})
            )
        for name in self.fixed_split.test:
            out.append(VolumeRecord(name, name, str(_package_file(*self.REAL_TEST[name])), {"kind": "real"}))
        return out

    def load(self, record: VolumeRecord) -> np.ndarray:
        key = (record.volume_id, self._axis)
        if key not in self._cache:
            if record.volume_id in self.REAL_TEST:
                data, _ = load_nifti(record.path)
            else:
                data = self._pseudo_subject(record.volume_id)
            self._cache[key] = np.ascontiguousarray(to_slices(data, self._axis))
        return self._cache[key]

    def metadata(self, record: VolumeRecord) -> dict[str, Any]:
        if record.path is None:  # a pseudo-subject: no file
            return super().metadata(record)
        img = nib.load(record.path)
        return {
            **super().metadata(record),
            "affine": np.asarray(img.affine),
            "shape": tuple(img.shape),
            "zooms_mm": tuple(float(z) for z in img.header.get_zooms()[:3]),
            "slice_axis": self._axis,
        }

    def _mni(self) -> np.ndarray:
        if self._template is None:
            data = np.asarray(nib.load(_package_file(*self.MNI)).dataobj, dtype=np.float32)
            nz = np.nonzero(data > 0)
            lo = [max(int(a.min()) - 4, 0) for a in nz]
            hi = [min(int(a.max()) + 5, n) for a, n in zip(nz, data.shape, strict=True)]
            self._template = np.ascontiguousarray(data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        return self._template

    def _pseudo_subject(self, name: str) -> np.ndarray:
        g = torch.Generator().manual_seed(stable_hash("bundled", self.seed, name))
        x = torch.from_numpy(self._mni())[None, None]
        d, h, w = x.shape[2:]
        # affine: scaling +-8 % per axis, rotation +-6 degrees about the slice axis
        scale = 1 + (torch.rand(3, generator=g) * 2 - 1) * 0.08
        angle = math.radians(float(torch.rand(1, generator=g) * 2 - 1) * 6)
        theta = torch.diag(scale)
        c, s = math.cos(angle), math.sin(angle)
        rot = torch.eye(3)
        i, j = [
            a for a in range(3) if a != 2 - self._axis
        ]  # affine_grid's coordinate order is (W, H, D)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        affine = torch.cat([rot @ theta, torch.zeros(3, 1)], dim=1)[None]
        grid = F.affine_grid(affine, (1, 1, d, h, w), align_corners=False)
        # smooth displacement: a 5x5x5 random field, trilinear upsampled; 0.04 of the half-FOV ~ 3-4 mm
        coarse = torch.randn(1, 3, 5, 5, 5, generator=g) * 0.04
        grid = grid + F.interpolate(coarse, size=(d, h, w), mode="trilinear", align_corners=True).permute(
            0, 2, 3, 4, 1
        )
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
        # intensity: gamma and a smooth multiplicative bias field
        top = float(y.max())
        gamma = float(torch.exp((torch.rand(1, generator=g) * 2 - 1) * math.log(1.33)))
        bias = F.interpolate(
            torch.randn(1, 1, 3, 3, 3, generator=g) * 0.1,
            size=(d, h, w),
            mode="trilinear",
            align_corners=True,
        )[0, 0].clamp(-0.2, 0.2)
        y = top * (y.clamp(min=0) / top) ** gamma * (1 + bias)
        return y.numpy().astype(np.float32)


#: the source classes the retired names "nifti" / "fastmri" (which needed a separate root) stood for
_RETIRED = {"nifti": "NiftiDirSource", "fastmri": "FastMRISource"}


def check_shorthand(source: str) -> None:
    """InputError (one line saying what to write instead) for "nifti" / "fastmri" given without a path."""
    if source in _RETIRED:
        raise InputError(
            f"source {source!r} needs its data: give the path itself (source: /data/dir, or "
            f"--data.init_args.source=/data/dir), or a source block (source: {{class_path: "
            f"datamodules.sources.{_RETIRED[source]}, init_args: {{root: /data/dir}}}})"
        )


def make_source(source: str | VolumeSource, slice_axis: int = 2) -> VolumeSource:
    """The data module's `source` argument -> a VolumeSource.

    A VolumeSource object is returned as is. A string is shorthand: "bundled" -> `BundledSource()` (its
    defaults) sliced along `slice_axis`; a path to a directory or file -> `FastMRISource(path)` if it holds
    .h5 files, else `NiftiDirSource(path, slice_axis=slice_axis)` (default patterns and key). Anything else
    (a missing path, the retired "nifti" / "fastmri") -> InputError.
    """
    if isinstance(source, VolumeSource):
        return source
    check_shorthand(source)
    if source == "bundled":
        return BundledSource(slice_axis=slice_axis)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: data source not found (use 'bundled', a path, or a source block such as "
                         "{class_path: datamodules.sources.NiftiDirSource, init_args: {root: PATH}})")
    is_h5 = path.suffix in (".h5", ".hdf5") if path.is_file() else any(path.glob("**/*.h5"))
    return FastMRISource(path) if is_h5 else NiftiDirSource(path, slice_axis=slice_axis)


def skipped_summary(skipped: list[str], shown: int = 3) -> str:
    """The files skipped with `skip_bad_files` on one line: a count, then the first `shown` reasons (each
    naming its file)."""
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} bad file(s) skipped (skip_bad_files): " + "; ".join(skipped[:shown]) + more


def warn_skipped(skipped: list[str]) -> None:
    """One warning listing the files skipped with `skip_bad_files`."""
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad input file(s): " + "; ".join(skipped), stacklevel=3)
