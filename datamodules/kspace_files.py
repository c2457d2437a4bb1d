"""K-space HDF5 files in fastMRI's layout (fastMRI's own, M4Raw's, lfmri's) and lfmri's legacy single-coil
files (numpy, h5py; no torch).

fastMRI's layout (`fastmri/data/mri_data.py`, its data README): dataset `kspace` complex `[slices, coils,
H_f, W_f]` (multi-coil) or `[slices, H_f, W_f]` (single-coil), centred orthonormal 2D FFT, READOUT ALONG H_f
(often 2x oversampled) and PHASE ENCODING ALONG W_f; undersampled files (test / challenge) hold exact zeros
where lines were skipped and a dataset `mask` `[W_f]` (1 = sampled); optional `reconstruction_rss` /
`reconstruction_esc` (cropped targets), an `ismrmrd_header` dataset (XML) and attributes such as
`acquisition`, `max`, `norm`, `patient_id`. lfmri's convention is the transpose (phase encoding along H,
readout along W, `degradations`), so `read_kspace_file` transposes every slice's in-plane axes (our H = the
file's W_f) and `write_kspace_file` transposes back.

lfmri's attributes in the files it writes (`lfmri degrade --kspace-out` with `--coils` / `--acceleration` /
`--center-fraction` / `--mask`): `lfmri_layout` = "fastmri"; `lfmri_inplane` = "transposed" (the file's
(H_f, W_f) are the input NIfTI's slice axes (W, H): readout along the NIfTI slice's last axis, as lfmri
simulates); the per-volume operator scalars (`SCALAR_KEYS`), `regime`, `seed`, `slice_axis`, `acceleration`,
`center_fraction`, `mask_kind`, `n_coils`, `b0_method`, `nifti_affine` (4x4); datasets `noise_sigma` `[S]` and
`b0_map_hz` `[S, H_f, W_f]` (transposed like `kspace`), and a minimal `ismrmrd_header` (matrix, field of view,
phase-encoding limits) so fastMRI's own `SliceDataset` reads the file.

lfmri's legacy files (`lfmri degrade --kspace-out` without those options, attribute `fft` and no
`lfmri_layout`): `kspace` `[S, H, W]` already in lfmri's order (readout along W), read as they are.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from lfmri_utils.errors import InputError
from lfmri_utils.files import check_input_file

__all__ = ["FASTMRI_LAYOUT", "INPLANE_TRANSPOSED", "KSPACE_SUFFIXES", "KSpaceFile", "MIN_MATRIX",
           "SCALAR_KEYS", "SCALAR_RANGES", "attrs_scalars", "check_scalars", "is_kspace_input",
           "read_kspace_file", "write_kspace_file"]

#: per-slice scalar parameters of the forward operator, as `lfmri degrade` records them
SCALAR_KEYS = ("fwhm_px", "t2star_ms", "t2star_gre", "readout_ms", "te_ms", "b0_max_hz")

#: the physical range of each recorded operator parameter: (lowest, whether the lowest itself is allowed,
#: whether +inf is allowed); t2star_gre is a flag (0 spin echo, 1 gradient echo)
SCALAR_RANGES = {"fwhm_px": (0.0, True, False), "t2star_ms": (0.0, False, True),
                 "t2star_gre": (0.0, True, False), "readout_ms": (0.0, False, False),
                 "te_ms": (0.0, True, False), "b0_max_hz": (0.0, True, False)}

#: the attribute value of lfmri's fastMRI-layout files (attribute `lfmri_layout`)
FASTMRI_LAYOUT = "fastmri"
#: attribute `lfmri_inplane`: the file's (H_f, W_f) are the NIfTI slice's (W, H)
INPLANE_TRANSPOSED = "transposed"
#: the smallest in-plane matrix lfmri takes (SSIM's window)
MIN_MATRIX = 7
_ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
#: the suffixes of a k-space HDF5 file (an INPUT with another suffix is a NIfTI)
KSPACE_SUFFIXES = (".h5", ".hdf5")


def is_kspace_input(path: str | Path) -> bool:
    """Whether an INPUT is a k-space HDF5 file (by its suffix, `KSPACE_SUFFIXES`) rather than a NIfTI."""
    return Path(path).suffix.lower() in KSPACE_SUFFIXES


def check_scalars(where: str, scalars: Mapping[str, np.ndarray]) -> None:
    """InputError (naming `where`, the parameter and the first bad slice) when a recorded operator parameter
    is NaN or outside its physical range (`SCALAR_RANGES`; `t2star_gre` must be 0 or 1)."""
    for key, values in scalars.items():
        low, closed, inf_ok = SCALAR_RANGES[key]
        ok = (values >= low) if closed else (values > low)
        ok &= np.isfinite(values) | (inf_ok & (values == np.inf))
        if key == "t2star_gre":
            ok &= np.isin(values, (0.0, 1.0))
        if not ok.all():
            first = int(np.flatnonzero(~ok)[0])
            bound = f"{'>=' if closed else '>'} {low:g}" + (" (inf allowed)" if inf_ok else "")
            if key == "t2star_gre":
                bound = "0 (spin echo) or 1 (gradient echo)"
            raise InputError(f"{where}: {key} of slice {first} is {values[first]:g}; it must be {bound}")


@dataclass(frozen=True)
class KSpaceFile:
    """One k-space file read into lfmri's layout (phase encoding along H, readout along W).

    Attributes:
        path: the file.
        kspace: complex64 `[S, C, H, W]` (C = 1 for single-coil), exact zeros where not sampled.
        mask: float32 0/1 `[S or 1, 1, H, W]` (1 = sampled): the file's `mask` dataset, else inferred (rows
            that are zero in every coil, only when some are), else None (fully sampled).
        mask_origin: "dataset", "inferred" or None.
        scalars: lfmri's recorded operator parameters per slice, float64 `[S]` each (`SCALAR_KEYS` present in
            the file), or None: a foreign file, no low-field effects recorded.
        b0_map_hz: float32 `[S, H, W]` field maps (lfmri's files with B0) or None.
        noise_sigma: the recorded k-space noise std per slice, float64 `[S]` (units of `kspace`), or None.
        layout: "fastmri" (fastMRI's layout, lfmri's or foreign) or "lfmri-legacy".
        nifti_order: True when (H, W) are the original NIfTI slice's in-plane axes in order (lfmri's files);
            False for a foreign file, whose own order is (H_f, W_f) = (W, H).
        voxel_mm: (along H_f, along W_f, slice thickness) in mm from the ISMRMRD header's encoded field of
            view, or None.
        attrs: the file's attributes (bytes decoded, numpy scalars as Python numbers).
    """

    path: Path
    kspace: np.ndarray
    mask: np.ndarray | None
    mask_origin: Literal["dataset", "inferred"] | None
    scalars: dict[str, np.ndarray] | None
    b0_map_hz: np.ndarray | None
    noise_sigma: np.ndarray | None
    layout: Literal["fastmri", "lfmri-legacy"]
    nifti_order: bool
    voxel_mm: tuple[float, float, float] | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])

    @property
    def matrix(self) -> tuple[int, int]:
        """(H, W) in lfmri's layout."""
        return int(self.kspace.shape[2]), int(self.kspace.shape[3])

    @property
    def regime(self) -> str | None:
        """The regime lfmri recorded, or None."""
        value = self.attrs.get("regime")
        return str(value) if value not in (None, "") else None


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _header_voxels(header: Any) -> tuple[float, float, float] | None:
    """(H_f, W_f, slice) voxel sizes in mm from an ISMRMRD header's encodedSpace, None when unreadable."""
    try:
        text = header.decode() if isinstance(header, bytes | np.bytes_) else str(header)
        root = ET.fromstring(text)
        ns = {"i": _ISMRMRD_NS}
        space = root.find("i:encoding/i:encodedSpace", ns)
        size = [float(space.find(f"i:matrixSize/i:{a}", ns).text) for a in "xyz"]
        fov = [float(space.find(f"i:fieldOfView_mm/i:{a}", ns).text) for a in "xyz"]
    except (ET.ParseError, AttributeError, TypeError, ValueError, UnicodeDecodeError):
        return None
    out = (fov[0] / size[0], fov[1] / size[1], fov[2] / max(size[2], 1.0))
    return out if all(math.isfinite(v) and v > 0 for v in out) else None


