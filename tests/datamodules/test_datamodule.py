"""LowFieldDataModule on the shipped real data and on small NIfTI files: splits, determinism, epochs,
normalisation, native resolution, training crops, shape-grouped evaluation batches, volumes, predict."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from datamodules.datamodule import LowFieldDataModule, ShapeGroupedBatchSampler
from datamodules.dataset import SliceOptions
from datamodules.samples import MeasuredSample, SliceSample
from datamodules.sources import BundledSource
from datamodules.transforms import fit_to_square, restore_shape
from degradations import REGIMES as ALL_REGIMES
from degradations import ForwardOperator, channels_to_complex, fft2c, gaussian_mtf, ifft2c
from lfmri_utils.errors import InputError

KW = dict(
    slices={"crop_size": 32, "eval_per_volume": 3},
    loader={"batch_size": 4},
    seed=7,
)
BUNDLED = dict(n_train=2, n_val=1)  # the source of the data modules built with KW: BundledSource(**BUNDLED)


@pytest.fixture(scope="module")
def dm():
    dm = LowFieldDataModule(BundledSource(**BUNDLED), **KW)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _same(a: SliceSample, b: SliceSample) -> None:
    assert a.volume_id == b.volume_id and a.regime == b.regime
    assert int(a.slice) == int(b.slice)
    for key in ("clean", "degraded", "y", "scale"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key]), key


def _write(path, data: np.ndarray):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """A NIfTI directory: volumes "a", "b" (train) and "c" (val) of uniform noise in [50, 100] (every window
    of a slice is unique, every pixel foreground), 6 slices of 40 x 36 along axis 2; "d": 30 x 36 slices."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _write(root / f"{name}.nii.gz", rng.uniform(50, 100, size=(40, 36, 6)))
    _write(root / "d.nii.gz", rng.uniform(50, 100, size=(30, 36, 6)))
    (root / "split.yaml").write_text("train: [a, b]\nval: [c]\ntest: [d]\n")
    (root / "split_mixed.yaml").write_text("train: [a, d]\nval: [c]\ntest: [b]\n")
    (root / "split_two_shapes.yaml").write_text("train: [a]\nval: [b]\ntest: [c, d]\n")
    return root


def _textured_dm(root, **kw) -> LowFieldDataModule:
    args = dict(source=str(root), split_file=str(root / "split.yaml"), loader={"batch_size": 4}, seed=3)
    return LowFieldDataModule(**{**args, **kw})


