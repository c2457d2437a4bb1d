"""LowFieldDataModule on the shipped real data: splits, determinism, epochs, normalisation, volumes,
predict."""

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.datamodule import ALL_REGIMES, LowFieldDataModule
from datamodules.errors import InputError
from datamodules.transforms import fit_to_square, restore_shape
from degradations import ForwardOperator, channels_to_complex, fft2c

KW = dict(
    source="bundled",
    image_size=32,
    batch_size=4,
    eval_slices_per_volume=3,
    bundled_train_subjects=2,
    bundled_val_subjects=1,
    seed=7,
)


@pytest.fixture(scope="module")
def dm():
    dm = LowFieldDataModule(**KW)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _same(a: dict, b: dict) -> None:
    assert a["subject"] == b["subject"] and a["regime"] == b["regime"] and int(a["slice"]) == int(b["slice"])
    for key in ("clean", "degraded", "y", "scale"):
        assert torch.equal(a[key], b[key]), key
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key


def test_bundled_split_is_disjoint_and_holds_real_volumes_out_for_test(dm):
    split = dm.split
    assert split.sizes() == {"train": 2, "val": 1, "test": 2}
    assert not set(split.train) & set(split.val) and not set(split.test) & (set(split.train) | set(split.val))
    assert all(s.startswith("pseudo-mni-train-") for s in split.train)
    assert all(s.startswith("pseudo-mni-val-") for s in split.val)
    assert split.test == ["real-nibabel-anatomical", "real-nibabel-epi"]
    assert {dm.train_dataset[i]["subject"] for i in range(0, len(dm.train_dataset), 37)} <= set(split.train)
    assert len(dm.test_dataset) == 2 * 3 * len(ALL_REGIMES)


def test_val_and_test_samples_are_identical_across_instances(dm):
    other = LowFieldDataModule(**KW)
    other.setup("fit")
    other.setup("test")
    for a_ds, b_ds in ((dm.val_dataset, other.val_dataset), (dm.test_dataset, other.test_dataset)):
        assert len(a_ds) == len(b_ds)
        for i in range(len(a_ds)):
            _same(a_ds[i], b_ds[i])
    different_seed = LowFieldDataModule(**{**KW, "seed": 8})
    different_seed.setup("test")
    assert not torch.equal(dm.test_dataset[0]["y"], different_seed.test_dataset[0]["y"])


def test_test_batches_are_identical_with_0_and_2_workers(dm):
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(dm.test_dataset, batch_size=5, num_workers=workers)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["subject"] == b["subject"] and a["regime"] == b["regime"]
        assert torch.equal(a["y"], b["y"]) and torch.equal(a["clean"], b["clean"])
        assert torch.equal(a["params"]["b0_map_hz"], b["params"]["b0_map_hz"])


def test_training_samples_differ_between_epochs_and_repeat_with_the_global_seed(dm):
    def epoch(workers: int) -> dict:
        loader = DataLoader(dm.train_dataset, batch_size=16, num_workers=workers, shuffle=True)
        out = {}
        for i, batch in enumerate(loader):
            for subj, s, snr in zip(batch["subject"], batch["slice"], batch["params"]["snr_db"], strict=True):
                out[(subj, int(s))] = float(snr)
            if i == 3:
                break
        return out

    for workers in (0, 2):
        torch.manual_seed(0)
        first, second = epoch(workers), epoch(workers)
        common = set(first) & set(second)
        assert sum(first[k] != second[k] for k in common) >= 0.9 * len(common)
        torch.manual_seed(0)
        assert epoch(workers) == first


def test_normalisation_round_trip_returns_input_units():
    dm = LowFieldDataModule(
        source="bundled",
        image_size=128,
        bundled_train_subjects=1,
        bundled_val_subjects=0,
        eval_regimes=["noise"],
    )
    dm.setup("test")
    ds = dm.test_dataset
    v = next(i for i, info in enumerate(ds.volumes) if info.record.volume_id == "real-nibabel-epi")
    info = ds.volumes[v]
    index = next(i for i, item in enumerate(ds.items) if item[0] == v)
    sample = ds[index]
    raw = torch.from_numpy(dm.source.load(info.record)[int(sample["slice"])].copy())
    assert info.shape == (96, 128)
    x = channels_to_complex(sample["clean"][None])[0, 0] * sample["scale"]
    assert x.imag.abs().max() == 0
    torch.testing.assert_close(restore_shape(x.real, info.shape), raw, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fit_to_square(raw, 128), x.real, rtol=1e-5, atol=1e-3)
    assert sample["scale"] == pytest.approx(np.percentile(dm.source.load(info.record), 99.5))


def test_volumes_match_the_test_dataset(dm):
    vols = list(dm.volumes("test", regime="noise_blur"))
    assert [v.subject for v in vols] == dm.test_subjects
    ds = dm.test_dataset
    for vol in vols:
        assert vol.clean.shape == (3, 2, 32, 32) and vol.y.shape == (3, 1, 32, 32)
        for j, s in enumerate(vol.slices.tolist()):
            i = ds.items.index(
                (
                    next(k for k, info in enumerate(ds.volumes) if info.record.volume_id == vol.subject),
                    s,
                    "noise_blur",
                )
            )
            assert torch.equal(ds[i]["y"], vol.y[j]) and torch.equal(ds[i]["clean"], vol.clean[j])
        assert "path" in vol.meta


def test_predict_reads_a_low_field_nifti_without_reference(tmp_path):
    data = np.zeros((20, 16, 5), np.float32)
    data[4:16, 3:13] = np.random.default_rng(0).uniform(50, 100, size=(12, 10, 5))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "lowfield.nii.gz"))
    dm = LowFieldDataModule(
        source="bundled", image_size=16, batch_size=5, predict_path=str(tmp_path / "lowfield.nii.gz")
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert "clean" not in batch and batch["regime"] == ["measured"] * 5
    assert batch["slice"].tolist() == [0, 1, 2, 3, 4] and batch["shape"][0].tolist() == [16, 20]
    x = channels_to_complex(batch["degraded"])
    torch.testing.assert_close(ForwardOperator.from_params(batch["params"]).forward(x), batch["y"])
    torch.testing.assert_close(fft2c(x), batch["y"])


def test_bad_arguments():
    with pytest.raises(InputError, match="regime"):
        LowFieldDataModule(regimes=["noise", "earthquake"])
    with pytest.raises(InputError, match="fixes its own split"):
        _ = LowFieldDataModule(split_file="split.yaml").split
    with pytest.raises(InputError, match="predict_path"):
        LowFieldDataModule(bundled_train_subjects=1).setup("predict")
