"""Data-consistency (DC) steps of the reconstruction samplers (plain torch).

Every step acts on float `[B, 2, H, W]` images (real, imaginary channels) and returns the same layout and
dtype; inside, the physics runs in complex64 `[B, 1, H, W]`. The measurement is `y = A x + n`: k-space
`y` complex `[B, C, H, W]` (C receive coils, 1 for single-coil data; 0 where not sampled), `A` the known
forward operator (`degradations.ForwardOperator`: image `[B, 1, H, W]` -> k-space `[B, C, H, W]`), `n`
white complex Gaussian noise of std `sigma_y` per k-space sample and coil (`noise_sigma` `[B]`, units of `y`;
prewhitened coils).

A step is called `dc(x0, sigma_t)` on a denoised (Tweedie) estimate `x0` whose error has std `sigma_t`
`[B]` in image units (for the VP-SDE `std(t) / alpha(t)`), or `dc.on_iterate(x, alpha, std)` on a noisy
iterate `x = alpha x0 + std z` of the sampler (`alpha`, `std` `[B]`, `alpha > 0`).

* `GradientDC`: the paper's gradient step `x - weight A^H (A x - y)` (`sigma_t` is ignored; on
  the noisy iterate it is score-MRI's step, the same formula).
* `ProximalDC`: noise-aware DC (DiffPIR / DDS style), the proximal step

      x = argmin_x ||A x - y||^2 / sigma_y^2 + rho_t ||x - x0||^2,
      rho_t = 1 / (sigma_t^2 / lam + floor^2),

  i.e. `(A^H A + mu I) x = A^H y + mu x0` with the dimensionless `mu = rho_t sigma_y^2` (a ratio of
  noise variances). `1 / rho_t` is the variance assumed for the error of `x0`: the diffusion noise
  `sigma_t^2` scaled by `1 / lam`, plus `floor^2`, the error the network keeps when `sigma_t -> 0`
  (its own misfit to the data). Without the floor (`floor = 0`, `rho_t = lam / sigma_t^2`) the last
  steps of a sampler, where `sigma_t -> 0`, hand the output to `x0` however small `sigma_y` is; with it
  the data keep weight `floor^2 / (floor^2 + sigma_y^2)` per k-space sample there, so a measurement less
  noisy than the network's error is kept (the fixed-start samplers' `floor = 0.02`: 50 % at sigma_y = 0.02,
  about 30 dB SNR on our normalised images; 0.4 % at sigma_y = 0.3, about 5 dB; warm_ddim, whose start follows
  the noise level, needs none). `mu = 0` (`sigma_y = 0`, or
  `sigma_t = inf`) is the hard data projection, `mu = inf` (`sigma_y = inf`, or `sigma_t = 0` with
  `floor = 0`) keeps `x0`; `sigma_y = 0` takes precedence (exact data are always kept). Numerically
  the system is solved as `(c A^H A + d I) x = c A^H y + d x0` with `c = 1 / (1 + mu)` and
  `d = mu / (1 + mu)` in `[0, 1]`, so neither limit overflows. Where `A = diag(a) F`
  (`A.is_diagonal`: noise only, blur, T2* along the readout, a sampling mask; one coil) it is closed form per
  k-space sample,

      k = (d F x0 + c a y) / (d + c a^2)      (F x0 where d + c a^2 = 0, i.e. a = 0 and mu = 0),

  `x = ifft2c(k)` (`ForwardOperator.solve_normal`; an unsampled sample, `a = 0`, keeps `F x0`). With B0
  (an off-resonance encoding) or coil sensitivities it takes
  `cg_iters` preconditioned conjugate-gradient steps per slice, warm-started at `x0`. The preconditioner is
  the closed form of the operator without the off-resonance of the readout, `S^H F^H diag(1 / (d + c a^2))
  F S` with `S` the phase accrued up to the echo, `exp(-i 2 pi df TE)`
  (`ForwardOperator.echo_preconditioner`); it is exact where `A = diag(a) F`, so CG forced there
  reproduces the closed form in one step. Measured on three 197x233 MNI slices with a 60 Hz field
  map, TE 20 ms and a 12 ms readout (relative error of the solution after the default 10 steps):
  4e-4 at `mu = 0.01`, below 1e-7 at `mu = 1`; without the preconditioner 0.19 and 1e-7. Near
  `mu = 0` the exact solution divides the noise by the small `a` where the signal is strongly
  attenuated; CG approaches it slowly (an implicit regularisation), the closed form exactly.
  With coil sensitivities the preconditioner ignores the coils and takes the mask as the slice's sampled
  fraction (see `echo_preconditioner`). Measured on a 181x217 Colin27 slice, 8 birdcage coils, 4x random
  Cartesian mask, 5 dB (relative error after 10 steps, plain CG / preconditioned): without blur, T2* and B0
  (where it is a multiple of the identity) 0.14 / 0.14 at `mu = 0.01`, 7e-4 / 7e-4 at 0.1, 1.5e-7 at 1;
  with blur, T2* and a 60 Hz B0 map (TE 20 ms, 12 ms readout) 0.17 / 0.11 at 0.01, 1.3e-3 / 6.8e-4 at 0.1,
  1.6e-7 at 1.
  Parallel imaging at small `mu` is ill-conditioned: 10 steps leave ~10 % there.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
from torch import Tensor

from degradations import ForwardOperator, channels_to_complex, complex_to_channels

__all__ = ["GradientDC", "LinearOperator", "ProximalDC", "ProximalMethod"]

ProximalMethod = Literal["auto", "closed_form", "cg"]
_TINY = torch.finfo(torch.float32).tiny


class LinearOperator(Protocol):
    """What the gradient step needs of a forward operator (e.g. `degradations.ForwardOperator`)."""

    def forward(self, x: Tensor) -> Tensor: ...  # complex image [B,1,H,W] -> k-space [B,C,H,W]

    def adjoint(self, k: Tensor) -> Tensor: ...  # k-space [B,C,H,W] -> complex image [B,1,H,W]


def _check_kspace(y: Tensor, A: object) -> Tensor:
    """`y` as complex64 after checking it is complex `[B,C,H,W]` with the operator's `C` (`A.n_coils` where
    it has one)."""
    if not y.is_complex() or y.dim() != 4:
        raise ValueError(f"y must be complex k-space [B,C,H,W], got {tuple(y.shape)} {y.dtype}")
    n_coils = getattr(A, "n_coils", None)
    if n_coils is not None and y.shape[1] != n_coils:
        raise ValueError(f"y has {y.shape[1]} coil(s), the operator {n_coils}")
    return y.to(torch.complex64)


def _bc(v: Tensor) -> Tensor:
    """`[B]` -> `[B, 1, 1, 1]` for broadcasting over images."""
    return v[:, None, None, None]


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """`Re <u, v>` per slice of complex `[B,1,H,W]` tensors, `[B]`."""
    return (u.conj() * v).real.sum(dim=(1, 2, 3))


class GradientDC:
    """Gradient step on `1/2 ||A x - y||^2`: `x <- x - weight A^H (A x - y)` on the complex image.

    `A` has `.forward` (complex image `[B,1,H,W]` -> k-space `[B,C,H,W]`) and `.adjoint`; `y` is the
    measured k-space, complex `[B,C,H,W]`. With `A = fft2c` (unitary) and `weight = 1` it replaces the
    k-space of `x` by `y`.
    """

    def __init__(self, A: LinearOperator, y: Tensor, weight: float = 0.3) -> None:
        self.A, self.y, self.weight = A, _check_kspace(y, A), float(weight)

    def residual(self, x: Tensor) -> Tensor:
        """`A x - y`, complex `[B,C,H,W]`, for `x` float `[B,2,H,W]`."""
        return self.A.forward(channels_to_complex(x)) - self.y

    def __call__(self, x: Tensor, sigma_t: Tensor | None = None) -> Tensor:
        """One step on float `[B,2,H,W]` (`sigma_t` is ignored)."""
        step = complex_to_channels(self.A.adjoint(self.residual(x)))
        return x - self.weight * step.to(x.dtype)

    def on_iterate(self, x: Tensor, alpha: Tensor, std: Tensor) -> Tensor:
        """score-MRI's step on the noisy iterate: the same `x - weight A^H (A x - y)`."""
        return self(x)


