"""The known linear low-field forward operator `A` (noise excluded) and its exact adjoint."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .b0 import B0PhaseCorruption, OffResonanceEncoding
from .blur import GaussianBlur
from .fourier import fft2c, ifft2c
from .t2star import T2StarDecay

__all__ = ["ForwardOperator"]

REQUIRED_KEYS = ("fwhm_px", "t2star_ms", "readout_ms", "te_ms", "b0_map_hz")
_TINY = torch.finfo(torch.float32).tiny


class ForwardOperator:
    """`A x = W(k) * E(x)`: image `[B, 1, H, W]` -> measured k-space `[B, 1, H, W]`.

    `E` is the off-resonance encoding (plain `fft2c` without B0) and
    `W = MTF(fwhm_px) * T2*-weights` is real and diagonal in k-space, so `A^H k = E^H(W * k)` is the exact
    adjoint of the discretised operator.
    With neutral parameters (`fwhm_px = 0`, `t2star_ms = inf`, zero field map) `A = fft2c`.

    Args:
        weights: real k-space weights `[B, 1, H, W]` (broadcastable) or `None` for all ones.
        encoding: off-resonance encoding or `None` for `fft2c`.
    """

    def __init__(self, weights: torch.Tensor | None = None,
                 encoding: OffResonanceEncoding | None = None) -> None:
        self.weights = weights
        self.encoding = encoding

    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor], b0_method: str = "segmented",
                    n_segments: int | None = None) -> ForwardOperator:
        """Build `A` from a (batched) params dict with the keys of `LowFieldDegradation.sample_params`
        (called through `degradations.build_operator`, the one place outside this module that builds `A`).

        Needs `fwhm_px`, `t2star_ms`, `readout_ms`, `te_ms` `[B]` and `b0_map_hz`
        `[B, 1, H, W]`; `t2star_gre` `[B]` defaults to spin echo. `b0_method` / `n_segments`: see
        `degradations.b0`. Each step class contributes its part (`None` where it is neutral for the
        whole batch): the blur MTF and the T2* damping multiply into `W`, the B0 step gives `E`.
        """
        missing = [key for key in REQUIRED_KEYS if key not in params]
        if missing:
            raise ValueError(f"params lack {', '.join(missing)} (needed to build the forward operator)")
        height, width = params["b0_map_hz"].shape[-2:]
        mtf = GaussianBlur.kspace_weights(params, height, width)
        decay = T2StarDecay.kspace_weights(params, width)
        weights = decay if mtf is None else mtf if decay is None else mtf * decay
        return cls(weights, B0PhaseCorruption.encoding(params, b0_method, n_segments))

    @property
    def is_diagonal(self) -> bool:
        """True when `A = diag(a) F` (no off-resonance encoding): `A^H A` is diagonal in k-space, so the
        normal equations are solved per k-space sample (`solve_normal`)."""
        return self.encoding is None

    def solve_normal(self, z0: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                     d: torch.Tensor) -> torch.Tensor:
        """The solution `x` of `(c A^H A + d I) x = c A^H y + d z0` for a diagonal `A = diag(a) F`, per
        k-space sample `k = (d F z0 + c a y) / (d + c a^2)` (`F z0` where `d + c a^2 = 0`), `x = ifft2c(k)`.

        `z0`: complex image `[B,1,H,W]`; `y`: complex k-space `[B,1,H,W]`; `c`, `d`: `[B]` real, `>= 0`.
        ValueError for an operator with an off-resonance encoding (not diagonal).
        """
        if not self.is_diagonal:
            raise ValueError("the closed form needs A = diag(a) F; this operator has an off-resonance "
                             "encoding")
        k0 = fft2c(z0)
        c, d = c[:, None, None, None], d[:, None, None, None]
        if self.weights is None:  # d + c = 1
            return ifft2c(d * k0 + c * y)
        a = self.weights.to(device=y.device, dtype=y.real.dtype)
        den = d + c * a**2
        return ifft2c(torch.where(den > 0, (d * k0 + c * a * y) / den.clamp_min(_TINY), k0))

    def echo_preconditioner(self, c: torch.Tensor,
                            d: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`r -> S^H F^H (F S r / (d + c a^2))` (0 where `d + c a^2 = 0`): the inverse of
        `c A^H A + d I` for the operator without the off-resonance of the readout, `S` the phase accrued up
        to the echo (`exp(-i 2 pi Df TE)`; none without B0, where it is the exact inverse). `c`, `d`: `[B]`
        real, `>= 0`; `r`: complex image `[B,1,H,W]`."""
        c, d = c[:, None, None, None], d[:, None, None, None]
        den = d + c * (1.0 if self.weights is None else self.weights.to(device=c.device, dtype=c.dtype)**2)
        inverse = torch.where(den > 0, 1.0 / den.clamp_min(_TINY), 0.0)
        if self.encoding is None:
            return lambda r: ifft2c(inverse * fft2c(r))
        echo = self.encoding.echo_phasor().to(c.device)
        return lambda r: echo.conj() * ifft2c(inverse * fft2c(echo * r))

    @property
    def is_fourier(self) -> bool:
        """True when `A` is the plain `fft2c` (no weights, no off-resonance)."""
        return self.weights is None and self.encoding is None

    def noise_free_image(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """The noise-free image entering the noise stage, `ifft2c(A x)`; exactly `x` if `A = fft2c`.

        `k`: `A x` if already computed.
        """
        if self.is_fourier:
            return x
        return ifft2c(self.forward(x) if k is None else k)

    def demodulate(self, x: torch.Tensor) -> torch.Tensor:
        """A measured complex image `x` `[B, 1, H, W]` (e.g. `ifft2c(y)`) with the off-resonance phase at the
        echo removed (`x * conj(exp(-i 2 pi Df TE))`, the known field map's), so it sits in the frame of the
        images `A` acts on; `x` itself without B0. The readout's shift / blur is left to the data
        consistency."""
        if self.encoding is None:
            return x
        return x * self.encoding.echo_phasor(x.dtype).to(x.device).conj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`A x` for a complex image `x` `[B, 1, H, W]` (complex64 or complex128)."""
        k = fft2c(x) if self.encoding is None else self.encoding.forward(x)
        return k if self.weights is None else k * self.weights.to(k.real.dtype)

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """`A^H k` for complex k-space `k` `[B, 1, H, W]`."""
        if self.weights is not None:
            k = k * self.weights.to(k.real.dtype)
        return ifft2c(k) if self.encoding is None else self.encoding.adjoint(k)

    __call__ = forward

