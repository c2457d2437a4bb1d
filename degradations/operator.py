"""The known linear low-field forward operator `A` (noise excluded) and its exact adjoint.

Single coil, fully sampled (today's operator, bit for bit): `A x = W * E(x)`, image `[B,1,H,W]` -> k-space
`[B,1,H,W]`. Multi-coil and undersampled (issue 24): `A x = M * W * E(s_c x)` for each coil `c`, k-space
`[B,C,H,W]`, with `s` the coil sensitivities `[B,C,H,W]` (complex64, normalised to `sum_c |s_c|^2 = 1` where
there is signal) and `M` the 0/1 sampling mask `[B,1,H,W]`, a real diagonal like the blur MTF and the T2*
envelope (so it is folded into the k-space weights: without coils and B0 `A` stays `diag(a) F`).
`A^H k = sum_c conj(s_c) E^H(M * W * k_c)`. The prior's image `x` is always the coil-combined `[B,1,H,W]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .b0 import B0PhaseCorruption, OffResonanceEncoding
from .blur import GaussianBlur
from .fourier import fft2c, ifft2c
from .masks import UndersamplingMask
from .t2star import T2StarDecay

__all__ = ["ForwardOperator"]

REQUIRED_KEYS = ("fwhm_px", "t2star_ms", "readout_ms", "te_ms", "b0_map_hz")
_TINY = torch.finfo(torch.float32).tiny


class ForwardOperator:
    """`A x = M * W(k) * E(s_c x)`: image `[B, 1, H, W]` -> measured k-space `[B, C, H, W]`.

    `E` is the off-resonance encoding (plain `fft2c` without B0),
    `W = MTF(fwhm_px) * T2*-weights` is real and diagonal in k-space, `M` the 0/1 sampling mask (folded into
    the weights: `self.weights = W * M`) and `s_c` the coil sensitivities (none: one coil, `s = 1`, `C = 1`),
    so `A^H k = sum_c conj(s_c) E^H(W M k_c)` is the exact adjoint of the discretised operator.
    With neutral parameters (`fwhm_px = 0`, `t2star_ms = inf`, zero field map, no mask, no coils) `A = fft2c`.

    Args:
        weights: real k-space weights `[B, 1, H, W]` (broadcastable) or `None` for all ones.
        encoding: off-resonance encoding or `None` for `fft2c`.
        mask: 0/1 sampling mask, float `[B, 1, H, W]` (broadcastable), or `None` (fully sampled).
        sensitivities: coil sensitivities, complex `[B, C, H, W]`, or `None` (one coil, `s = 1`).

    Attributes:
        weights: the real k-space weights `A` applies, `W * M` (`None` for all ones).
        signal_weights: `W` alone (without the mask), as given.
    """

    def __init__(self, weights: torch.Tensor | None = None, encoding: OffResonanceEncoding | None = None,
                 mask: torch.Tensor | None = None, sensitivities: torch.Tensor | None = None) -> None:
        if sensitivities is not None and (not sensitivities.is_complex() or sensitivities.dim() != 4):
            raise ValueError(f"sensitivities must be complex [B,C,H,W], got {tuple(sensitivities.shape)} "
                             f"{sensitivities.dtype}")
        self.signal_weights, self.mask, self.sensitivities = weights, mask, sensitivities
        self.weights = weights if mask is None else mask if weights is None else weights * mask
        self.encoding = encoding

    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor], b0_method: str = "segmented",
                    n_segments: int | None = None) -> ForwardOperator:
        """Build `A` from a (batched) params dict with the keys of `LowFieldDegradation.sample_params`
        (called through `degradations.build_operator`, the one place outside this module that builds `A`).

        Needs `fwhm_px`, `t2star_ms`, `readout_ms`, `te_ms` `[B]` and `b0_map_hz`
        `[B, 1, H, W]`; `t2star_gre` `[B]` defaults to spin echo; optional `mask` float32 `[B, 1, H, W]`
        (0/1) and `sensitivities` complex64 `[B, C, H, W]`. `b0_method` / `n_segments`: see
        `degradations.b0`. Each step class contributes its part (`None` where it is neutral for the
        whole batch): the blur MTF and the T2* damping multiply into `W`, the mask into the weights, the B0
        step gives `E`, the sensitivities the coils.
        """
        missing = [key for key in REQUIRED_KEYS if key not in params]
        if missing:
            raise ValueError(f"params lack {', '.join(missing)} (needed to build the forward operator)")
        height, width = params["b0_map_hz"].shape[-2:]
        mtf = GaussianBlur.kspace_weights(params, height, width)
        decay = T2StarDecay.kspace_weights(params, width)
        weights = decay if mtf is None else mtf if decay is None else mtf * decay
        return cls(weights, B0PhaseCorruption.encoding(params, b0_method, n_segments),
                   UndersamplingMask.kspace_weights(params), params.get("sensitivities"))

    @property
    def n_coils(self) -> int:
        """`C`, the number of coils (k-space channels) `forward` returns (1 without sensitivities)."""
        return 1 if self.sensitivities is None else int(self.sensitivities.shape[1])

    def single_coil(self) -> ForwardOperator:
        """The fully sampled single-coil operator of the same physics (`W * E`, no mask, no coils): the
        one the SNR is defined on (`noise_free_image`); `self` when there is neither mask nor coils."""
        if self.mask is None and self.sensitivities is None:
            return self
        return ForwardOperator(self.signal_weights, self.encoding)

    @property
    def is_diagonal(self) -> bool:
        """True when `A = diag(a) F` (no off-resonance encoding and no coil sensitivities; a mask keeps it
        diagonal): `A^H A` is diagonal in k-space, so the normal equations are solved per k-space sample
        (`solve_normal`)."""
        return self.encoding is None and self.sensitivities is None

    def solve_normal(self, z0: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                     d: torch.Tensor) -> torch.Tensor:
        """The solution `x` of `(c A^H A + d I) x = c A^H y + d z0` for a diagonal `A = diag(a) F`, per
        k-space sample `k = (d F z0 + c a y) / (d + c a^2)` (`F z0` where `d + c a^2 = 0`), `x = ifft2c(k)`.

        Unsampled samples (`a = 0`) keep `F z0`.

        `z0`: complex image `[B,1,H,W]`; `y`: complex k-space `[B,1,H,W]`; `c`, `d`: `[B]` real, `>= 0`.
        ValueError for an operator with an off-resonance encoding or coil sensitivities (not diagonal).
        """
        if not self.is_diagonal:
            raise ValueError("the closed form needs A = diag(a) F; this operator has an off-resonance "
                             "encoding or coil sensitivities")
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
        real, `>= 0`; `r`: complex image `[B,1,H,W]`.

        With coil sensitivities the coils are ignored and the mask enters as the slice's sampled fraction `f`:
        `a^2 = f W^2`. Exact where `sum_c |s_c|^2 = 1`, fully sampled, without blur, T2* and B0 (there
        `A^H A = I`); for incoherent undersampling `sum_c conj(s_c) F^H M F s_c ~ f I` on average. The mask
        itself must not enter: with coils, unsampled k-space is not a null space of `A^H A`, and `1 / d` there
        ruins CG as `mu -> 0` (measured on a 32x28 phantom, 8 coils, 4x, blur, T2*, B0: after 10 CG steps at
        `mu = 1e-4` the objective is 24-72 times plain CG's; DDIM with a Gaussian stand-in prior: relative
        error 2.0 against 0.48 with the sampled fraction)."""
        c, d = c[:, None, None, None], d[:, None, None, None]
        weights = self.weights
        if self.sensitivities is not None and self.mask is not None:
            fraction = (self.mask > 0).to(c.dtype).mean(dim=(-2, -1), keepdim=True).sqrt()
            weights = fraction if self.signal_weights is None else self.signal_weights * fraction
        den = d + c * (1.0 if weights is None else weights.to(device=c.device, dtype=c.dtype)**2)
        inverse = torch.where(den > 0, 1.0 / den.clamp_min(_TINY), 0.0)
        if self.encoding is None:
            return lambda r: ifft2c(inverse * fft2c(r))
        echo = self.encoding.echo_phasor().to(c.device)
        return lambda r: echo.conj() * ifft2c(inverse * fft2c(echo * r))

    @property
    def is_fourier(self) -> bool:
        """True when `A` is the plain `fft2c` (no weights, no mask, no off-resonance, no coils)."""
        return self.weights is None and self.encoding is None and self.sensitivities is None

    def noise_free_image(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """The noise-free image entering the noise stage, `ifft2c(A x)` `[B,1,H,W]`; exactly `x` if
        `A = fft2c`. The SNR is defined on it (`degradations.snr`): with a mask or coils it is the one of
        the fully sampled single-coil operator (`single_coil`), so an SNR gives the same noise level with or
        without them.

        `k`: `A x` if already computed (only for a single-coil, fully sampled operator: ValueError otherwise).
        """
        if self.mask is not None or self.sensitivities is not None:
            if k is not None:
                raise ValueError("k (A x) gives the noise-free image only for a single-coil, fully sampled "
                                 "operator; pass x alone")
            return self.single_coil().noise_free_image(x)
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
        """`A x` `[B, C, H, W]` for a complex image `x` `[B, 1, H, W]` (complex64 or complex128)."""
        if self.sensitivities is not None:
            x = x * self.sensitivities.to(x.dtype)
        k = fft2c(x) if self.encoding is None else self.encoding.forward(x)
        return k if self.weights is None else k * self.weights.to(k.real.dtype)

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """`A^H k` `[B, 1, H, W]` for complex k-space `k` `[B, C, H, W]`."""
        if self.weights is not None:
            k = k * self.weights.to(k.real.dtype)
        x = ifft2c(k) if self.encoding is None else self.encoding.adjoint(k)
        if self.sensitivities is None:
            return x
        return (self.sensitivities.to(x.dtype).conj() * x).sum(dim=1, keepdim=True)

    __call__ = forward