class ProximalDC:
    """Noise-aware proximal DC `argmin_x ||A x - y||^2 / sigma_y^2 + rho_t ||x - x0||^2`,
    `rho_t = 1 / (sigma_t^2 / lam + floor^2)`.

    See the module docstring for the maths, the limits and the solvers.

    Args:
        A: the forward operator (`forward`, `adjoint`, and for the solvers `is_diagonal`, `solve_normal`,
            `echo_preconditioner`), e.g. a `Measurement`'s.
        y: measured k-space, complex `[B,C,H,W]` with the operator's C (cast to complex64).
        noise_sigma: `sigma_y`, std of the complex k-space noise per sample, `[B]` or a scalar, `>= 0`
            (`inf`: `y` carries no information).
        lam: the coupling `lam > 0` of `rho_t` (x0's error from the diffusion: `sigma_t / sqrt(lam)`).
        floor: std of the error `x0` keeps as `sigma_t -> 0` (image units, `>= 0`; 0: none).
        cg_iters: conjugate-gradient steps of the B0 solver (`>= 1`).
        method: `"auto"` (closed form when `A.is_diagonal`, else CG), `"closed_form"` (ValueError
            for an operator that is not diagonal) or `"cg"` (always CG, e.g. to test it).
        precondition: precondition CG with the closed form of the operator without readout off-resonance.
    """

    def __init__(self, A: ForwardOperator, y: Tensor, noise_sigma: Tensor | float, lam: float = 1.0,
                 floor: float = 0.0, cg_iters: int = 10, method: ProximalMethod = "auto",
                 precondition: bool = True) -> None:
        self.A, self.y = A, _check_kspace(y, A)
        batch = self.y.shape[0]
        sigma_y = torch.as_tensor(noise_sigma, dtype=torch.float32, device=self.y.device)
        if sigma_y.numel() not in (1, batch):
            raise ValueError(f"noise_sigma must be a scalar or [B] with B = {batch}, "
                             f"got {tuple(sigma_y.shape)}")
        self.sigma_y = sigma_y.reshape(-1).expand(batch).clone()
        if not bool((self.sigma_y >= 0).all()):
            raise ValueError(f"noise_sigma must be >= 0 (inf allowed), got {self.sigma_y.tolist()}")
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be finite and > 0, got {lam}")
        if not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be finite and >= 0, got {floor}")
        if cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {cg_iters}")
        if method not in ("auto", "closed_form", "cg"):
            raise ValueError(f"unknown method {method!r}; valid: auto, closed_form, cg")
        if method == "closed_form" and not A.is_diagonal:
            raise ValueError("the closed form needs A = diag(a) F; this operator has an off-resonance "
                             "encoding or coil sensitivities (use method='cg' or 'auto')")
        self.lam, self.floor = float(lam), float(floor)
        self.cg_iters, self.precondition = int(cg_iters), bool(precondition)
        self.use_cg = method == "cg" or (method == "auto" and not A.is_diagonal)

    def coupling(self, sigma_t: Tensor | float) -> tuple[Tensor, Tensor]:
        """`(c, d) = (1 / (1 + mu), mu / (1 + mu))`, float32 `[B]`, for `mu = sigma_y^2 / s_p^2` with
        the prior error std `s_p = sqrt(sigma_t^2 / lam + floor^2)` (`sigma_y = 0` -> `mu = 0`; else
        `s_p = 0` or `sigma_y = inf` -> `mu = inf`)."""
        s_t = torch.as_tensor(sigma_t, dtype=torch.float32, device=self.y.device).expand_as(self.sigma_y)
        if not bool((s_t >= 0).all()):
            raise ValueError(f"sigma_t must be >= 0 (inf allowed), got {s_t.tolist()}")
        s_y = self.sigma_y
        s_p = torch.sqrt(s_t**2 / self.lam + self.floor**2)
        # s_y / s_p is inf for s_p = 0 as wanted; the wheres set the 0 / 0 and inf / inf cases
        ratio = torch.where(s_y == 0, torch.zeros_like(s_y), s_y / s_p)
        ratio = torch.where(torch.isinf(s_y), torch.full_like(s_y, math.inf), ratio)
        mu = ratio**2
        c = 1.0 / (1.0 + mu)
        d = torch.where(torch.isinf(mu), torch.ones_like(mu), mu / (1.0 + mu))
        return c, d

    def __call__(self, x0: Tensor, sigma_t: Tensor | float) -> Tensor:
        """The step on the denoised estimate `x0` float `[B,2,H,W]` whose error std is `sigma_t`
        (`[B]` or a scalar, image units, `0` and `inf` allowed)."""
        c, d = self.coupling(sigma_t)
        z0 = channels_to_complex(x0)
        z = self._conjugate_gradient(z0, c, d) if self.use_cg else self.A.solve_normal(z0, self.y, c, d)
        return complex_to_channels(z).to(x0.dtype)

    def on_iterate(self, x: Tensor, alpha: Tensor, std: Tensor) -> Tensor:
        """The step on a noisy iterate `x = alpha x0 + std z`: `alpha * dc(x / alpha, std / alpha)`."""
        scale = _bc(alpha.to(device=x.device, dtype=x.dtype))
        return scale * self(x / scale, std / alpha)

    def _normal(self, v: Tensor, c: Tensor, d: Tensor) -> Tensor:
        """`(c A^H A + d I) v` for complex `v` `[B,1,H,W]`."""
        return _bc(c) * self.A.adjoint(self.A.forward(v)) + _bc(d) * v

    def _conjugate_gradient(self, z0: Tensor, c: Tensor, d: Tensor) -> Tensor:
        """`cg_iters` (preconditioned) CG steps on `(c A^H A + d I) x = c A^H y + d x0` from `x0`."""
        precondition = self.A.echo_preconditioner(c, d) if self.precondition else (lambda r: r)
        x = z0
        r = _bc(c) * self.A.adjoint(self.y) + _bc(d) * z0 - self._normal(z0, c, d)
        p = precondition(r)
        rz = _dot(r, p)
        for _ in range(self.cg_iters):
            q = self._normal(p, c, d)
            pq = _dot(p, q)
            step = _bc(torch.where(pq > 0, rz / pq.clamp_min(_TINY), 0.0))
            x = x + step * p
            r = r - step * q
            s = precondition(r)
            rz_next = _dot(r, s)
            p = s + _bc(torch.where(rz > 0, rz_next / rz.clamp_min(_TINY), 0.0)) * p
            rz = rz_next
        return x
