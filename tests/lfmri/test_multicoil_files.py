"""fastMRI-layout k-space files (`datamodules.kspace_files`): fastMRI's own layout read into lfmri's (in-plane
axes transposed), lfmri's files written in that layout and read back, lfmri's legacy single-coil files read as
they are, and the one-line refusals of broken files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest

from datamodules.kspace_files import read_kspace_file, write_kspace_file
from lfmri_utils.errors import InputError

HEADER = b"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>
<encodedSpace><matrixSize><x>24</x><y>12</y><z>1</z></matrixSize>
<fieldOfView_mm><x>240</x><y>60</y><z>4.5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>12</x><y>12</y><z>1</z></matrixSize>
<fieldOfView_mm><x>120</x><y>60</y><z>4.5</z></fieldOfView_mm></reconSpace>
<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>11</maximum><center>6</center>
</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>"""


def _kspace(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _fastmri_file(path: Path, kspace: np.ndarray, mask: np.ndarray | None) -> Path:
    """A file in fastMRI's test-set layout, by hand: zeros where unsampled, `mask` [W] (bool, as fastMRI
    ships it), `ismrmrd_header` bytes, fastMRI's attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace if mask is None else kspace * mask)
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(bool))
        f.create_dataset("ismrmrd_header", data=np.bytes_(HEADER))
        f.attrs.update({"acquisition": "CORPD_FBK", "max": 0.0004, "norm": 0.12, "patient_id": "abc"})
    return path


def test_fastmri_multicoil_file_reads_transposed(tmp_path: Path) -> None:
    """fastMRI's [S, C, H_f, W_f] with readout along H_f comes in as [S, C, W_f, H_f] (phase encoding along
    our H): the mask's sampled columns become sampled rows, the header's voxel sizes are kept, and nothing
    of lfmri's is recorded."""
    raw = _kspace((2, 3, 24, 12))
    mask = np.zeros(12, bool)
    mask[[0, 4, 5, 6, 7, 10]] = True
    k = read_kspace_file(_fastmri_file(tmp_path / "fm.h5", raw, mask))
    assert k.kspace.shape == (2, 3, 12, 24) and k.kspace.dtype == np.complex64
    np.testing.assert_array_equal(k.kspace, np.swapaxes(raw * mask, -1, -2))
    assert k.mask.shape == (1, 1, 12, 24) and k.mask.dtype == np.float32 and k.mask_origin == "dataset"
    np.testing.assert_array_equal(k.mask[0, 0, :, 0], mask.astype(np.float32))
    assert (k.mask == k.mask[..., :1]).all()  # whole rows
    assert k.scalars is None and k.noise_sigma is None and k.b0_map_hz is None and k.regime is None
    assert not k.nifti_order and k.layout == "fastmri" and k.n_coils == 3
    assert k.voxel_mm == pytest.approx((10.0, 5.0, 4.5))
    assert k.attrs["patient_id"] == "abc" and k.attrs["acquisition"] == "CORPD_FBK"


def test_fastmri_singlecoil_file_and_inferred_mask(tmp_path: Path) -> None:
    """A single-coil [S, H_f, W_f] file without a `mask`: C = 1, and columns that are zero in every slice
    are inferred as unsampled; a fully sampled file has no mask."""
    raw = _kspace((2, 16, 10))
    raw[..., [1, 3, 8]] = 0
    k = read_kspace_file(_fastmri_file(tmp_path / "sc.h5", raw, None))
    assert k.kspace.shape == (2, 1, 10, 16) and k.mask_origin == "inferred"
    expected = np.ones(10, np.float32)
    expected[[1, 3, 8]] = 0
    np.testing.assert_array_equal(k.mask[0, 0, :, 5], expected)
    assert k.mask.shape == (1, 1, 10, 16)
    full = read_kspace_file(_fastmri_file(tmp_path / "full.h5", _kspace((2, 16, 10)), None))
    assert full.mask is None and full.mask_origin is None


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    """lfmri's file: fastMRI's exact layout on disk ([S, C, W, H] complex64 with zeros where unsampled, a
    1D float32 mask over W_f, a header fastMRI's SliceDataset can read), read back into lfmri's order with
    its recorded parameters and the flag that the in-plane order is the NIfTI's."""
    s, c, h, w = 2, 4, 12, 20
    kspace = _kspace((s, c, h, w))
    rows = np.zeros(h, np.float32)
    rows[[0, 3, 5, 6, 7, 9]] = 1
    mask = np.broadcast_to(rows[:, None], (h, w))
    b0 = np.random.default_rng(1).standard_normal((s, h, w)).astype(np.float32)
    scalars = {"fwhm_px": 1.5, "t2star_ms": 40.0, "t2star_gre": 0.0, "readout_ms": 8.0, "te_ms": 10.0,
               "b0_max_hz": 30.0}
    path = tmp_path / "lfmri.h5"
    write_kspace_file(path, kspace, mask=mask, noise_sigma=np.array([0.5, 0.25]), b0_map_hz=b0,
                      scalars=scalars, attrs={"regime": "noise_blur_t2star_b0", "acceleration": 2.0},
                      voxel_mm=(1.0, 2.0, 3.0), affine=np.diag([2.0, 1.0, 3.0, 1.0]))
    with h5py.File(path, "r") as f:
        assert f["kspace"].shape == (s, c, w, h) and f["kspace"].dtype == np.complex64
        assert f["mask"].shape == (h,) and f["mask"].dtype == np.float32
        on_disk = f["kspace"][()]
        assert not on_disk[:, :, :, rows == 0].any() and on_disk[:, :, :, rows == 1].all()
        # fastMRI's SliceDataset._retrieve_metadata queries, by hand: padding 0 .. W_f
        root = ET.fromstring(f["ismrmrd_header"][()])
        ns = {"n": "http://www.ismrm.org/ISMRMRD"}
        enc_y = int(root.find(".//n:encoding//n:encodedSpace//n:matrixSize//n:y", ns).text)
        limits = ".//n:encoding//n:encodingLimits//n:kspace_encoding_step_1//n:"
        center = int(root.find(limits + "center", ns).text)
        maximum = int(root.find(limits + "maximum", ns).text)
        assert (enc_y // 2 - center, enc_y // 2 - center + maximum + 1) == (0, h)
    k = read_kspace_file(path)
    np.testing.assert_array_equal(k.kspace, kspace * rows[:, None])
    np.testing.assert_array_equal(k.mask[0, 0], mask)
    np.testing.assert_array_equal(k.b0_map_hz, b0)
    np.testing.assert_allclose(k.noise_sigma, [0.5, 0.25])
    assert {key: float(v[1]) for key, v in k.scalars.items()} == scalars
    assert k.nifti_order and k.regime == "noise_blur_t2star_b0" and k.voxel_mm == pytest.approx((1, 2, 3))
    np.testing.assert_array_equal(k.attrs["nifti_affine"], np.diag([2.0, 1.0, 3.0, 1.0]))

    single = tmp_path / "single.h5"
    write_kspace_file(single, kspace[:, :1], mask=None)
    with h5py.File(single, "r") as f:
        assert f["kspace"].shape == (s, w, h) and "mask" not in f  # fastMRI's single-coil layout
    np.testing.assert_array_equal(read_kspace_file(single).kspace, kspace[:, :1])


def test_poisson_mask_is_written_2d(tmp_path: Path) -> None:
    mask = (np.random.default_rng(2).random((12, 10)) < 0.4).astype(np.float32)
    mask[6, 5] = 1
    path = tmp_path / "p.h5"
    write_kspace_file(path, _kspace((1, 2, 12, 10)), mask=mask)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["mask"][()], mask.T)
    np.testing.assert_array_equal(read_kspace_file(path).mask[0, 0], mask)


