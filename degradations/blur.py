"""Resolution loss as a Gaussian modulation transfer function (MTF) in k-space."""

from __future__ import annotations

import math

import torch

from ._random import check_range, uniform
from .fourier import kspace_frequencies

__all__ = ["GaussianBlur", "gaussian_mtf"]

#: FWHM = FWHM_PER_SIGMA * sigma for a Gaussian
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_mtf(fwhm_px: torch.Tensor, height: int, width: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian MTF `[B, 1, H, W]` of an isotropic Gaussian PSF with FWHM `fwhm_px` `[B]` (pixels).

    With `sigma = fwhm_px / (2 sqrt(2 ln 2))` the PSF `exp(-r^2 / (2 sigma^2))` has the Fourier transform
    `MTF(f) = exp(-2 pi^2 sigma^2 |f|^2)`, `f` in cycles per pixel on the centred grid
    (`(i - n//2) / n`). `MTF(0) = 1` exactly, so the DC coefficient (mean intensity) is kept;
    `fwhm_px = 0` gives the identity.
    """
    sigma = fwhm_px.to(dtype) / FWHM_PER_SIGMA
    fy = kspace_frequencies(height, fwhm_px.device, dtype)
    fx = kspace_frequencies(width, fwhm_px.device, dtype)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    return torch.exp(-2.0 * math.pi ** 2 * sigma[:, None, None, None] ** 2 * f2[None, None])


class GaussianBlur:
    """Gaussian blur (resolution loss) applied as a multiplication of k-space by a Gaussian MTF.

    Portable 0.05-0.5 T scanners acquire at about 1.5-3 mm in-plane (e.g. 1.5-2.2 mm for 0.064 T T2-weighted
    brain protocols) where high-field references are ~1 mm (or, for mouse data, proportionally finer); on the
    reference grid the effective point-spread function therefore has a FWHM of about 1-2.5 pixels, the default
    range.

    Args:
        fwhm_px_range: uniform range of the image-domain FWHM of the PSF, pixels.
        fwhm_px: fixed FWHM that replaces the draw.
    """

    def __init__(self, fwhm_px_range: tuple[float, float] = (1.0, 2.5), fwhm_px: float | None = None) -> None:
        self.fwhm_px_range = check_range("fwhm_px_range", fwhm_px_range, low=0.0)
        if fwhm_px is not None and fwhm_px < 0:
            raise ValueError(f"fwhm_px must be >= 0, got {fwhm_px}")
        self.fwhm_px = fwhm_px

    def sample_params(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`{"fwhm_px": [B]}` drawn with `generator`."""
        return {"fwhm_px": uniform(batch, self.fwhm_px_range, self.fwhm_px, generator, device)}

    @staticmethod
    def kspace_weights(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor | None:
        """The k-space weights this step contributes to `A`: the MTF `[B, 1, H, W]` (float32) of
        `params["fwhm_px"]` `[B]`, or `None` when no sample is blurred (all `fwhm_px = 0`)."""
        fwhm = params["fwhm_px"]
        return gaussian_mtf(fwhm, height, width) if bool((fwhm > 0).any()) else None
