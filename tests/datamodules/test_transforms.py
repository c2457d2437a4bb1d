"""Slice geometry and normalisation: exact inverses where they must be."""

import numpy as np
import pytest
import torch

from datamodules.transforms import (
    crop,
    fit_to_square,
    from_slices,
    random_crop_origin,
    restore_shape,
    robust_scale,
    to_slices,
)


def test_to_slices_moves_the_slice_axis_first_without_turning_and_back_is_exact():
    vol = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    for axis in range(3):
        stack = to_slices(vol, axis)
        # the `lfmri degrade` / `lfmri reconstruct` layout: in-plane axes in array order, W (readout) last
        np.testing.assert_array_equal(stack, np.moveaxis(vol, axis, 0))
        np.testing.assert_array_equal(from_slices(stack, axis), vol)
    assert to_slices(vol, 2).shape == (7, 5, 6) and to_slices(vol, 0).shape == (5, 6, 7)
    assert to_slices(vol, 2)[3, 1, 4] == vol[1, 4, 3]


def test_crop_inside_the_slice_is_the_window():
    x = torch.randn(2, 1, 12, 10, dtype=torch.complex64)
    torch.testing.assert_close(crop(x, 3, 2, 8), x[..., 3:11, 2:10], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(20, 30), (8, 30), (8, 8)])
def test_random_crop_origin_covers_exactly_the_valid_offsets(shape):
    size = 8
    g = torch.Generator().manual_seed(0)
    origins = [random_crop_origin(shape, size, g) for _ in range(3000)]
    for axis, n in enumerate(shape):
        assert {o[axis] for o in origins} == set(range(0, n - size + 1))
    again = torch.Generator().manual_seed(0)
    assert [random_crop_origin(shape, size, again) for _ in range(5)] == origins[:5]
    with pytest.raises(ValueError, match="does not fit"):
        random_crop_origin((7, 30), size, g)


def test_fit_to_square_pads_centred_and_restores_exactly_without_resampling():
    x = torch.randn(3, 10, 16, dtype=torch.complex64)
    sq = fit_to_square(x, 16)
    assert sq.shape == (3, 16, 16)
    assert torch.all(sq[:, :3] == 0) and torch.all(sq[:, 13:] == 0)
    torch.testing.assert_close(restore_shape(sq, (10, 16)), x)


def test_resize_keeps_a_constant_image_constant_and_round_trips_smooth_images():
    x = torch.ones(1, 40, 40)
    torch.testing.assert_close(fit_to_square(x, 24), torch.ones(1, 24, 24))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 48), indexing="ij")
    smooth = torch.exp(-(xx**2 + yy**2) * 6)[None]
    back = restore_shape(fit_to_square(smooth, 128), (64, 48))
    assert (back - smooth).abs().max() < 0.02


def test_robust_scale_ignores_a_few_hot_voxels():
    vol = np.ones((10, 10, 10), np.float32)
    vol[0, 0, :3] = 1e6
    assert robust_scale(vol) == 1.0
