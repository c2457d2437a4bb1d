"""Centred orthonormal FFTs and the one SNR definition."""

import numpy as np
import pytest
import torch

from degradations import (
    channels_to_complex,
    complex_to_channels,
    fft2c,
    foreground_mask,
    ifft2c,
    noise_sigma_for_snr,
    signal_power,
    snr_db,
)
from degradations.snr import percentile


@pytest.mark.parametrize("shape", [(16, 16), (15, 22)])
def test_fft2c_is_unitary_and_centred(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *shape, dtype=torch.complex128, generator=g)
    k = fft2c(x)
    torch.testing.assert_close(k.norm(), x.norm())  # Parseval: orthonormal
    torch.testing.assert_close(ifft2c(k), x)
    h, w = shape
    # the DC coefficient sits at (H//2, W//2) and equals sum(x) / sqrt(H W)
    torch.testing.assert_close(k[..., h // 2, w // 2], x.sum(dim=(-2, -1)) / np.sqrt(h * w))


def test_channels_round_trip():
    x = torch.randn(3, 1, 8, 8, dtype=torch.complex64)
    c = complex_to_channels(x)
    assert c.shape == (3, 2, 8, 8) and c.dtype == torch.float32
    torch.testing.assert_close(c[:, 0], x.real[:, 0])
    back = channels_to_complex(c)
    assert back.dtype == torch.complex64
    torch.testing.assert_close(back, x)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentile_matches_numpy(n):
    v = torch.rand(4, n, generator=torch.Generator().manual_seed(n))
    np.testing.assert_allclose(percentile(v, 99.0).numpy(), np.percentile(v.numpy(), 99, axis=1), rtol=1e-6)


def test_foreground_and_snr_follow_the_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 20, 24, generator=g) ** 3 + 0j
    mag = x.abs().numpy()
    for b in range(2):
        expected = mag[b, 0] > 0.1 * np.percentile(mag[b, 0], 99)
        np.testing.assert_array_equal(foreground_mask(x)[b, 0].numpy(), expected)
        power = (mag[b, 0][expected] ** 2).mean()
        assert signal_power(x)[b].item() == pytest.approx(power, rel=1e-5)
        assert snr_db(x, 0.01)[b].item() == pytest.approx(10 * np.log10(power / 0.01), abs=1e-4)
    sigma = noise_sigma_for_snr(x, torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(snr_db(x, sigma ** 2), torch.tensor([3.0, 6.0]))


def test_empty_slice_has_zero_signal_power():
    assert signal_power(torch.zeros(1, 1, 8, 8, dtype=torch.complex64)).item() == 0.0


def test_round_off_does_not_turn_an_empty_background_into_foreground():
    """A slice with under 1 % non-zero pixels has percentile99 = 0: its foreground is its non-zero pixels,
    before and after a float32 trip through k-space."""
    x = torch.zeros(1, 1, 64, 64, dtype=torch.complex64)
    x[..., 30:33, 30:34] = 50.0
    assert torch.equal(foreground_mask(x), x.abs() > 0)
    assert torch.equal(foreground_mask(ifft2c(fft2c(x))), x.abs() > 0)