def _mask_from_dataset(mask: np.ndarray, file_shape: tuple[int, ...], where: str) -> np.ndarray:
    """The file's `mask` (1D `[W_f]`, 2D `[H_f, W_f]`, 3D `[S, H_f, W_f]`) -> float32 `[S or 1, 1, H, W]`."""
    n_slices, (h_f, w_f) = file_shape[0], file_shape[-2:]
    if mask.dtype.kind not in "biuf":
        raise InputError(f"{where}: 'mask' must be numeric or boolean, got {mask.dtype}")
    if not np.all(np.isfinite(mask)):
        raise InputError(f"{where}: 'mask' holds NaN or Inf")
    if mask.ndim == 1:
        if mask.shape[0] != w_f:
            raise InputError(f"{where}: 'mask' has {mask.shape[0]} entries but k-space has W = {w_f} phase-"
                             "encoding lines (fastMRI's mask is 1D over the last axis)")
        rows = (mask != 0).astype(np.float32)
        out = np.broadcast_to(rows[None, None, :, None], (1, 1, w_f, h_f))
    elif mask.ndim in (2, 3) and mask.shape[-2:] == (h_f, w_f) and mask.shape[:-2] in ((), (n_slices,)):
        out = np.swapaxes((mask != 0).astype(np.float32), -1, -2).reshape(-1, 1, w_f, h_f)
    else:
        raise InputError(f"{where}: 'mask' of shape {tuple(mask.shape)} fits neither [W] = [{w_f}] nor "
                         f"[H, W] = [{h_f}, {w_f}] (nor one per slice)")
    if not out.any():
        raise InputError(f"{where}: 'mask' samples nothing (all zero)")
    return np.ascontiguousarray(out)


