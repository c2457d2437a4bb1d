"""Blind estimate of the k-space noise level `sigma` of a measured slice.

Model and units: `y = A x + n` with `y` complex `[B, 1, H, W]` fully sampled Cartesian k-space on the
centred orthonormal grid (`degradations.fourier.fft2c`) and `n` white, i.i.d. circular complex
Gaussian noise of std `sigma` per complex sample (`E|n|^2 = sigma^2`; real and imaginary parts each carry
`sigma^2 / 2`), the same `sigma` as `params["noise_sigma"]` of `degradations.compose`, in the units
of `y`. The estimate is one `sigma` per slice, float32 `[B]`.

Where the signal is weak the samples are pure noise and `|n|^2 / sigma^2` is exponential with median
`ln 2`. The estimator therefore looks at the samples where the signal is expected to be weakest: the
fraction `NOISE_BAND_FRACTION` (a third) of k-space with the smallest *expected signal amplitude*
`|w(k)| / |f(k)|^SPECTRUM_SLOPE` -- `w` the operator's real k-space weights (blur MTF x T2* envelope, ones
without an operator), `|f|` the spatial frequency (cycles per pixel) and `|f|^-SPECTRUM_SLOPE` a generic
decay of MR image spectra. Without weights this is the outer band `|f| > 0.46` (the corners and edges of
k-space); with a blur it is the same band, with a T2* envelope alone it leans towards the damped readout
edges. Two robust medians of that band are taken:

* in k-space: `sqrt(median(|y_k|^2) / ln 2)` over the band, robust to the few bright samples where the
  signal spectrum is not yet down;
* in the image: the band's high-pass image `h = ifft2c(y * band)` carries white noise of variance
  `sigma^2 * n_band / (H W)` per pixel while its signal (edges) is sparse in the image, so
  `sqrt(median(|h|^2) / ln 2 * H W / n_band)` is robust to signal that spreads over the band but sits on few
  pixels (the idea of Donoho's wavelet MAD, on complex data and the band chosen above).

Residual signal can only raise these medians (`|s + n|^2` is stochastically larger than `|n|^2`), so the
estimate is their minimum. Assumptions: Cartesian k-space without zero padding (a slice that is all zero
raises `ValueError`), white noise with one level per slice (no coil combination or k-space filtering), and a
signal spectrum that decays towards the edge of k-space (true of MR images at their native resolution).
Measured with `experiments/benchmarks/noise_estimate.py` on nilearn's
MNI152 T1 template at native resolution (slices of every orientation, also with a smooth random phase):
within 3.5 % of the true `sigma` at SNR 2-20 dB in all four regimes, with or without the operator (the
ranking by weights changes little on these regimes, where the outer band is already the attenuated one; the
band fraction 1/5-1/2 and slope 1-3 all stay within 3.5 %). A clean image that holds noise of its own (a
real acquisition) has that noise measured too: on nibabel's EPI test volume at 20 dB without blur the
estimate is ~6 % high, on its 33x41 T1 volume (own noise ~0.8 of the added noise at 20 dB) ~25 % high.

Undersampled and multi-coil k-space `[B, C, H, W]` (issue 24): the operator's sampling mask restricts
everything to the sampled samples (the band is the `NOISE_BAND_FRACTION` of the *sampled* samples with the
weakest expected signal, ranked with the weights without the mask; the high-pass image is the band's
zero-filled image, whose white noise has the same variance per pixel `sigma^2 n_band / (H W)`); each coil
is estimated on its own and the slice's `sigma` is the root mean square over the coils (a coil that is
all zero is left out), the one std per sample of prewhitened multi-coil data. Without mask and coils the
computation is the single-coil one above, unchanged.
Measured by `tests/degradations/test_multicoil.py` on a phantom (blur, T2*, 8 dB): within 10 % with 4 coils
fully sampled, one coil at 4x, 8 coils at 4x.
"""

from __future__ import annotations

import math

import torch

from .fourier import ifft2c, kspace_frequencies
from .operator import ForwardOperator

__all__ = ["estimate_noise_sigma", "estimate_coil_noise_sigma", "NOISE_BAND_FRACTION", "SPECTRUM_SLOPE"]

#: fraction of k-space samples (those with the weakest expected signal) the estimate uses
NOISE_BAND_FRACTION = 1.0 / 3.0
#: exponent of the generic image-spectrum decay `|f|^-SPECTRUM_SLOPE` used to rank the samples
SPECTRUM_SLOPE = 1.5