def _locate(window: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    """(top, left) of the one exact occurrence of window [c, c] in image [h, w] (real tensors)."""
    c = window.shape[-1]
    patches = image.unfold(0, c, 1).unfold(1, c, 1)  # [h - c + 1, w - c + 1, c, c]
    hits = (patches == window).all(-1).all(-1).nonzero()
    assert len(hits) == 1, f"{len(hits)} occurrences"
    return int(hits[0, 0]), int(hits[0, 1])


def _normalised_slice(ds, v: int, s: int) -> torch.Tensor:
    """The normalised native clean slice [h, w] of volume v, read from its source directly (real part of the
    complex64 normalisation, as the dataset computes it)."""
    raw = torch.from_numpy(ds.source.load(ds.volumes[v].record)[s].copy())
    return (raw.to(torch.complex64) / ds.volumes[v].scale).real


# ---- splits and determinism ----------------------------------------------------------------------------
def test_bundled_split_is_disjoint_and_holds_real_volumes_out_for_test(dm):
    split = dm.split
    assert split.sizes() == {"train": 2, "val": 1, "test": 1}
    assert not set(split.train) & set(split.val) and not set(split.test) & (set(split.train) | set(split.val))
    assert all(s.startswith("pseudo-mni-train-") for s in split.train)
    assert all(s.startswith("pseudo-mni-val-") for s in split.val)
    assert split.test == ["real-colin27"]  # one real subject, the Colin27 brain shipped in datamodules/data
    assert {dm.train_dataset[i].volume_id for i in range(0, len(dm.train_dataset), 37)} <= set(split.train)
    assert len(dm.test_dataset) == 1 * 3 * len(ALL_REGIMES)


def test_val_and_test_samples_are_identical_across_instances(dm):
    other = LowFieldDataModule(BundledSource(**BUNDLED), **KW)
    other.setup("fit")
    other.setup("test")
    for a_ds, b_ds in ((dm.val_dataset, other.val_dataset), (dm.test_dataset, other.test_dataset)):
        assert len(a_ds) == len(b_ds)
        for i in range(len(a_ds)):
            _same(a_ds[i], b_ds[i])
    different_seed = LowFieldDataModule(BundledSource(**BUNDLED), **{**KW, "seed": 8})
    different_seed.setup("test")
    assert not torch.equal(dm.test_dataset[0].y, different_seed.test_dataset[0].y)


def test_test_batches_are_identical_with_0_and_2_workers(dm):
    ds = dm.test_dataset
    batches = {}
    for workers in (0, 2):
        sampler = ShapeGroupedBatchSampler(SequentialSampler(ds), 5, ds.item_shapes())
        batches[workers] = list(DataLoader(ds, batch_sampler=sampler, num_workers=workers))
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.volume_id == b.volume_id and a.regime == b.regime
        assert torch.equal(a.y, b.y) and torch.equal(a.clean, b.clean)
        assert torch.equal(a.params["b0_map_hz"], b.params["b0_map_hz"])


@pytest.mark.slow
def test_training_samples_differ_between_epochs_and_repeat_with_the_epoch(dm):
    """The one seeding rule: a sample is a function of (seed, epoch, index); a plain DataLoader (any workers,
    any global RNG) sees new draws when the epoch is set, the same ones again for the same epoch."""
    def epoch(workers: int, n: int) -> dict:
        dm.train_dataset.set_epoch(n)
        loader = DataLoader(dm.train_dataset, batch_size=16, num_workers=workers, shuffle=True)
        out = {}
        for i, batch in enumerate(loader):
            snrs = batch.params["snr_db"]
            for vid, s, snr in zip(batch.volume_id, batch.slice, snrs, strict=True):
                out[(vid, int(s))] = float(snr)
            if i == 3:
                break
        return out

    firsts = []
    for workers in (0, 2):
        torch.manual_seed(0)  # the shuffle: the same slices in both epochs
        first = epoch(workers, 0)
        torch.manual_seed(0)
        second = epoch(workers, 1)
        common = set(first) & set(second)
        assert common and sum(first[k] != second[k] for k in common) >= 0.9 * len(common)
        torch.manual_seed(123)  # another shuffle and global RNG: the same draws for the same samples
        again = epoch(workers, 0)
        assert set(again) & set(first) and all(again[k] == first[k] for k in set(again) & set(first))
        firsts.append(first)
    assert firsts[0] == firsts[1]  # and the worker count does not matter
    dm.train_dataset.set_epoch(0)


# ---- native resolution and the explicit resize -----------------------------------------------------------
def test_native_samples_are_the_normalised_slices_in_input_units():
    dm = LowFieldDataModule(source=BundledSource(n_train=1, n_val=0), eval_regimes=["noise"])
    dm.setup("test")
    ds = dm.test_dataset
    assert ds.image_size is None
    v = next(i for i, info in enumerate(ds.volumes) if info.record.volume_id == "real-colin27")
    info = ds.volumes[v]
    index = next(i for i, item in enumerate(ds.items) if item[0] == v)
    sample = ds[index]
    stack = dm.source.load(info.record)
    raw = torch.from_numpy(stack[int(sample.slice)].copy())
    # Colin27 is 181 x 217 x 181: slices along axis 2 keep the in-plane axes in array order
    assert info.shape == (181, 217) and tuple(sample.clean.shape) == (2, 181, 217)
    assert sample.y.shape == (1, 181, 217) and sample.params["b0_map_hz"].shape == (1, 181, 217)
    x = channels_to_complex(sample.clean[None])[0, 0] * sample.scale
    assert x.imag.abs().max() == 0
    torch.testing.assert_close(x.real, raw, rtol=1e-6, atol=1e-4)
    assert sample.scale == pytest.approx(np.percentile(stack, 99.5))


def test_explicit_image_size_pads_to_square_and_resizes():
    dm = LowFieldDataModule(
        source=BundledSource(n_train=1, n_val=0),
        slices={"image_size": 128},
        eval_regimes=["noise"],
    )
    dm.setup("test")
    ds = dm.test_dataset
    assert ds.item_shapes() == [(128, 128)] * len(ds)
    v = next(i for i, info in enumerate(ds.volumes) if info.record.volume_id == "real-colin27")
    info = ds.volumes[v]
    index = next(i for i, item in enumerate(ds.items) if item[0] == v)
    sample = ds[index]
    raw = torch.from_numpy(dm.source.load(info.record)[int(sample.slice)].copy())
    assert info.shape == (181, 217) and tuple(sample.clean.shape) == (2, 128, 128)
    x = channels_to_complex(sample.clean[None])[0, 0] * sample.scale
    torch.testing.assert_close(fit_to_square(raw, 128), x.real, rtol=1e-5, atol=1e-3)
    # 217 -> 128 -> 217 is lossy: the restored slice has the native shape and is close to it, not equal
    back = restore_shape(x.real, info.shape)
    assert back.shape == raw.shape and torch.corrcoef(torch.stack([back.ravel(), raw.ravel()]))[0, 1] > 0.95


def test_volumes_are_native_and_match_the_test_dataset(dm):
    vols = list(dm.volumes("test", regime="noise_blur"))
    assert [v.volume_id for v in vols] == [r.volume_id for r in dm.records("test")]
    ds = dm.test_dataset
    shapes = {info.record.volume_id: info.shape for info in ds.volumes}
    assert shapes == {"real-colin27": (181, 217)}
    for vol in vols:
        h, w = shapes[vol.volume_id]
        assert vol.clean.shape == (3, 2, h, w) and vol.y.shape == (3, 1, h, w)
        assert vol.degraded.shape == (3, 2, h, w) and vol.params["b0_map_hz"].shape == (3, 1, h, w)
        for j, s in enumerate(vol.slices.tolist()):
            i = ds.items.index(
                (
                    next(k for k, info in enumerate(ds.volumes) if info.record.volume_id == vol.volume_id),
                    s,
                    "noise_blur",
                )
            )
            assert torch.equal(ds[i].y, vol.y[j]) and torch.equal(ds[i].clean, vol.clean[j])
        assert "path" in vol.meta


# ---- evaluation batches of one shape -------------------------------------------------------------------
def test_eval_loaders_batch_only_items_of_one_shape_in_order(textured):
    # two test volumes of different shapes (the bundled source holds out one subject only)
    split = textured / "split_two_shapes.yaml"
    dm = _textured_dm(textured, split_file=str(split), slices={"eval_per_volume": 3},
                      loader={"batch_size": 4, "eval_batch_size": 5})
    dm.setup("test")
    ds = dm.test_dataset
    shapes = {info.record.volume_id: info.shape for info in ds.volumes}
    assert len(set(shapes.values())) == 2
    sizes, volume_ids = [], []
    for batch in dm.test_dataloader():
        assert len(set(batch.volume_id)) == 1  # the two volumes differ in shape: never in one batch
        assert tuple(batch.clean.shape[-2:]) == shapes[batch.volume_id[0]]
        sizes.append(len(batch.volume_id))
        volume_ids += batch.volume_id
    assert sizes == [5, 5, 2, 5, 5, 2]  # 3 slices x 4 regimes = 12 items per volume
    assert volume_ids == [ds.volumes[item[0]].record.volume_id for item in ds.items]


def test_shape_grouped_batches_end_where_the_shape_changes():
    shapes = [(4, 4)] * 5 + [(8, 6)] * 2 + [(4, 4)] * 3
    batches = ShapeGroupedBatchSampler(range(10), 2, shapes)
    assert list(batches) == [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9]] and len(batches) == 6
    assert list(ShapeGroupedBatchSampler(range(10), 2, shapes, drop_last=True)) == [[0, 1], [2, 3], [5, 6],
                                                                                   [7, 8]]
    # what Lightning does under DDP: the same batch sampler class over a distributed sampler's indices
    for rank in (0, 1):
        sampler = DistributedSampler(range(10), num_replicas=2, rank=rank, shuffle=False)
        for batch in ShapeGroupedBatchSampler(sampler, 3, shapes):
            assert len({shapes[i] for i in batch}) == 1