def _inferred_mask(kspace: np.ndarray) -> np.ndarray | None:
    """Rows (ky along H) that are zero in every coil of a slice are unsampled: float32 `[S or 1, 1, H, W]`,
    None when every row of every slice holds data."""
    rows = np.any(kspace != 0, axis=(1, 3))  # [S, H]
    if rows.all():
        return None
    if (rows == rows[:1]).all():
        rows = rows[:1]
    width = kspace.shape[-1]
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :, None], (rows.shape[0], 1, rows.shape[1],
                                                                           width)).astype(np.float32))


def attrs_scalars(attrs: Mapping[str, Any], n_slices: int, where: str) -> dict[str, np.ndarray] | None:
    """lfmri's per-volume operator scalars (a file's attributes) repeated per slice, float64 `[S]` each,
    checked (`check_scalars`, messages start with `where`); None when the file does not record them."""
    if not all(k in attrs for k in ("fwhm_px", "t2star_ms", "readout_ms", "te_ms")):
        return None
    try:
        scalars = {k: np.full(n_slices, float(attrs[k])) for k in SCALAR_KEYS if k in attrs}
    except (TypeError, ValueError):
        raise InputError(f"{where}: lfmri's operator attributes are not numbers") from None
    check_scalars(where, scalars)
    return scalars