def estimate_noise_sigma(y: torch.Tensor, operator: ForwardOperator | None = None) -> torch.Tensor:
    """Noise std per complex k-space sample `sigma` (`sqrt(E|n|^2)`, units of `y`), float32 `[B]`.

    Args:
        y: measured k-space, complex `[B, C, H, W]` (centred, orthonormal, Cartesian; C coils, 0 where not
            sampled).
        operator: the forward operator `A` of `y`; only its real k-space weights (`[B, 1, H, W]`
            broadcastable, or `None`: `weights` without a mask, `signal_weights` with one) are used, to find
            where the signal is attenuated, and its `mask` (which samples were measured). `None`: fully
            sampled, no attenuation known.

    Raises:
        ValueError: `y` is not a complex `[B, C, H, W]` tensor, holds non-finite values, or a slice is
            all zero (empty: no noise to measure).
    """
    if not y.is_complex() or y.dim() != 4:
        raise ValueError(f"y must be complex k-space [B, C, H, W], got {tuple(y.shape)} {y.dtype}")
    mask = None if operator is None else operator.mask
    if y.shape[1] != 1 or mask is not None:
        return estimate_coil_noise_sigma(y, operator).square().nanmean(dim=1).sqrt()
    batch, _, height, width = y.shape
    power = (y.abs() ** 2).reshape(batch, -1).to(torch.float32)
    if not bool(torch.isfinite(power).all()):
        raise ValueError("y holds non-finite values (NaN or inf); cannot estimate its noise level")
    empty = (power.amax(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"slice(s) {empty} of y are empty (all-zero k-space): there is no noise to estimate")

    band = _noise_band(y, operator)  # bool [B, H*W], the same count per slice
    n_band = int(band[0].sum())
    kspace_var = power[band].reshape(batch, n_band).median(dim=1).values / math.log(2.0)
    highpass = ifft2c(y * band.reshape(y.shape))
    image_power = (highpass.abs() ** 2).reshape(batch, -1).to(torch.float32)
    image_var = image_power.median(dim=1).values / math.log(2.0) * (height * width / n_band)
    return torch.sqrt(torch.minimum(kspace_var, image_var))


def estimate_coil_noise_sigma(y: torch.Tensor, operator: ForwardOperator | None = None) -> torch.Tensor:
    """Noise std per complex k-space sample of each coil, float32 `[B, C]` (NaN for a coil that is all zero):
    the estimate of the module docstring on each coil's sampled samples (`operator`'s mask; see
    `estimate_noise_sigma` for the arguments and the errors)."""
    if not y.is_complex() or y.dim() != 4:
        raise ValueError(f"y must be complex k-space [B, C, H, W], got {tuple(y.shape)} {y.dtype}")
    batch, n_coils, height, width = y.shape
    power = (y.abs() ** 2).to(torch.float32)
    if not bool(torch.isfinite(power).all()):
        raise ValueError("y holds non-finite values (NaN or inf); cannot estimate its noise level")
    empty = (power.flatten(1).amax(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"slice(s) {empty} of y are empty (all-zero k-space): there is no noise to estimate")
    mask = None if operator is None else operator.mask
    sampled = torch.ones(batch, 1, height, width, dtype=torch.bool, device=y.device) if mask is None \
        else (mask.to(y.device) > 0).expand(batch, 1, height, width)
    weights = None if operator is None else operator.signal_weights
    amplitude = _expected_amplitude(batch, height, width, weights, y.device).reshape(batch, -1)
    sigma = torch.full((batch, n_coils), math.nan, dtype=torch.float32, device=y.device)
    for b in range(batch):
        where = sampled[b].reshape(-1)
        n_band = max(1, round(NOISE_BAND_FRACTION * int(where.sum())))
        ranked = torch.where(where, amplitude[b], torch.inf)  # unsampled samples are never in the band
        order = torch.topk(ranked, n_band, largest=False).indices
        band = torch.zeros(height * width, dtype=torch.bool, device=y.device).scatter_(0, order, True)
        coils = power[b].reshape(n_coils, -1).amax(dim=1) > 0
        kspace_var = power[b][coils].reshape(-1, height * width)[:, band].median(dim=1).values / math.log(2.0)
        highpass = ifft2c(y[b][coils] * band.reshape(height, width))
        image_power = (highpass.abs() ** 2).reshape(highpass.shape[0], -1).to(torch.float32)
        image_var = image_power.median(dim=1).values / math.log(2.0) * (height * width / n_band)
        sigma[b, coils] = torch.minimum(kspace_var, image_var).sqrt()
    return sigma


def _expected_amplitude(batch: int, height: int, width: int, weights: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor:
    """Expected signal amplitude `|w| / (|f| + df)^SPECTRUM_SLOPE` `[B, 1, H, W]` (`df`, one frequency step,
    keeps DC finite)."""
    fy = kspace_frequencies(height, device)
    fx = kspace_frequencies(width, device)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) + 1.0 / max(height, width)
    amplitude = radius.pow(-SPECTRUM_SLOPE).expand(batch, 1, height, width)
    if weights is not None:
        amplitude = amplitude * weights.to(device=device, dtype=torch.float32).abs()
    return amplitude


def _noise_band(y: torch.Tensor, operator: ForwardOperator | None) -> torch.Tensor:
    """Bool `[B, H*W]`: the `NOISE_BAND_FRACTION` of samples with the weakest expected signal per slice
    (`_expected_amplitude`)."""
    batch, _, height, width = y.shape
    amplitude = _expected_amplitude(batch, height, width, None if operator is None else operator.weights,
                                    y.device)
    n_band = max(1, round(NOISE_BAND_FRACTION * height * width))
    order = torch.topk(amplitude.reshape(batch, -1), n_band, dim=1, largest=False).indices
    band = torch.zeros(batch, height * width, dtype=torch.bool, device=y.device)
    return band.scatter_(1, order, True)
