"""The data module's `source` option: a VolumeSource object (kept as is) or a string shorthand ("bundled", a
path); the retired "nifti" / "fastmri" names; how the data module's slice_axis reaches a source."""

import io

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.datamodule import LowFieldDataModule
from datamodules.sources import BundledSource, FastMRISource, NiftiDirSource, make_source
from lfmri_utils.errors import InputError


@pytest.fixture
def volume_dir(tmp_path):
    data = np.zeros((12, 10, 8), np.float32)
    data[2:10, 2:8, 2:6] = 1.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "a.nii.gz"))
    return tmp_path


@pytest.mark.parametrize(("name", "cls"), [("nifti", "NiftiDirSource"), ("fastmri", "FastMRISource")])
def test_the_retired_names_without_a_path_are_one_clear_line(name, cls):
    for build in (lambda: LowFieldDataModule(source=name), lambda: make_source(name)):
        with pytest.raises(InputError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"source {name!r}")
        assert "source: /data/dir" in message and f"datamodules.sources.{cls}" in message


def test_a_missing_path_is_refused_when_the_data_is_first_read(tmp_path):
    dm = LowFieldDataModule(source=str(tmp_path / "nowhere"))  # nothing is read at construction
    with pytest.raises(InputError, match=r"nowhere: data source not found"):
        dm.setup("fit")


def test_a_source_of_another_type_is_refused():
    with pytest.raises(InputError, match=r"^source: expected a VolumeSource or a string"):
        LowFieldDataModule(source=3)


def test_a_source_object_is_used_as_is_and_the_shorthand_builds_one(volume_dir):
    obj = NiftiDirSource(volume_dir, pattern="*.nii.gz")
    assert LowFieldDataModule(source=obj).source is obj and make_source(obj) is obj
    bundled = LowFieldDataModule(source="bundled", slices={"slice_axis": 0}).source
    assert isinstance(bundled, BundledSource) and (bundled.n_train, bundled.n_val, bundled.seed) == (8, 2, 0)
    assert bundled.slice_axis == 0
    short = LowFieldDataModule(source=str(volume_dir), slices={"slice_axis": -2}).source  # -2: axis 1
    assert isinstance(short, NiftiDirSource) and short.pattern == "**/*.nii*" and short.slice_axis == 1


def test_the_data_modules_slice_axis_reaches_a_source_that_leaves_it_unset(volume_dir):
    alone = NiftiDirSource(volume_dir)
    assert alone.slice_axis is None and alone.load(alone.records()[0]).shape == (8, 12, 10)  # axis 2 alone
    source = NiftiDirSource(volume_dir)
    LowFieldDataModule(source=source, slices={"slice_axis": 1})
    assert source.slice_axis == 1 and source.load(source.records()[0]).shape == (10, 12, 8)
    same = NiftiDirSource(volume_dir, slice_axis=1)
    LowFieldDataModule(source=same, slices={"slice_axis": 1})  # the same axis twice is fine
    with pytest.raises(InputError, match=r"^slice_axis: the nifti source's slice_axis 0 differs from the "
                                         r"data module's 2; set it once"):
        LowFieldDataModule(source=NiftiDirSource(volume_dir, slice_axis=0))
    fastmri = FastMRISource(volume_dir)  # sliced along its axis 0 whatever the data module's slice_axis
    LowFieldDataModule(source=fastmri, slices={"slice_axis": 1})
    assert fastmri.slice_axis is None


def test_a_source_object_is_kept_in_the_hyperparameters_as_plain_values(volume_dir):
    dm = LowFieldDataModule(source=BundledSource(n_train=2, n_val=1), slices={"slice_axis": 0})
    assert dm.hparams["source"] == {"class_path": "datamodules.sources.BundledSource",
                                    "init_args": {"n_train": 2, "n_val": 1, "seed": 0, "slice_axis": 0}}
    nifti = LowFieldDataModule(source=NiftiDirSource(volume_dir, "*.nii.gz"))
    assert nifti.hparams["source"]["init_args"] == {"root": str(volume_dir), "pattern": "*.nii.gz",
                                                    "slice_axis": 2}
    assert LowFieldDataModule(source="bundled").hparams["source"] == "bundled"
    buffer = io.BytesIO()  # what a checkpoint stores of the data module loads with weights_only=True
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["datamodule_hyper_parameters"]["source"] == dm.hparams["source"]
