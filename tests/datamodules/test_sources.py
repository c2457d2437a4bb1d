"""Volume sources on files the tests write: BIDS and flat NIfTI layouts, fastMRI HDF5, and bad input."""

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.datamodule import LowFieldDataModule
from datamodules.sources import FastMRISource, NiftiDirSource, make_source
from datamodules.transforms import to_slices
from degradations import fft2c, ifft2c
from lfmri_utils.errors import InputError


def phantom(shape=(24, 20, 12), seed=0) -> np.ndarray:
    """A smooth blob with texture, > 0 inside, 0 outside."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g**2 for g in grids)
    return ((r2 < 0.8) * (100 + 20 * rng.random(shape))).astype(np.float32)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.1, 0.1, 0.5, 1.0])), str(path))
    return path


@pytest.fixture
def bids(tmp_path):
    for i in range(1, 6):
        write(tmp_path / "bids" / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T2w.nii.gz", phantom(seed=i))
    write(tmp_path / "bids" / "sub-05" / "ses-2" / "anat" / "sub-05_ses-2_T2w.nii", phantom(seed=9))
    return tmp_path / "bids"


def test_bids_layout_subjects_and_volume_ids(bids):
    src = NiftiDirSource(bids)
    recs = src.records()
    assert sorted({r.subject for r in recs}) == [f"sub-{i:02d}" for i in range(1, 6)]
    ids = {r.volume_id for r in recs}
    assert len(ids) == 6 and {"sub-01", "sub-05_T2w", "sub-05_ses-2_T2w"} <= ids
    stack = src.load(next(r for r in recs if r.subject == "sub-01"))
    np.testing.assert_allclose(stack, to_slices(phantom(seed=1), 2))
    assert src.metadata(recs[0])["zooms_mm"] == pytest.approx((0.1, 0.1, 0.5))


def test_flat_layout_and_pattern(tmp_path):
    for name in ("mouse_a", "mouse_b", "mouse_c"):
        write(tmp_path / f"{name}.nii.gz", phantom())
    (tmp_path / "notes.txt").write_text("not an image")
    src = make_source(str(tmp_path))
    assert isinstance(src, NiftiDirSource)
    assert [r.subject for r in src.records()] == ["mouse_a", "mouse_b", "mouse_c"]


def test_a_folder_of_degrade_outputs_reads_the_niftis_not_their_sidecars(tmp_path):
    """`lfmri degrade` writes `x.nii.gz.json` beside `x.nii.gz`; the default pattern `**/*.nii*` matches both,
    and only the NIfTI is a volume."""
    write(tmp_path / "low.nii.gz", phantom())
    (tmp_path / "low.nii.gz.json").write_text('{"slices": []}')
    write(tmp_path / "plain.nii", phantom())
    assert [r.path for r in NiftiDirSource(tmp_path).records()] == [str(tmp_path / "low.nii.gz"),
                                                                     str(tmp_path / "plain.nii")]


def test_datamodule_from_a_bids_directory_two_ways(bids):
    for kwargs in ({"source": str(bids)}, {"source": NiftiDirSource(bids)}):
        dm = LowFieldDataModule(**kwargs, slices={"crop_size": 16}, loader={"batch_size": 2}, seed=3)
        dm.setup("fit")
        subjects = [set(dm.split[s]) for s in ("train", "val", "test")]
        assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
        batch = next(iter(dm.train_dataloader()))
        assert batch.clean.shape == (2, 2, 16, 16) and batch.y.dtype == torch.complex64
    # sub-05 has two sessions: both volumes are in the same split
    split_of = {s: name for name in ("train", "val", "test") for s in dm.split[name]}
    assert split_of["sub-05"] in ("train", "val", "test")
    assert len([r for r in dm.records(split_of["sub-05"]) if r.subject == "sub-05"]) == 2


def _fastmri(path, kspace, rss=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if rss is not None:
            f.create_dataset("reconstruction_rss", data=rss)
        f.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader><encoding/></ismrmrdHeader>")
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["patient_id"] = "abc123"
        f.attrs["max"] = 1.5


def test_fastmri_multicoil_singlecoil_and_rss(tmp_path):
    g = torch.Generator().manual_seed(0)
    coils = torch.randn(3, 4, 16, 12, dtype=torch.complex64, generator=g)
    _fastmri(tmp_path / "multi.h5", fft2c(coils).numpy(), rss=np.ones((3, 16, 12), np.float32))
    single = torch.randn(2, 16, 12, dtype=torch.complex64, generator=g)
    _fastmri(tmp_path / "single.h5", fft2c(single).numpy())

    multi_k = FastMRISource(tmp_path / "multi.h5", key="kspace")
    rec = multi_k.records()[0]
    torch.testing.assert_close(
        torch.from_numpy(multi_k.load(rec)), coils.abs().pow(2).sum(1).sqrt(), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_array_equal(FastMRISource(tmp_path / "multi.h5").load(rec), 1.0)  # auto -> RSS
    single_src = FastMRISource(tmp_path / "single.h5")
    stack = single_src.load(single_src.records()[0])
    assert stack.dtype == np.complex64
    torch.testing.assert_close(torch.from_numpy(stack), ifft2c(fft2c(single)), atol=1e-5, rtol=1e-5)
    meta = multi_k.metadata(rec)
    assert meta["attrs"]["acquisition"] == "CORPD_FBK" and "ismrmrdHeader" in meta["ismrmrd_header"]
    assert isinstance(make_source(str(tmp_path)), FastMRISource)


def test_fastmri_datamodule_on_a_directory(tmp_path):
    for i in range(3):
        img = torch.zeros(4, 2, 20, 20, dtype=torch.complex64)
        img[..., 5:15, 4:16] = 1 + i
        _fastmri(tmp_path / f"file{i}.h5", fft2c(img).numpy())
    dm = LowFieldDataModule(source=FastMRISource(tmp_path), loader={"batch_size": 2})
    dm.setup("fit")
    assert dm.split.sizes() == {"train": 1, "val": 1, "test": 1}
    assert len(dm.train_dataset) == 4
    assert next(iter(dm.train_dataloader())).clean.shape == (2, 2, 20, 20)  # whole native slices
    assert next(iter(dm.val_dataloader())).clean.shape == (2, 2, 20, 20)


# ---- bad input ---------------------------------------------------------------------------------------
def _setup(root, **kw):
    dm = LowFieldDataModule(source=str(root), **kw)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_empty_directory(tmp_path):
    with pytest.raises(InputError, match=r"no NIfTI files match"):
        _setup(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match=r"nope.*not found"):
        _setup(tmp_path / "nope")


@pytest.mark.parametrize("kind", ["corrupt", "2d", "4d", "nan"])
def test_bad_file_names_the_file_and_the_problem(tmp_path, kind):
    for i in range(3):
        write(tmp_path / f"good{i}.nii.gz", phantom())
    bad = tmp_path / "bad.nii.gz"
    if kind == "corrupt":
        bad.write_bytes(b"\x1f\x8b this is not a gzip stream")
        problem = "not a NIfTI|cannot read"
    elif kind == "2d":
        write(bad, phantom()[:, :, 0])
        problem = "3D"
    elif kind == "4d":
        write(bad, np.stack([phantom()] * 2, axis=-1))
        problem = "3D"
    else:
        data = phantom()
        data[3, 3, 3] = np.nan
        write(bad, data)
        problem = "NaN"
    with pytest.raises(InputError, match=rf"bad\.nii\.gz.*({problem})") as info:
        _setup(tmp_path, test_fraction=0.4, val_fraction=0.3)
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match=r"skipped 1 bad input file.*bad\.nii\.gz"):
        dm = _setup(tmp_path, test_fraction=0.4, val_fraction=0.3, skip_bad_files=True)
    assert len(dm.skipped) == 1


def test_split_file_with_unknown_subject(bids, tmp_path):
    split = tmp_path / "split.yaml"
    split.write_text("train: [sub-01, sub-42]\ntest: [sub-02]\n")
    with pytest.raises(InputError, match=r"split\.yaml.*sub-42"):
        _setup(bids, split_file=str(split))
    split.write_text("train: [sub-01, sub-03, sub-04]\nval: [sub-05]\ntest: [sub-02]\n")
    dm = _setup(bids, split_file=str(split))
    assert [r.volume_id for r in dm.records("test")] == ["sub-02"]


def test_unreadable_hdf5(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"x\.h5.*HDF5"):
        src = FastMRISource(tmp_path)
        src.load(src.records()[0])


@pytest.mark.parametrize("shape", [(2, 16, 12), (2, 3, 16, 12), (2, 16, 12, 2)])
def test_real_valued_fastmri_kspace_is_refused(tmp_path, shape):
    # the magnitude (or one part) of k-space read as k-space gives mirror-ghosted images: refuse it, naming
    # the file and the problem; a real/imaginary pair in a last axis of 2 is named as such
    _fastmri(tmp_path / "real.h5", np.ones(shape, np.float32))
    src = FastMRISource(tmp_path / "real.h5", key="kspace")
    with pytest.raises(InputError, match=r"real\.h5.*'kspace'.*real-valued \(float32, shape") as info:
        src.load(src.records()[0])
    assert "\n" not in str(info.value)
    assert ("last axis of 2" in str(info.value)) == (shape[-1] == 2)
    auto = FastMRISource(tmp_path / "real.h5")  # no reconstruction_rss: auto reads the k-space
    with pytest.raises(InputError, match=r"real-valued"):
        auto.load(auto.records()[0])
