"""B0 off-resonance: a smooth random field map whose phase accrues over TE and the readout.

Signal model (Cartesian, readout along `W`; times from `degradations.timing`), per k-space sample::

    k[ky, kx] = sum_r x(r) exp(-i 2 pi Df(r) t(kx)) exp(-i 2 pi (ky y / H + kx x / W))  (centred, ortho)

with `Df(r)` the off-resonance in Hz and `t` in seconds. The phase `Df * TE` accrued up to the echo is a
smooth image-domain phase; the part accrued during the readout shifts/blurs each pixel along the readout by
`Df * readout` pixels. A zero map gives `fft2c` exactly.

Two evaluations of the same model:

* `method="exact"`: the sum above column by column (`W` phase factors per pixel), `O(H W^2)` per slice;
* `method="segmented"` (default, fast): time segmentation. The readout times are covered by `L` equally
  spaced segment times `tau_l` (first and last sample included) and the phase factor is linearly
  interpolated between them, `exp(-i w t) ~ sum_l b_l(t) exp(-i w tau_l)` with hat-function weights
  `b_l` (a partition of unity). Then `k = sum_l b_l(kx) * fft2c(x * exp(-i 2 pi Df tau_l))`: `L`
  FFTs along the readout and, since `b_l` is non-zero on about `2 W / (L - 1)` columns only,
  phase-encoding FFTs of those columns only. The phasor error is at most `1 - cos(d/2) ~ d^2 / 8` for a
  phase step `d = 2 pi max|Df| (tau_2 - tau_1)` between segments. By default `L` is chosen so that
  `d <= 0.2 rad` (phasor error <= 5e-3; the relative k-space error is typically a few 1e-4, far below the
  2-7 dB noise), capped at `W` (`L = W` reproduces the exact model). Both methods have an exact adjoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._random import check_range, uniform
from .fourier import fft1c, fft2c, ifft1c, ifft2c
from .timing import sample_times_ms

__all__ = ["B0PhaseCorruption", "OffResonanceEncoding", "random_b0_map", "B0_METHODS", "segment_count"]

B0_METHODS = ("segmented", "exact")
#: default largest phase step between two segment times, radians (phasor error <= step^2 / 8)
PHASE_STEP_RAD = 0.2
#: segment phasors are recomputed exactly every RESYNC segments (in between: one complex product each)
RESYNC = 8


def random_b0_map(b0_max_hz: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None,
                  degree: int = 3) -> torch.Tensor:
    """Smooth random off-resonance maps `[B, 1, H, W]` (Hz) with `max |Df| = b0_max_hz` `[B]` each.

    `Df(y, x) = sum_{a + b <= degree} c_ab x^a y^b` on coordinates in `[-1, 1]` with `c_ab ~ N(0, 1)`
    (an offset, linear gradients and low-order curvature, like the residual shim terms of a magnet), then
    scaled to the requested maximum. `b0_max_hz = 0` gives zeros.
    """
    batch = b0_max_hz.shape[0]
    terms = [(a, b) for a in range(degree + 1) for b in range(degree + 1 - a)]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    coef = torch.randn(batch, len(terms), generator=generator, device=gen_device, dtype=torch.float64)
    coef = coef.to(b0_max_hz.device)
    y = torch.linspace(-1.0, 1.0, height, dtype=torch.float64, device=b0_max_hz.device)
    x = torch.linspace(-1.0, 1.0, width, dtype=torch.float64, device=b0_max_hz.device)
    basis = torch.stack([x[None, :] ** a * y[:, None] ** b for a, b in terms])  # [T, H, W]
    field = torch.einsum("bt,thw->bhw", coef, basis)
    peak = field.abs().amax(dim=(1, 2)).clamp_min(1e-12)
    field = field / peak[:, None, None] * b0_max_hz.to(torch.float64)[:, None, None]
    return field[:, None].to(torch.float32)


def segment_count(b0_map_hz: torch.Tensor, readout_ms: torch.Tensor, width: int,
                  phase_step_rad: float = PHASE_STEP_RAD) -> int:
    """Number `L` of segment times so the phase step between them is <= `phase_step_rad` (2 <= L <= W;
    L = 1 for a single readout sample, W = 1)."""
    max_hz = b0_map_hz.abs().reshape(b0_map_hz.shape[0], -1).amax(1)
    span_ms_hz = float((max_hz * readout_ms.to(max_hz.dtype)).amax())
    span_rad = 2.0 * math.pi * span_ms_hz * 1e-3 * (width - 1) / width
    return int(min(width, max(2, math.ceil(span_rad / phase_step_rad) + 1)))


class OffResonanceEncoding:
    """Linear encoding `E: image [B, 1, H, W] -> k-space [B, 1, H, W]` with off-resonance (see module doc).

    Args:
        b0_map_hz: off-resonance maps `[B, 1, H, W]`, Hz.
        readout_ms, te_ms: `[B]`, ms.
        method: `"segmented"` or `"exact"`.
        n_segments: number of segment times `L` (`None`: chosen by `segment_count`).

    `forward` and `adjoint` work in the complex dtype of their input (complex64 or complex128).
    """

    def __init__(self, b0_map_hz: torch.Tensor, readout_ms: torch.Tensor, te_ms: torch.Tensor,
                 method: str = "segmented", n_segments: int | None = None) -> None:
        if method not in B0_METHODS:
            raise ValueError(f"unknown B0 method {method!r}; valid methods: {', '.join(B0_METHODS)}")
        self.b0_map_hz = b0_map_hz
        self.readout_ms = readout_ms
        self.te_ms = te_ms
        self.method = method
        width = b0_map_hz.shape[-1]
        self.is_identity = not bool((b0_map_hz != 0).any())
        if n_segments is not None and n_segments < 2:
            raise ValueError(f"n_segments must be >= 2, got {n_segments}")
        if n_segments is None:
            n_segments = segment_count(b0_map_hz, readout_ms, width)
        # capped at W; W = 1 (one readout sample) gives one segment time, the sample's own: exact
        self.n_segments = min(int(n_segments), width)

    def echo_phasor(self, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """`exp(-i 2 pi Df TE)` `[B, 1, H, W]`: the smooth image-domain phase accrued up to the echo."""
        return self._phasor(self.te_ms.reshape(-1, 1, 1, 1), dtype)

    # -- helpers -------------------------------------------------------------------------------------------
    def _phasor(self, time_ms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`exp(-i 2 pi Df t)` for times `time_ms` broadcastable against the map (complex `dtype`)."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        angle = -2.0 * math.pi * 1e-3 * self.b0_map_hz.to(real) * time_ms.to(real)
        return torch.polar(torch.ones_like(angle), angle)

    def _segments(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
        """Segment times `[B, L]` (ms), interpolation weights `[L, W]` (real `dtype`) and, per segment,
        the slice of columns where its hat weight is non-zero."""
        width, n_seg = self.b0_map_hz.shape[-1], self.n_segments
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        t = sample_times_ms(self.readout_ms, self.te_ms, width, real)
        frac_pos = torch.linspace(0.0, 1.0, n_seg, dtype=real, device=t.device)
        tau = t[:, :1] + frac_pos[None, :] * (t[:, -1:] - t[:, :1])
        pos = torch.arange(width, dtype=torch.float64, device=t.device) * (n_seg - 1) / max(width - 1, 1)
        lower = pos.floor().clamp(max=max(n_seg - 2, 0))
        frac = pos - lower  # 0 where n_seg = 1
        weights = torch.zeros(n_seg, width, dtype=torch.float64, device=t.device)
        cols = torch.arange(width, device=t.device)
        weights[lower.long(), cols] = 1.0 - frac
        weights[(lower.long() + 1).clamp(max=n_seg - 1), cols] += frac
        support = []
        for seg in range(n_seg):
            nonzero = torch.nonzero(weights[seg]).flatten()
            support.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1) if len(nonzero) else slice(0, 0))
        return tau, weights.to(real), support

    def _segment_phasors(self, tau: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """`exp(-i 2 pi Df tau_l)` for `l = 0 .. L-1`: successive factors by one complex product with
        the step phasor, recomputed exactly every `RESYNC` segments (forward and adjoint: equal values)."""
        step = None
        for seg in range(tau.shape[1]):
            if seg % RESYNC == 0:
                phasor = self._phasor(tau[:, seg, None, None, None], dtype)
            else:
                if step is None:
                    step = self._phasor(tau[:, 1, None, None, None] - tau[:, 0, None, None, None], dtype)
                phasor = phasor * step
            yield phasor

    def _dft_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        width = self.b0_map_hz.shape[-1]
        return fft1c(torch.eye(width, dtype=dtype, device=self.b0_map_hz.device), dim=0)  # D[j, w]

    def _exact_columns(self, z: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """The exact path's chunks of readout samples `j` for `z` `[B, 1, H, W]` (forward and adjoint alike):
        per chunk its slice of columns, the phase factors `[B, 1, H, W, J]` and the DFT rows `D[j, w]`;
        chunks hold about 2^24 phase factors."""
        dft = self._dft_matrix(z.dtype)
        t = sample_times_ms(self.readout_ms, self.te_ms, z.shape[-1],
                            torch.float64 if z.dtype == torch.complex128 else torch.float32)
        step = max(1, (1 << 24) // max(z[..., 0].numel() * z.shape[-1], 1))
        for j0 in range(0, z.shape[-1], step):
            cols = slice(j0, j0 + step)
            yield cols, self._phasor_cols(t[:, cols], z.dtype), dft[cols]

    # -- operator ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode the complex image `x` `[B, 1, H, W]` into k-space."""
        if self.is_identity:
            return fft2c(x)
        if self.method == "exact":
            u = torch.empty_like(x)
            for cols, phase, dft in self._exact_columns(x):
                u[..., cols] = torch.einsum("bchwj,jw->bchj", x[..., None] * phase, dft)
            return fft1c(u, dim=-2)
        tau, weights, support = self._segments(x.dtype)
        k = torch.zeros_like(x)
        for phasor, w, cols in zip(self._segment_phasors(tau, x.dtype), weights, support, strict=True):
            rows = fft1c(x * phasor, dim=-1)[..., cols]
            k[..., cols] += w[cols] * fft1c(rows, dim=-2)
        return k

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """Exact adjoint `E^H` of `forward`: k-space `[B, 1, H, W]` -> image."""
        if self.is_identity:
            return ifft2c(k)
        if self.method == "exact":
            v = ifft1c(k, dim=-2)
            x = torch.zeros_like(k)
            for cols, phase, dft in self._exact_columns(k):
                x = x + torch.einsum("bchwj,jw,bchj->bchw", phase.conj(), dft.conj(), v[..., cols])
            return x
        tau, weights, support = self._segments(k.dtype)
        x = torch.zeros_like(k)
        for phasor, w, cols in zip(self._segment_phasors(tau, k.dtype), weights, support, strict=True):
            padded = torch.zeros_like(k)
            padded[..., cols] = ifft1c(w[cols] * k[..., cols], dim=-2)
            x += phasor.conj() * ifft1c(padded, dim=-1)
        return x

    def _phasor_cols(self, t_cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Phase factors `[B, 1, H, W, J]` for the column times `t_cols` `[B, J]` (ms)."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        times = t_cols.to(real)[:, None, None, None, :]
        angle = -2.0 * math.pi * 1e-3 * self.b0_map_hz.to(real)[..., None] * times
        return torch.polar(torch.ones_like(angle), angle)


class B0PhaseCorruption:
    """B0 inhomogeneity: a smooth random off-resonance map whose phase accrues over TE and the readout.

    At 0.05-0.5 T (Larmor 2.1-21 MHz) the residual inhomogeneity of a portable magnet over the brain after
    shimming is a few to tens of ppm; the default `max |Df|` of 10-60 Hz is 4-22 ppm at 0.064 T and
    0.5-3 ppm at 0.5 T, i.e. phase wraps of up to ~1 cycle at TE and readout shifts below ~1 pixel.

    Args:
        b0_max_hz_range: uniform range of `max |Df|` over the slice, Hz.
        b0_max_hz: fixed value that replaces the draw (0 = no corruption).
        poly_degree: degree of the random polynomial field (see `random_b0_map`).
        method: `"segmented"` (time segmentation, default) or `"exact"` (per-column sum).
        n_segments: number of segment times (`None`: automatic, see module docstring).
    """

    def __init__(self, b0_max_hz_range: tuple[float, float] = (10.0, 60.0), b0_max_hz: float | None = None,
                 poly_degree: int = 3, method: str = "segmented", n_segments: int | None = None) -> None:
        self.b0_max_hz_range = check_range("b0_max_hz_range", b0_max_hz_range, low=0.0)
        if b0_max_hz is not None and b0_max_hz < 0:
            raise ValueError(f"b0_max_hz must be >= 0, got {b0_max_hz}")
        if method not in B0_METHODS:
            raise ValueError(f"unknown B0 method {method!r}; valid methods: {', '.join(B0_METHODS)}")
        if poly_degree < 0:
            raise ValueError(f"poly_degree must be >= 0, got {poly_degree}")
        if n_segments is not None and n_segments < 2:
            raise ValueError(f"n_segments must be >= 2, got {n_segments}")
        self.b0_max_hz = b0_max_hz
        self.poly_degree = poly_degree
        self.method = method
        self.n_segments = n_segments

    def sample_max(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """`b0_max_hz` `[B]` drawn with `generator`."""
        return uniform(batch, self.b0_max_hz_range, self.b0_max_hz, generator, device)

    def sample_map(self, b0_max_hz: torch.Tensor, height: int, width: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Random field maps `[B, 1, H, W]` (Hz) with the given maxima."""
        return random_b0_map(b0_max_hz, height, width, generator, self.poly_degree)

    @staticmethod
    def encoding(params: dict[str, torch.Tensor], method: str = "segmented",
                 n_segments: int | None = None) -> OffResonanceEncoding | None:
        """The encoding this step contributes to `A`: `OffResonanceEncoding` of `b0_map_hz`
        `[B, 1, H, W]` (Hz), `readout_ms` and `te_ms` `[B]` (ms) evaluated with `method` /
        `n_segments`, or `None` (plain `fft2c`) when every field map is zero."""
        b0_map = params["b0_map_hz"]
        if not bool((b0_map != 0).any()):
            return None
        return OffResonanceEncoding(b0_map, params["readout_ms"], params["te_ms"], method, n_segments)