def read_hdf5_datasets(path: Path, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The datasets a k-space file may hold (`kspace`, required; `mask`, `b0_map_hz` float32, `noise_sigma`
    float64, `ismrmrd_header`: None where absent) and its attributes (bytes decoded), read as they are;
    InputError naming `where` when the file is not readable HDF5 or has no `kspace` dataset."""
    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
                has = ", ".join(sorted(f.keys())) or "none"
                raise InputError(f"{where}: no dataset 'kspace' (has: {has})")
            dtypes = {"kspace": None, "mask": None, "b0_map_hz": np.float32, "noise_sigma": np.float64}
            data: dict[str, Any] = {k: np.asarray(f[k][()], dtype=t) if k in f else None
                                    for k, t in dtypes.items()}
            data["ismrmrd_header"] = f["ismrmrd_header"][()] if "ismrmrd_header" in f else None
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except InputError:
        raise
    except Exception as err:
        reason = " ".join(str(err).split())
        raise InputError(f"{where}: not a readable HDF5 file ({type(err).__name__}"
                         f"{': ' + reason if reason else ''})") from None
    return data, attrs


def read_kspace_file(path: str | Path, label: str = "INPUT") -> KSpaceFile:
    """Read a k-space HDF5 file (module docstring) into lfmri's layout; `label` names the option in messages.

    InputError (one line naming the file) when it is not HDF5, has no `kspace`, a `kspace` that is not
    complex, not 3D / 4D, smaller than 7x7 in-plane, with NaN / Inf or all zero; a `mask` of the wrong length
    or shape; recorded `noise_sigma` / `b0_map_hz` / operator attributes that are malformed.
    """
    path = check_input_file(path, label)
    where = f"{label} {path}"
    data, attrs = read_hdf5_datasets(path, where)
    kspace, mask, b0, sigma, header = (data[k] for k in ("kspace", "mask", "b0_map_hz", "noise_sigma",
                                                         "ismrmrd_header"))

    if not np.iscomplexobj(kspace):
        pair = " (a real/imaginary pair in a last axis of 2?)" if kspace.shape[-1:] == (2,) else ""
        raise InputError(f"{where}: 'kspace' must be complex, got {kspace.dtype}{pair}")
    if kspace.ndim not in (3, 4):
        raise InputError(f"{where}: 'kspace' must be [slices, coils, H, W] or [slices, H, W], got shape "
                         f"{tuple(kspace.shape)}")
    if min(kspace.shape[-2:]) < MIN_MATRIX or 0 in kspace.shape:
        raise InputError(f"{where}: 'kspace' of shape {tuple(kspace.shape)}: lfmri needs at least one slice "
                         f"and coil of at least {MIN_MATRIX}x{MIN_MATRIX}")
    bad = int(kspace.size - np.count_nonzero(np.isfinite(kspace)))
    if bad:
        raise InputError(f"{where}: {bad} k-space sample(s) are NaN or Inf")
    if not np.any(kspace):
        raise InputError(f"{where}: every k-space sample is zero: nothing was measured")

    legacy = attrs.get("lfmri_layout") != FASTMRI_LAYOUT and "fft" in attrs and kspace.ndim == 3
    file_shape = kspace.shape
    kspace = kspace.astype(np.complex64)
    if kspace.ndim == 3:
        kspace = kspace[:, None]
    if not legacy:
        kspace = np.ascontiguousarray(np.swapaxes(kspace, -1, -2))  # our H = the file's W_f
        if b0 is not None:
            b0 = np.ascontiguousarray(np.swapaxes(b0, -1, -2)) if b0.ndim == 3 else b0
    n_slices, _, height, width = kspace.shape

    if mask is not None:
        if legacy:
            raise InputError(f"{where}: lfmri's single-coil layout has no 'mask'")
        mask_arr, origin = _mask_from_dataset(mask, file_shape, where), "dataset"
        kspace = kspace * mask_arr  # fastMRI's convention: exact zeros where not sampled
    else:
        mask_arr = _inferred_mask(kspace)
        origin = None if mask_arr is None else "inferred"
    if b0 is not None and (tuple(b0.shape) != (n_slices, height, width) or not np.all(np.isfinite(b0))):
        raise InputError(f"{where}: 'b0_map_hz' must be {n_slices} finite maps of the k-space's matrix, got "
                         f"shape {tuple(b0.shape)}")
    if sigma is not None and (sigma.shape != (n_slices,) or not np.all(np.isfinite(sigma))
                              or np.any(sigma <= 0)):
        raise InputError(f"{where}: 'noise_sigma' must be {n_slices} finite values > 0 (one per slice; drop "
                         "the dataset to have it estimated, or give --noise-sigma)")
    ours = legacy or attrs.get("lfmri_layout") == FASTMRI_LAYOUT
    return KSpaceFile(
        path=path, kspace=kspace, mask=mask_arr, mask_origin=origin,
        scalars=attrs_scalars(attrs, n_slices, where) if ours else None, b0_map_hz=b0, noise_sigma=sigma,
        layout="lfmri-legacy" if legacy else "fastmri",
        nifti_order=legacy or attrs.get("lfmri_inplane") == INPLANE_TRANSPOSED,
        voxel_mm=None if header is None else _header_voxels(header), attrs=attrs)


def _ismrmrd_header(h_f: int, w_f: int, voxel_mm: tuple[float, float, float]) -> bytes:
    """A minimal ISMRMRD XML header: encoded = recon space (matrix, field of view) and the phase-encoding
    limits fastMRI's `SliceDataset` reads (no padding: centre W_f // 2)."""
    ET.register_namespace("", _ISMRMRD_NS)

    def sub(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
        node = ET.SubElement(parent, f"{{{_ISMRMRD_NS}}}{tag}")
        if text is not None:
            node.text = str(text)
        return node

    root = ET.Element(f"{{{_ISMRMRD_NS}}}ismrmrdHeader")
    encoding = sub(root, "encoding")
    for space in ("encodedSpace", "reconSpace"):
        node = sub(encoding, space)
        size, fov = sub(node, "matrixSize"), sub(node, "fieldOfView_mm")
        for axis, n, vox in zip("xyz", (h_f, w_f, 1), voxel_mm, strict=True):
            sub(size, axis, n)
            sub(fov, axis, f"{n * vox:.6g}")
    limits = sub(sub(encoding, "encodingLimits"), "kspace_encoding_step_1")
    for tag, value in (("minimum", 0), ("maximum", w_f - 1), ("center", w_f // 2)):
        sub(limits, tag, value)
    sub(encoding, "trajectory", "cartesian")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_kspace_file(path: str | Path, kspace: np.ndarray, *, mask: np.ndarray | None = None,
                      noise_sigma: np.ndarray | None = None, b0_map_hz: np.ndarray | None = None,
                      scalars: Mapping[str, float] | None = None, attrs: Mapping[str, Any] | None = None,
                      datasets: Mapping[str, np.ndarray] | None = None,
                      voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
                      affine: np.ndarray | None = None) -> None:
    """Write k-space in fastMRI's exact layout with lfmri's attributes (module docstring).

    Args:
        path: the HDF5 file (overwritten).
        kspace: complex `[S, C, H, W]` in lfmri's layout (phase encoding along H); written as complex64
            `[S, C, W, H]` (`[S, W, H]` for C = 1, fastMRI's single-coil layout), times the mask.
        mask: 0/1 `[..., H, W]`, one for the whole volume (broadcastable to `[1, 1, H, W]`), or None (fully
            sampled, no dataset): written as float32 `[H]` (fastMRI's 1D mask over W_f) when constant along
            W (Cartesian rows), else `[W, H]`.
        noise_sigma: float `[S]` (units of `kspace`) -> dataset `noise_sigma` float32.
        b0_map_hz: float `[S, H, W]` -> dataset `b0_map_hz` float32 `[S, W, H]`.
        scalars: the volume's operator scalars (`SCALAR_KEYS`, ...) -> attributes.
        attrs: further attributes (regime, seed, slice_axis, acceleration, ...).
        datasets: further per-slice datasets written as they are (e.g. `snr_db`).
        voxel_mm: (along W, along H, slice thickness) in mm: the file's (H_f, W_f, slice), for the header.
        affine: the source NIfTI's 4x4 affine -> attribute `nifti_affine`.
    """
    kspace = np.asarray(kspace)
    if kspace.ndim != 4 or not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex [S, C, H, W], got {kspace.shape} {kspace.dtype}")
    n_slices, n_coils, height, width = kspace.shape
    out = np.swapaxes(kspace.astype(np.complex64), -1, -2)
    mask_1d = mask_2d = None
    if mask is not None:
        full = np.broadcast_to(np.asarray(mask, dtype=np.float32), (1, 1, height, width))[0, 0]
        out = out * full.T
        if (full == full[:, :1]).all():
            mask_1d = np.ascontiguousarray(full[:, 0])
        else:
            mask_2d = np.ascontiguousarray(full.T)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=np.ascontiguousarray(out[:, 0] if n_coils == 1 else out))
        if mask is not None:
            f.create_dataset("mask", data=mask_1d if mask_1d is not None else mask_2d)
        f.create_dataset("ismrmrd_header", data=np.bytes_(_ismrmrd_header(width, height, voxel_mm)))
        if noise_sigma is not None:
            f.create_dataset("noise_sigma", data=np.asarray(noise_sigma, dtype=np.float32).reshape(n_slices))
        if b0_map_hz is not None:
            f.create_dataset("b0_map_hz", data=np.ascontiguousarray(
                np.swapaxes(np.asarray(b0_map_hz, dtype=np.float32), -1, -2)))
        for key, value in (datasets or {}).items():
            f.create_dataset(key, data=value)
        for key, value in {**(scalars or {}), **(attrs or {})}.items():
            f.attrs[key] = value
        f.attrs["n_coils"] = n_coils
        f.attrs["lfmri_layout"] = FASTMRI_LAYOUT
        f.attrs["lfmri_inplane"] = INPLANE_TRANSPOSED
        f.attrs["fft"] = ("centred orthonormal 2D FFT over (H, W) of [slices, coils, H, W] (fastMRI's); "
                          "readout along H, phase encoding along W; in-plane axes transposed to the NIfTI")
        if affine is not None:
            f.attrs["nifti_affine"] = np.asarray(affine, dtype=np.float64).reshape(4, 4)