# ---- training crops ------------------------------------------------------------------------------------
def test_training_crops_are_aligned_windows_of_the_native_slice(textured):
    dm = _textured_dm(textured, slices={"crop_size": 16}, regimes=["noise"],
                      regime_overrides={"snr_db": 120.0})
    dm.setup("fit")
    ds = dm.train_dataset
    assert ds.item_shapes() == [(16, 16)] * len(ds)
    for index in (0, 5, 9):
        sample = ds[index]
        v, s = ds.items[index]
        image = _normalised_slice(ds, v, s)
        assert image.shape == (40, 36)
        clean = channels_to_complex(sample.clean[None])[0, 0]
        top, left = _locate(clean.real, image)  # an exact window of the native slice: no resampling
        degraded = channels_to_complex(sample.degraded[None])[0, 0]
        # at 120 dB SNR the degraded crop is the clean crop at the same window
        torch.testing.assert_close(degraded, clean, rtol=0, atol=1e-4)
        torch.testing.assert_close(sample.y, fft2c(degraded[None]), rtol=1e-5, atol=1e-5)
        assert sample.params["b0_map_hz"].shape == (1, 16, 16)
        assert 0 <= top <= 40 - 16 and 0 <= left <= 36 - 16


def test_the_whole_slice_is_degraded_before_cropping(textured):
    fwhm = 3.0
    dm = _textured_dm(
        textured, slices={"crop_size": 16}, regimes=["noise_blur"],
        regime_overrides={"snr_db": 120.0, "fwhm_px": fwhm}
    )
    dm.setup("fit")
    ds = dm.train_dataset
    sample = ds[2]
    v, s = ds.items[2]
    image = _normalised_slice(ds, v, s).to(torch.complex64)
    top, left = _locate(channels_to_complex(sample.clean[None])[0, 0].real, image.real)
    blurred = ifft2c(fft2c(image[None, None]) * gaussian_mtf(torch.tensor([fwhm]), 40, 36))[0, 0]
    window = blurred[top : top + 16, left : left + 16]
    degraded = channels_to_complex(sample.degraded[None])[0, 0]
    torch.testing.assert_close(degraded, window, rtol=0, atol=1e-4)
    # blurring the crop alone (circular at the crop's edges) is a different image
    crop_alone = image[top : top + 16, left : left + 16][None, None]
    alone = ifft2c(fft2c(crop_alone) * gaussian_mtf(torch.tensor([fwhm]), 16, 16))[0, 0]
    assert (alone - degraded).abs().max() > 1e-2


