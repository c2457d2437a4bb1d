"""Gaussian blur (MTF) and T2* k-space damping along the readout."""

import math

import numpy as np
import pytest
import torch

from degradations import (
    ForwardOperator,
    GaussianBlur,
    LowFieldDegradation,
    T2StarDecay,
    fft2c,
    gaussian_mtf,
    ifft2c,
    neutral_params,
    sample_times_ms,
    t2star_weights,
)


def test_blur_keeps_dc_and_damps_each_frequency_as_the_mtf_says():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 32, 40, generator=g) + 0j
    k = fft2c(x)
    fwhm = 2.0
    blur_only = LowFieldDegradation("blur", blur=GaussianBlur(fwhm_px=fwhm))
    blurred = blur_only.apply(x, blur_only.sample_params(x, g))
    assert blurred[0, 0, 16, 20] == k[0, 0, 16, 20]  # MTF(0) = 1 exactly: mean intensity kept
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    fy = (torch.arange(32) - 16) / 32
    fx = (torch.arange(40) - 20) / 40
    expected = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    torch.testing.assert_close((blurred / k).real[0, 0], expected)
    # Nyquist along the readout is damped to exp(-pi^2 sigma^2 / 2)
    assert expected[16, 0].item() == pytest.approx(math.exp(-math.pi ** 2 * sigma ** 2 / 2), rel=1e-6)


def test_blur_psf_has_the_requested_fwhm():
    delta = torch.zeros(1, 1, 64, 64, dtype=torch.complex128)
    delta[..., 32, 32] = 1.0
    fwhm = 5.0
    psf = ifft2c(fft2c(delta) * gaussian_mtf(torch.tensor([fwhm]), 64, 64, torch.float64)).real[0, 0, 32]
    profile = (psf / psf.max()).numpy()
    right = 32 + np.argmax(profile[32:] < 0.5)  # first sample below half maximum, right of the peak
    crossing = right - 1 + (profile[right - 1] - 0.5) / (profile[right - 1] - profile[right])
    assert 2 * (crossing - 32) == pytest.approx(fwhm, rel=0.02)


def test_zero_fwhm_is_the_identity():
    torch.testing.assert_close(gaussian_mtf(torch.tensor([0.0]), 8, 8), torch.ones(1, 1, 8, 8))


def _weights(mode, t2star=30.0, readout=10.0, te=15.0, width=64):
    gre = torch.tensor([1.0 if mode == "gradient_echo" else 0.0])
    w = t2star_weights(torch.tensor([t2star]), torch.tensor([readout]), torch.tensor([te]), width, gre)
    return w[0, 0, 0]


def test_spin_echo_damping_is_one_at_the_echo_and_monotone_away_from_it():
    w = _weights("spin_echo")
    echo = 32
    assert w[echo].item() == 1.0
    assert torch.all(torch.diff(w[echo:]) < 0)    # later than the echo: decays
    assert torch.all(torch.diff(w[: echo + 1]) > 0)  # earlier than the echo: rises towards it
    torch.testing.assert_close(w[echo - 10], w[echo + 10])  # symmetric about the echo
    # the first sample is readout/2 before the echo
    assert w[0].item() == pytest.approx(math.exp(-(10.0 / 2) / 30.0), rel=1e-6)


def test_gradient_echo_decays_monotonically_in_time():
    w = _weights("gradient_echo")
    t = sample_times_ms(torch.tensor([10.0]), torch.tensor([15.0]), 64)[0]
    assert w[32].item() == 1.0
    assert torch.all(torch.diff(w) < 0)
    torch.testing.assert_close(w, torch.exp(-(t - 15.0) / 30.0))


def test_t2star_acts_along_the_readout_only_and_inf_is_identity():
    x = torch.randn(2, 1, 6, 10, dtype=torch.complex64)
    k = fft2c(x)
    params = neutral_params(2, 6, 10)
    params.update(t2star_ms=torch.tensor([20.0, math.inf]), readout_ms=torch.tensor([8.0, 8.0]),
                  te_ms=torch.tensor([10.0, 10.0]))
    out = ForwardOperator.from_params(params).forward(x)
    ratio = (out / k).real
    torch.testing.assert_close(ratio[0, 0], ratio[0, 0, :1].expand(6, -1))  # same weight on every row
    torch.testing.assert_close(out[1], k[1])
    with pytest.raises(ValueError, match="mode"):
        T2StarDecay(mode="echo_planar")
