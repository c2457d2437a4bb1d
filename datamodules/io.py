"""NIfTI reading and atomic writing, with one-line, file-naming errors (numpy / nibabel only).

The atomic writes and the input / output path checks that every lfmri output goes through are in
`lfmri_utils.files`; `save_nifti_atomic` writes a volume with its `atomic_path`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path

__all__ = ["load_nifti", "save_nifti_atomic", "nifti_like", "NIFTI_SUFFIXES"]


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Read a 3D NIfTI volume as float32 (scaling applied) and return `(data, image)`.

    A 4D volume whose last dim is 1 is squeezed to 3D. Raises `InputError` naming the file if it is
    missing, not a readable NIfTI (`.nii` / `.nii.gz`), not 3D, complex, or has NaN / Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for foreign or corrupt files
        raise InputError(f"{path}: not a NIfTI file ({_one_line(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3D volume, got a {len(shape)}D array "
                         f"of shape {tuple(img.shape)}")
    if np.issubdtype(img.get_data_dtype(), np.complexfloating):
        raise InputError(f"{path}: complex data; expected a magnitude (real) volume")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:  # truncated or corrupt payload
        raise InputError(f"{path}: cannot read the NIfTI data ({_one_line(err)})") from None
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxel(s) are NaN or Inf")
    return data, img


def save_nifti_atomic(data: np.ndarray, like_img: nib.spatialimages.SpatialImage,
                      path: str | os.PathLike) -> None:
    """Write `data` (3D) as a NIfTI at `path` with the affine and header of `like_img`, atomically.

    The header is copied (orientation codes, voxel sizes, units, description...) except the data type, which
    becomes float32 (degraded intensities are real-valued), and the intensity scaling, which is reset.
    """
    with atomic_path(path) as tmp:
        nib.save(nifti_like(data, like_img), str(tmp))


def nifti_like(data: np.ndarray, like_img: nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    """A float32 NIfTI image of `data` with `like_img`'s affine, header and orientation codes."""
    header = like_img.header.copy()
    header.set_data_dtype(np.float32)
    out = type(like_img)(np.asarray(data, dtype=np.float32), like_img.affine, header)
    out.header.set_slope_inter(None, None)
    out.set_qform(like_img.get_qform(), int(like_img.header["qform_code"]))
    out.set_sform(like_img.get_sform(), int(like_img.header["sform_code"]))
    return out
