"""Thermal noise: i.i.d. complex Gaussian noise in k-space at a target SNR.

Multi-coil k-space `[B, C, H, W]` gets the same std on every coil (the prewhitened model, see
`degradations.measurement`); with a sampling mask the noise is drawn for every sample of the grid (the same
draw as without the mask) and then masked, so unsampled samples stay exactly 0 (fastMRI's convention).
"""

from __future__ import annotations

import torch

from ._random import check_range, uniform
from .snr import sigma_for_power
from .snr import signal_power as foreground_power

__all__ = ["ComplexGaussianNoise"]


class ComplexGaussianNoise:
    """Additive i.i.d. circular complex Gaussian k-space noise at a target `snr_db`.

    `sigma` is the std per complex sample (real and imaginary parts each `sigma / sqrt(2)`), chosen so
    that `snr_db(x_in, sigma^2)` (`degradations.snr`) equals the target, `x_in` being the noise-free
    image entering the noise stage (the clean image for the `noise` regime, `ifft2c(A x)` otherwise).
    The orthonormal FFT makes the noise variance the same in k-space and in the image.

    The default 2-7 dB (foreground power 1.6-5 times the noise variance, i.e. mean amplitude ~1.3-2.2 noise
    stds) is the range of the reference study: with SNR roughly proportional to `B0^(3/2)`, a 0.05-0.5 T
    scanner at practical scan times gives images one to two orders of magnitude noisier than at 3-11 T.

    Empty foreground: an all-zero slice has signal power 0 and no defined SNR. Callers that hold whole volumes
    should pass the volume's foreground power as `signal_power` (a scanner's noise level is one per
    acquisition; `lfmri degrade` does so). Otherwise such a slice takes the mean power of the non-empty
    slices of its batch (noise 0 only if the whole batch is zero).

    Args:
        snr_db_range: uniform range of the target SNR, dB.
        snr_db: fixed target SNR that replaces the draw.
    """

    def __init__(self, snr_db_range: tuple[float, float] = (2.0, 7.0), snr_db: float | None = None) -> None:
        self.snr_db_range = check_range("snr_db_range", snr_db_range)
        self.snr_db = snr_db

    def sample_snr(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """Target SNR `[B]` in dB, drawn with `generator`."""
        return uniform(batch, self.snr_db_range, self.snr_db, generator, device)

    @staticmethod
    def sigma_for(x_in: torch.Tensor, snr_db: torch.Tensor,
                  signal_power: torch.Tensor | None = None) -> torch.Tensor:
        """Noise std per complex sample `[B]` for the noise-free image `x_in` `[B, 1, H, W]`.

        `signal_power` `[B]` (units^2) overrides the per-slice foreground power (e.g. a volume's power).
        """
        power = foreground_power(x_in) if signal_power is None else signal_power.to(torch.float32)
        empty = power <= 0
        if bool(empty.any()) and not bool(empty.all()):
            power = torch.where(empty, power[~empty].mean(), power)
        return sigma_for_power(power, snr_db)

    @staticmethod
    def draw(like: torch.Tensor, sigma: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise shaped like the complex `like` `[B, ...]`, std `sigma` `[B]` per complex sample."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = torch.randn(like.shape, dtype=like.dtype, generator=generator, device=gen_device).to(like.device)
        return n * sigma.to(like.real.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def apply(self, k: torch.Tensor, params: dict[str, torch.Tensor],
              generator: torch.Generator | None = None) -> torch.Tensor:
        """`k + n` with `n` drawn with `generator` at `params["noise_sigma"]` for k-space `k` `[B, C, H, W]`;
        with `params["mask"]` (float32 `[B, 1, H, W]`, 0/1) `(k + n) * mask`: noise on sampled samples only,
        exact zeros elsewhere."""
        y = k + self.draw(k, params["noise_sigma"], generator)
        mask = params.get("mask")
        return y if mask is None else torch.where(mask.to(y.device) > 0, y, torch.zeros((), dtype=y.dtype,
                                                                                        device=y.device))