def test_crop_positions_vary_and_are_a_function_of_seed_epoch_and_index(textured):
    dm = _textured_dm(textured, slices={"crop_size": 16})
    dm.setup("fit")
    ds = dm.train_dataset
    v, s = ds.items[3]
    image = _normalised_slice(ds, v, s)
    samples = ds  # the dataset itself: a sample is a function of (seed, epoch, index)

    def position(epoch: int, index: int = 3) -> tuple[int, int]:
        samples.set_epoch(epoch)
        sample = samples[index]
        return _locate(channels_to_complex(sample.clean[None])[0, 0].real, image)

    positions = [position(epoch) for epoch in range(8)]
    assert len(set(positions)) >= 6  # 25 x 21 possible windows
    torch.manual_seed(123)  # the global RNG does not matter
    assert [position(epoch) for epoch in range(8)] == positions
    samples.set_epoch(2)
    first = samples[3]
    torch.manual_seed(7)
    _same(first, samples[3])
    assert not torch.equal(first.clean, samples[4].clean)


def test_the_training_loader_gives_the_same_crops_with_0_and_2_workers(textured):
    dm = _textured_dm(textured, slices={"crop_size": 16}, loader={"batch_size": 3})
    dm.setup("fit")
    batches = []
    for workers in (0, 2):
        dm.loader = dataclasses.replace(dm.loader, num_workers=workers)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches.append(list(loader))
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.clean, b.clean) and torch.equal(a.degraded, b.degraded)


def test_a_crop_larger_than_the_training_slices_is_refused_at_setup(textured):
    with pytest.raises(InputError, match=r"crop_size 48 is larger than the 40x36 slices of training volume"):
        _textured_dm(textured, slices={"crop_size": 48}).setup("fit")
    dm = _textured_dm(textured, slices={"crop_size": 36})  # as large as the smallest dimension: fine
    dm.setup("fit")
    assert dm.train_dataset[0].clean.shape == (2, 36, 36)


def test_whole_native_training_slices_of_different_shapes_need_crops(textured):
    mixed = str(textured / "split_mixed.yaml")
    with pytest.raises(InputError, match=r"2 different shapes \(30x36, 40x36\).*set slices\.crop_size"):
        _textured_dm(textured, split_file=mixed).setup("fit")
    for ok in ({"slices": {"crop_size": 16}}, {"slices": {"image_size": 16}}, {"loader": {"batch_size": 1}}):
        dm = _textured_dm(textured, split_file=mixed, **ok)
        dm.setup("fit")
        assert next(iter(dm.train_dataloader())).clean.shape[0] == dm.loader.batch_size
    same = _textured_dm(textured)  # a and b share 40 x 36: whole native slices batch
    same.setup("fit")
    assert next(iter(same.train_dataloader())).clean.shape == (4, 2, 40, 36)


