"""Slice geometry and normalisation: exact inverses where they must be."""

import numpy as np
import torch

from datamodules.transforms import fit_to_square, from_slices, restore_shape, robust_scale, to_slices


def test_to_slices_and_back_is_exact():
    vol = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    for axis in range(3):
        stack = to_slices(vol, axis)
        assert stack.shape[0] == vol.shape[axis]
        np.testing.assert_array_equal(from_slices(stack, axis), vol)


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
