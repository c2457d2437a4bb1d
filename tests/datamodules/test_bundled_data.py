"""The data shipped inside the package: the Colin27 test subject (file, checksum, licence, package data) and
the bundled source's split holding it out whole."""

import fnmatch
import hashlib
import importlib.resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO

from datamodules.sources import COLIN27_SHA256, BundledSource
from datamodules.transforms import to_slices

DATA = importlib.resources.files("datamodules") / "data"
SHIPPED = {"colin27_ch2.nii.gz", "LICENSE-colin27.txt", "README.md"}


def test_colin27_is_installed_with_the_package_byte_identical_to_the_debian_file():
    path = Path(str(DATA / "colin27_ch2.nii.gz"))
    assert path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == COLIN27_SHA256
    img = nib.load(path)
    assert img.shape == (181, 217, 181) and img.get_data_dtype() == np.uint8
    assert img.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    readme = (DATA / "README.md").read_text()
    assert COLIN27_SHA256 in readme and "mricron-data" in readme and "1.2.20211006+dfsg-4" in readme
    licence = (DATA / "LICENSE-colin27.txt").read_text()
    assert "Copyright 2006-2010, Chris Rorden" in licence and "Redistribution and use" in licence


def test_only_the_recorded_files_are_shipped_and_pyproject_declares_them_as_package_data():
    assert {p.name for p in DATA.iterdir() if not p.name.startswith(".")} == SHIPPED  # no inia19-* etc.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["datamodules"]
    for name in SHIPPED:
        assert any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns), name


def test_the_test_split_is_exactly_colin27_held_out_from_train_and_val():
    source = BundledSource(n_train=3, n_val=2)
    split = source.fixed_split
    assert split.test == ["real-colin27"]
    assert not set(split.test) & (set(split.train) | set(split.val)) and not set(split.train) & set(split.val)
    assert split.train == [f"pseudo-mni-train-{i:03d}" for i in range(3)]
    assert split.val == [f"pseudo-mni-val-{i:03d}" for i in range(2)]
    (record,) = [r for r in source.records() if r.subject in split.test]
    assert Path(record.path).samefile(Path(str(DATA / "colin27_ch2.nii.gz")))
    assert all(r.path is None for r in source.records() if r.subject not in split.test)  # pseudo-subjects


@pytest.mark.parametrize("axis", [2, 0])
def test_colin27_loads_at_native_resolution_along_the_slice_axis(axis):
    source = BundledSource(n_train=1, n_val=0, slice_axis=axis)
    (record,) = [r for r in source.records() if r.subject == "real-colin27"]
    stack = source.load(record)
    raw = np.asarray(nib.load(record.path).dataobj)
    assert stack.dtype == np.float32 and stack.shape == to_slices(raw, axis).shape
    assert stack.shape == {2: (181, 181, 217), 0: (181, 217, 181)}[axis]
    np.testing.assert_array_equal(stack, to_slices(raw, axis).astype(np.float32))
    meta = source.metadata(record)
    assert meta["shape"] == (181, 217, 181) and meta["zooms_mm"] == pytest.approx((1.0, 1.0, 1.0))
    assert meta["slice_axis"] == axis
