"""Training-crop coverage (`crop_coverage`): "inside" keeps the earlier samples bit for bit; "uniform" crops
(centre uniform over the slice) reach past the edges, where the clean crop is 0 and the degraded one noise at
the sample's own level; the background of the bundled data is then seen about as often as in whole slices."""

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.datamodule import LowFieldDataModule
from datamodules.transforms import crop, crop_origin, random_crop_origin
from degradations import channels_to_complex, fft2c, ifft2c
from lfmri_utils.errors import InputError

H, W = 24, 20  # the synthetic slices


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A NIfTI directory whose slices hold 1 + the pixel's flat index (H x W, 4 slices along axis 2): a crop's
    clean values name the slice pixels it covers. Train: a, b; val: c; test: d."""
    root = tmp_path_factory.mktemp("indexed")
    index = 1 + np.arange(H * W, dtype=np.float32).reshape(H, W)
    for name in "abcd":
        nib.save(nib.Nifti1Image(np.repeat(index[:, :, None], 4, 2), np.eye(4)), str(root / f"{name}.nii.gz"))
    (root / "split.yaml").write_text("train: [a, b]\nval: [c]\ntest: [d]\n")
    return root


def _dm(root, regimes: list[str] | None = None, **slices) -> LowFieldDataModule:
    """The data module of `root` with the `slices` options (crop_size 8 unless given)."""
    dm = LowFieldDataModule(source=str(root), split_file=str(root / "split.yaml"), loader={"batch_size": 4},
                            seed=5, slices={"crop_size": 8, **slices}, regimes=regimes)
    dm.setup("fit")
    return dm


def _coverage(ds, epochs: int) -> tuple[torch.Tensor, int]:
    """How often each slice pixel [H, W] is in a training crop over `epochs` epochs; the number of crops."""
    counts = torch.zeros(H * W)
    n = 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            v = ds.items[i][0]
            values = (ds[i].clean[0] * ds.volumes[v].scale).round().long()
            counts[values[values > 0] - 1] += 1
            n += 1
    return counts.reshape(H, W), n


def _expected_coverage(size: int) -> torch.Tensor:
    """Exact probability [H, W] that a pixel is in a "uniform" crop: the centre c (top = c - size // 2) is
    uniform over each axis's pixels, the axes independent."""
    def axis(n: int) -> torch.Tensor:
        tops = torch.arange(n) - size // 2
        pixels = torch.arange(n)[:, None]
        return ((pixels >= tops) & (pixels < tops + size)).float().mean(1)

    return axis(H)[:, None] * axis(W)[None, :]


# ---- transforms ----------------------------------------------------------------------------------------
def test_crop_past_the_edges_is_the_zero_padded_window():
    x = torch.randn(2, 1, 12, 10, dtype=torch.complex64)
    padded = torch.nn.functional.pad(x, (8, 8, 8, 8))  # complex constant padding: zeros
    for top, left in ((-4, -3), (7, 5), (-8, 9), (11, -1), (2, 1)):
        window = padded[..., top + 8 : top + 16, left + 8 : left + 16]
        torch.testing.assert_close(crop(x, top, left, 8), window, rtol=0, atol=0)
    assert not crop(x, 12, 0, 8).any()  # entirely outside: all zero


def test_crop_origin_inside_is_random_crop_origin_and_uniform_spans_the_centres():
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    inside = [crop_origin((20, 30), 8, a) for _ in range(50)]
    assert inside == [random_crop_origin((20, 30), 8, b) for _ in range(50)]
    g = torch.Generator().manual_seed(0)
    for shape, size in (((20, 30), 8), ((5, 6), 8), ((20, 30), 9)):
        origins = [crop_origin(shape, size, g, "uniform") for _ in range(3000)]
        for axis, n in enumerate(shape):
            assert {o[axis] for o in origins} == set(range(-(size // 2), n - size // 2))
    with pytest.raises(ValueError, match="centre"):
        crop_origin((20, 30), 8, g, "centre")


# ---- the data module -----------------------------------------------------------------------------------
def test_inside_is_the_default_and_reproduces_the_earlier_samples_bit_for_bit(indexed):
    unset = _dm(indexed, crop_size=16).train_dataset  # the option left out: today's samples
    inside = _dm(indexed, crop_size=16, crop_coverage="inside").train_dataset
    assert unset.crop_coverage == "inside"
    for epoch in (0, 2):
        unset.set_epoch(epoch)
        inside.set_epoch(epoch)
        for i in range(len(unset)):
            a, b = unset[i], inside[i]
            # the earlier algorithm written out: regime, whole-slice degradation, window inside the slice
            v, s = unset.items[i]
            g = unset.generator(i)
            regime = unset.regimes[int(torch.randint(len(unset.regimes), (1,), generator=g))]
            x, y, params = unset._degrade(v, s, unset.degradations[regime], g)
            top, left = random_crop_origin(x.shape[-2:], 16, g)
            rows, cols = slice(top, top + 16), slice(left, left + 16)
            degraded = ifft2c(y)[..., rows, cols]
            assert a.regime == b.regime == regime
            for sample in (a, b):
                assert torch.equal(channels_to_complex(sample.clean[None]), x[..., rows, cols])
                assert torch.equal(channels_to_complex(sample.degraded[None]), degraded)
                assert torch.equal(sample.y, fft2c(degraded)[0])
                assert torch.equal(sample.params["b0_map_hz"], params["b0_map_hz"][0, :, rows, cols])
                assert torch.equal(sample.params["noise_sigma"], params["noise_sigma"][0])


def test_uniform_crops_cover_the_interior_uniformly_and_reach_the_corners(indexed):
    size = 8
    uniform, n = _coverage(_dm(indexed, crop_coverage="uniform", regimes=["noise"]).train_dataset, 250)
    inside, _ = _coverage(_dm(indexed, crop_coverage="inside", regimes=["noise"]).train_dataset, 250)
    freq, expected = uniform / n, _expected_coverage(size)
    # every pixel: its exact probability, within 4.5 binomial standard deviations
    tolerance = 4.5 * (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= tolerance).all(), float(((freq - expected).abs() / tolerance).max())
    # pixels at least size / 2 from the edges: uniform, size^2 / (H W) each
    interior = freq[size // 2 : H - size // 2, size // 2 : W - size // 2]
    level = size * size / (H * W)
    assert ((interior - level).abs() <= 4.5 * (level * (1 - level) / n) ** 0.5).all()
    # edges about half as often, corners about a quarter; "inside" windows almost never reach a corner
    corners = freq[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners > 0.2 * level).all()
    assert (inside[[0, 0, -1, -1], [0, -1, 0, -1]] / n < 0.1 * level).all()
    assert inside[H // 2, W // 2] / n > 1.5 * level  # and their centre more often


def test_outside_the_slice_clean_is_zero_and_degraded_is_noise_at_the_recorded_level(indexed):
    size = 16
    ds = _dm(indexed, crop_size=size, crop_coverage="uniform").train_dataset
    assert ds.item_shapes() == [(size, size)] * len(ds)
    whitened, padded = [], 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            sample = ds[i]
            v, s = ds.items[i]
            # the documented algorithm: the "inside" draws, the centre-uniform window, then the noise outside
            g = ds.generator(i)
            regime = ds.regimes[int(torch.randint(len(ds.regimes), (1,), generator=g))]
            x, y, params = ds._degrade(v, s, ds.degradations[regime], g)
            top, left = crop_origin(x.shape[-2:], size, g, "uniform")
            inside = crop(torch.ones(H, W, dtype=torch.bool), top, left, size)
            noise = torch.randn(1, 1, size, size, dtype=torch.complex64, generator=g) * params["noise_sigma"]
            clean = channels_to_complex(sample.clean[None])[0, 0]
            degraded = channels_to_complex(sample.degraded[None])[0, 0]
            assert torch.equal(clean, crop(x, top, left, size)[0, 0])
            assert not clean[~inside].any()  # exactly zero
            assert torch.equal(degraded[inside], crop(ifft2c(y), top, left, size)[0, 0][inside])
            assert torch.equal(degraded[~inside], noise[0, 0][~inside])
            assert not sample.params["b0_map_hz"][0][~inside].any()
            torch.testing.assert_close(sample.y, fft2c(degraded[None]), rtol=1e-5, atol=1e-5)
            if not inside.all():
                whitened.append(degraded[~inside] / sample.params["noise_sigma"])
                padded += int((~inside).sum())
    z = torch.cat(whitened)
    assert padded > 3000
    # std 1 per complex pixel, 1 / sqrt(2) per part, zero mean (relative s.e. of a variance ~ sqrt(2 / n))
    assert abs(float((z.abs() ** 2).mean()) - 1) < 5 * (1 / len(z)) ** 0.5
    for part in (z.real, z.imag):
        assert abs(float(part.var()) - 0.5) < 5 * 0.5 * (2 / len(z)) ** 0.5
        assert abs(float(part.mean())) < 5 * (0.5 / len(z)) ** 0.5


def test_uniform_takes_slices_smaller_than_the_crop_and_leaves_evaluation_alone(indexed):
    with pytest.raises(InputError, match="crop_size 32 is larger than the 24x20 slices"):
        _dm(indexed, crop_size=32)
    dm = _dm(indexed, crop_size=32, crop_coverage="uniform")
    sample = dm.train_dataset[0]
    assert sample.clean.shape == (2, 32, 32) and sample.params["b0_map_hz"].shape == (1, 32, 32)
    assert int((sample.clean[0] != 0).sum()) <= H * W
    # validation / test samples are whole slices, the same whatever the training crops
    other = _dm(indexed, crop_size=8)
    other.setup("test")
    dm.setup("test")
    for a, b in ((dm.val_dataset[3], other.val_dataset[3]), (dm.test_dataset[1], other.test_dataset[1])):
        assert a.clean.shape == (2, H, W)
        assert torch.equal(a.clean, b.clean) and torch.equal(a.degraded, b.degraded) and torch.equal(a.y, b.y)


@pytest.mark.parametrize("value", ["centre", "Uniform", "", None, 1, ["inside"]])
def test_a_bad_crop_coverage_is_one_input_error_naming_the_option(value):
    message = r"^slices\.crop_coverage must be one of inside, uniform, got .*$"
    with pytest.raises(InputError, match=message) as err:
        LowFieldDataModule(slices={"crop_coverage": value})
    assert "\n" not in str(err.value)


def test_uniform_crops_see_the_background_of_the_bundled_data_about_as_often_as_whole_slices():
    """Background: |clean| < 0.1 x the slice's maximum |clean|; the same 64 seeded samples per setting."""
    dm = LowFieldDataModule(source="bundled", slices={"crop_size": 64}, seed=0)
    dm.setup("fit")
    ds = dm.train_dataset
    picks = torch.randint(len(ds), (64,), generator=torch.Generator().manual_seed(0)).tolist()
    thresholds = {i: 0.1 * ds.normalised_slice(*ds.items[i])[0, 0].abs().max() for i in picks}
    whole = [float((ds.normalised_slice(*ds.items[i])[0, 0].abs() < thresholds[i]).float().mean())
             for i in picks]
    rates = {"whole": float(np.mean(whole))}
    for coverage in ("inside", "uniform"):
        ds.crop_coverage = coverage
        rates[coverage] = float(np.mean([(ds[i].clean.square().sum(0).sqrt() < thresholds[i]).float().mean()
                                         for i in picks]))
    # over all slices and window positions: whole 0.53, inside 0.29, uniform 0.55 (`LowFieldDataModule`)
    assert rates["inside"] < rates["whole"] - 0.15, rates
    assert abs(rates["uniform"] - rates["whole"]) < 0.1, rates
