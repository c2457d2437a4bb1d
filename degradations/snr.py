"""The one SNR definition of lfmri.

`snr_db = 10 * log10(signal_power / noise_var)` where `signal_power` is the mean of `|x|^2` over
the foreground of each slice (pixels with `|x| > 0.1 * percentile99(|x|)` of that slice) and `noise_var`
is the noise variance per complex sample (`E|n|^2`; real and imaginary parts each carry half of it). Because
`degradations.fourier.fft2c` is orthonormal, the same variance holds in k-space and in the image.
"""

from __future__ import annotations

import torch

__all__ = ["foreground_mask", "foreground_power_sums", "percentile", "signal_power", "snr_db",
           "noise_sigma_for_snr", "snr_db_for_power", "sigma_for_power", "FOREGROUND_FRACTION"]

#: foreground threshold as a fraction of the 99th percentile of |x| of the slice
FOREGROUND_FRACTION = 0.1
#: values below this fraction of the slice's maximum count as zero (float32 FFT round-off)
ROUNDOFF_FRACTION = 1e-5


def foreground_mask(x: torch.Tensor) -> torch.Tensor:
    """Bool mask `[..., H, W]`: `|x| > 0.1 * percentile99(|x|)` of each `H x W` slice.

    The percentile uses linear interpolation (numpy's default, `percentile`). An all-zero slice has an
    empty foreground. Values below `1e-5` of the slice's maximum count as zero: on a slice with under 1 %
    non-zero pixels the percentile is 0, and float32 round-off of a trip through k-space must not turn its
    empty background into foreground (the threshold is then `1e-5 * max` instead of 0).
    """
    return _mask_of_magnitude(x.abs())


def _mask_of_magnitude(mag: torch.Tensor) -> torch.Tensor:
    flat = mag.reshape(-1, mag.shape[-2] * mag.shape[-1])
    threshold = torch.maximum(FOREGROUND_FRACTION * percentile(flat, 99.0), ROUNDOFF_FRACTION * flat.amax(1))
    return (flat > threshold[:, None]).reshape(mag.shape)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row `q`-th percentile of a real `[N, M]` tensor with numpy's linear interpolation, `[N]`.

    Only the top `M - floor(pos)` values are selected (`topk`), much faster than a full sort for q ~ 99.
    """
    n = values.shape[1]
    pos = q / 100.0 * (n - 1)
    lo = int(pos)
    top = torch.topk(values, n - lo, dim=1, sorted=True).values  # descending; the last one is the lo-th value
    v_lo = top[:, -1].to(torch.float64)
    v_hi = top[:, -2].to(torch.float64) if top.shape[1] > 1 else v_lo
    return (v_lo + (pos - lo) * (v_hi - v_lo)).to(values.dtype)


def foreground_power_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (first dim): `(sum of |x|^2 over the foreground, foreground pixel count)`, float64."""
    mag = x.abs()
    mask = _mask_of_magnitude(mag)
    energy = (mag.to(torch.float64) ** 2) * mask
    return energy.reshape(x.shape[0], -1).sum(1), mask.reshape(x.shape[0], -1).sum(1).to(torch.float64)


def signal_power(x: torch.Tensor) -> torch.Tensor:
    """Mean `|x|^2` over the foreground of each sample, shape `[B]` (0 where the foreground is empty).

    `x`: complex or real `[B, ..., H, W]`, in its own intensity units; the result is in units^2.
    """
    total, count = foreground_power_sums(x)
    return (total / count.clamp_min(1.0)).to(torch.float32)


def snr_db_for_power(power: torch.Tensor | float, noise_var: torch.Tensor | float) -> torch.Tensor:
    """SNR (dB) `10 log10(power / noise_var)` of a signal power and a noise variance per complex sample
    (both in units^2, scalars or `[B]`): the definition, written once."""
    power = torch.as_tensor(power)
    return 10.0 * torch.log10(power / torch.as_tensor(noise_var, dtype=power.dtype, device=power.device))


def sigma_for_power(power: torch.Tensor | float, snr_db: torch.Tensor | float) -> torch.Tensor:
    """Noise std per complex sample giving `snr_db` (dB) for a signal power (units^2; scalars or `[B]`):
    the inverse of `snr_db_for_power`, in `power`'s dtype."""
    power = torch.as_tensor(power)
    return torch.sqrt(power / 10.0 ** (torch.as_tensor(snr_db, device=power.device).to(power.dtype) / 10.0))


def snr_db(x: torch.Tensor, noise_var: torch.Tensor | float) -> torch.Tensor:
    """SNR (dB) of the noise-free image `x` `[B, ..., H, W]` for a noise variance per complex sample."""
    return snr_db_for_power(signal_power(x), noise_var)


def noise_sigma_for_snr(x: torch.Tensor, snr_db: torch.Tensor | float) -> torch.Tensor:
    """Noise std per complex sample `[B]` giving `snr_db` (dB, scalar or `[B]`) for the image `x`."""
    return sigma_for_power(signal_power(x), snr_db)