def test_legacy_single_coil_file_reads_as_it_is(tmp_path: Path) -> None:
    """lfmri degrade's former file (kspace [S, H, W], readout along W, attribute `fft`): not transposed,
    its attributes are the operator's parameters."""
    raw = _kspace((2, 9, 11))
    path = tmp_path / "legacy.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=raw)
        f.create_dataset("noise_sigma", data=np.array([0.1, 0.2], np.float32))
        f.attrs.update({"fwhm_px": 1.0, "t2star_ms": np.inf, "t2star_gre": 0.0, "readout_ms": 5.0,
                        "te_ms": 8.0, "regime": "noise_blur", "fft": "centred orthonormal 2D FFT"})
    k = read_kspace_file(path)
    assert k.layout == "lfmri-legacy" and k.nifti_order and k.mask is None
    np.testing.assert_array_equal(k.kspace[:, 0], raw)
    assert k.scalars["fwhm_px"].tolist() == [1.0, 1.0] and k.scalars["t2star_ms"][0] == np.inf


def _write(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


BROKEN = {
    "no kspace": (lambda p: _write(p, image=np.ones((2, 8, 8), np.float32)),
                  "no dataset 'kspace' (has: image)"),
    "wrong ndim": (lambda p: _write(p, kspace=_kspace((8, 8))),
                   "must be [slices, coils, H, W] or [slices, H, W]"),
    "real": (lambda p: _write(p, kspace=np.ones((2, 8, 8, 2), np.float32)),
             "'kspace' must be complex, got float32 (a real/imaginary pair"),
    "nan": (lambda p: _write(p, kspace=np.where(np.arange(64).reshape(1, 8, 8) == 3, np.nan, 1).astype(
        np.complex64)), "1 k-space sample(s) are NaN or Inf"),
    "all zero": (lambda p: _write(p, kspace=np.zeros((2, 3, 8, 8), np.complex64)),
                 "every k-space sample is zero"),
    "mask length": (lambda p: _write(p, kspace=_kspace((2, 3, 8, 10)), mask=np.ones(8, bool)),
                    "'mask' has 8 entries but k-space has W = 10"),
    "mask empty": (lambda p: _write(p, kspace=_kspace((2, 3, 8, 10)), mask=np.zeros(10, bool)),
                   "'mask' samples nothing"),
    "too small": (lambda p: _write(p, kspace=_kspace((2, 3, 8, 5))), "at least 7x7"),
    "sigma": (lambda p: _write(p, kspace=_kspace((2, 8, 8)), noise_sigma=np.array([1.0, -1.0])),
              "'noise_sigma' must be 2 finite values > 0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_refused_in_one_line(tmp_path: Path, case: str) -> None:
    make, problem = BROKEN[case]
    path = make(tmp_path / "bad.h5")
    with pytest.raises(InputError) as info:
        read_kspace_file(path)
    message = str(info.value)
    assert message.startswith(f"INPUT {path}: ") and problem in message and "\n" not in message


def test_not_hdf5_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("not an HDF5 file")
    with pytest.raises(InputError, match=rf"^INPUT {path}: not a readable HDF5 file"):
        read_kspace_file(path)
