"""Centred orthonormal Fourier transforms and complex <-> channel conversions.

Conventions: k-space index `H // 2` (`W // 2`) holds the DC coefficient (`fftshift` layout) and the
transforms are unitary (`norm="ortho"`), so `||fft2c(x)|| = ||x||` and `ifft2c` is both the inverse and
the adjoint of `fft2c`.
"""

from __future__ import annotations

import torch

__all__ = ["fft2c", "ifft2c", "fft1c", "ifft1c", "kspace_frequencies", "complex_to_channels",
           "channels_to_complex"]


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two dims of a complex tensor `[..., H, W]`."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2D FFT over the last two dims (inverse and adjoint of `fft2c`)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), norm="ortho"), dim=dims)


def fft1c(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal 1D FFT along `dim`."""
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim=dim), dim=dim, norm="ortho"), dim=dim)


def ifft1c(k: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal inverse 1D FFT along `dim` (inverse and adjoint of `fft1c`)."""
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(k, dim=dim), dim=dim, norm="ortho"), dim=dim)


def kspace_frequencies(n: int, device: torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Spatial frequency of each centred k-space index `[n]`, cycles per pixel: `(i - n // 2) / n`."""
    return (torch.arange(n, device=device, dtype=dtype) - n // 2) / n


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """Complex `[B, 1, H, W]` -> real `[B, 2, H, W]` (channel 0 real part, channel 1 imaginary part)."""
    if x.shape[1] != 1:
        raise ValueError(f"complex_to_channels expects one complex channel, got shape {tuple(x.shape)}")
    return torch.cat([x.real, x.imag], dim=1)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real `[B, 2, H, W]` (real, imaginary) -> complex64 `[B, 1, H, W]`."""
    if x.shape[1] != 2:
        raise ValueError(f"channels_to_complex expects 2 channels (real, imag), got shape {tuple(x.shape)}")
    return torch.complex(x[:, :1].float(), x[:, 1:].float())