# ---- predict and arguments -----------------------------------------------------------------------------
def test_predict_reads_a_low_field_nifti_without_reference(tmp_path):
    data = np.zeros((20, 16, 5), np.float32)
    data[4:16, 3:13] = np.random.default_rng(0).uniform(50, 100, size=(12, 10, 5))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "lowfield.nii.gz"))
    dm = LowFieldDataModule(source="bundled", loader={"batch_size": 5},
                            predict={"path": str(tmp_path / "lowfield.nii.gz")})
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert not hasattr(batch, "clean") and batch.regime == ("measured",) * 5
    assert batch.slice.tolist() == [0, 1, 2, 3, 4] and batch.shape[0].tolist() == [20, 16]
    assert batch.degraded.shape == (5, 2, 20, 16)  # native: the slice itself
    x = channels_to_complex(batch.degraded)
    torch.testing.assert_close(x.real[:, 0] * batch.scale[:, None, None],
                               torch.from_numpy(np.moveaxis(data, 2, 0)), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ForwardOperator.from_params(batch.params).forward(x), batch.y)
    torch.testing.assert_close(fft2c(x), batch.y)


def _check_batch_fields(batch, n: int, h: int, w: int) -> None:
    """The fields `SliceSample` and `MeasuredSample` share, as documented for a batch of n H x W slices."""
    assert batch.degraded.shape == (n, 2, h, w) and batch.degraded.dtype == torch.float32
    assert batch.y.shape == (n, 1, h, w) and batch.y.dtype == torch.complex64
    for strings in (batch.regime, batch.volume_id):
        assert isinstance(strings, tuple) and len(strings) == n and all(isinstance(s, str) for s in strings)
    assert batch.slice.shape == (n,) and batch.slice.dtype == torch.int64
    assert batch.scale.shape == (n,) and batch.scale.dtype == torch.float32
    assert batch.params["b0_map_hz"].shape == (n, 1, h, w)
    assert all(v.shape == (n,) for k, v in batch.params.items() if k != "b0_map_hz")


def test_batches_are_the_documented_sample_types(textured):
    """Training and evaluation samples and their collated batches are `SliceSample`s, prediction ones
    `MeasuredSample`s, with the documented shapes and dtypes; Lightning's device transfer keeps the type."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dm = _textured_dm(textured, slices={"crop_size": 16}, predict={"path": str(textured / "d.nii.gz")})
    dm.setup("fit")
    assert type(dm.train_dataset[0]) is SliceSample and type(dm.val_dataset[0]) is SliceSample
    for batch, (n, h, w) in ((next(iter(dm.train_dataloader())), (4, 16, 16)),
                             (next(iter(dm.val_dataloader())), (4, 40, 36))):
        assert type(batch) is SliceSample
        assert batch.clean.shape == (n, 2, h, w) and batch.clean.dtype == torch.float32
        _check_batch_fields(batch, n, h, w)
        moved = move_data_to_device(batch, torch.device("cpu"))
        assert type(moved) is SliceSample and moved.volume_id == batch.volume_id
        assert moved.params.keys() == batch.params.keys()

    resized = _textured_dm(textured, slices={"image_size": 24}, predict={"path": str(textured / "d.nii.gz")})
    resized.setup("predict")
    assert type(resized.predict_dataset[0]) is MeasuredSample
    batch = next(iter(resized.predict_dataloader()))
    assert type(batch) is MeasuredSample and batch.regime == ("measured",) * 4
    _check_batch_fields(batch, 4, 24, 24)
    assert batch.shape.shape == (4, 2) and batch.shape.dtype == torch.int64
    assert batch.shape.tolist() == [[30, 36]] * 4  # the native slice, not the resized grid
    assert type(move_data_to_device(batch, torch.device("cpu"))) is MeasuredSample


def test_bad_arguments():
    with pytest.raises(InputError, match="regime"):
        LowFieldDataModule(regimes=["noise", "earthquake"])
    with pytest.raises(InputError, match="fixes its own split"):
        _ = LowFieldDataModule(split_file="split.yaml").split
    with pytest.raises(InputError, match=r"predict\.path"):
        LowFieldDataModule(BundledSource(n_train=1)).setup("predict")


@pytest.mark.parametrize("name", ["crop_size", "image_size"])
@pytest.mark.parametrize("value", [7, 0, -16, 32.0, "64", True])
def test_bad_crop_and_image_sizes(name, value):
    with pytest.raises(InputError, match=rf"^slices\.{name} must be null or an integer >= 8"):
        LowFieldDataModule(slices={name: value})


def test_the_data_hyperparameters_are_kept_but_not_merged_into_the_loggers():
    # the model's own image_size (its training crop) shares the key and Lightning refuses two values for one
    # key, so the data module's hyperparameters stay out of the loggers' merge (lfmri logs the whole config)
    dm = LowFieldDataModule(slices={"image_size": 64, "crop_size": 32})
    # kept (checkpoints), as plain values
    assert dm.hparams["slices"] == {**SliceOptions().to_dict(), "image_size": 64, "crop_size": 32}
    assert not dm._log_hyperparams
