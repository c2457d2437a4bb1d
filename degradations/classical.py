"""Classical parallel-imaging and compressed-sensing reconstructions of multi-coil, undersampled measurements
(issue 24): the field's baselines (`lfmri.baselines` registers them) and the compressed-sensing image lfmri's
undersampled default starts from (`cs_reconstruct`, `diffusion.inference`).

Each baseline maps a `degradations.Measurement` (k-space y `[S,C,H,W]`, C coils or one, zeros where not
sampled; its operator A: image `[s,1,H,W]` -> k-space `[s,C,H,W]` with the mask, the coil sensitivities and
any blur / T2* / B0) to a magnitude volume float32 `[S,H,W]`, like every baseline of `lfmri.baselines`:

- `zero_filled_rss`: the root-sum-of-squares of the per-coil zero-filled images `ifft2c(y_c)` (no
  parameters; for one coil `|ifft2c(y)|`);
- `cg_sense`: CG-SENSE, `argmin_x ||A x - y||^2 + lam ||x||^2` with `lam = lam_factor * sigma_img^2`, by
  conjugate gradients on the normal equations `(A^H A + lam I) x = A^H y` from 0 (`conjugate_gradient`, in
  torch on the measurement's device);
- `l1_wavelet`: `argmin_x 1/2 ||A x - y||^2 + lam ||Psi x||_1`, Psi the Daubechies-4 wavelet transform,
  `lam = lam_factor * sigma_img`, by FISTA (`L1_WAVELET_ITERATIONS`);
- `tv_cs`: `argmin_x 1/2 ||A x - y||^2 + lam ||D x||_1`, D the circular finite differences along H and W
  (anisotropic TV of the complex image), `lam = lam_factor * sigma_img`, by PDHG (`TV_CS_ITERATIONS`).

SigPy's parts: `l1_wavelet` and `tv_cs` are SigPy's `L1WaveletRecon` / `TotalVariationRecon` formulations
with the measurement's own operator in place of SigPy's SENSE operator: the solvers
(`sigpy.app.LinearLeastSquares`: `GradientMethod` with Nesterov acceleration = FISTA, and
`PrimalDualHybridGradient`), the wavelet transform (`sigpy.linop.Wavelet`, db4), the finite differences
(`sigpy.linop.FiniteDifference`) and the proximal operators (`sigpy.prox.L1Reg`,
`sigpy.prox.UnitaryTransform`) are SigPy's. Ours: the `OperatorLinop` wrapping the torch operator as a
SigPy Linop, the step sizes (from the seeded power iteration `Measurement.operator_norm_sq`, so runs are
deterministic), the CG of `cg_sense` and the parameterisation by the noise level.

Noise level: `sigma_img = noise_sigma / sqrt(2)` per slice (`Measurement.image_sigma`), as for every
baseline: with sensitivities normalised to `sum_c |s_c|^2 = 1` the coil-combined image has the noise of one
coil.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import sigpy
import torch
from torch import Tensor

from .coils import root_sum_of_squares
from .fourier import ifft2c
from .measurement import Measurement
from .operator import ForwardOperator

#: CG-SENSE: stop when every slice's residual of the normal equations is below this fraction of its
#: right-hand side `||A^H y||`, or after `CG_MAX_ITERATIONS`
CG_TOL = 1e-4
CG_MAX_ITERATIONS = 100
#: fixed iteration counts of the CS baselines, chosen by measuring convergence on a 181 x 96 8-coil Colin27
#: slice (ESPIRiT maps; 4x at 30 dB and 2x at 4 dB; lam factors 0.03-4): after 100 FISTA iterations the
#: objective changes by < 1e-5 (relative) per iteration and is within 3e-4 of a 200-iteration run's; after
#: 200 PDHG iterations it is within 5e-5 of a 600-iteration run's (7e-4 at 4 dB with lam factor 2)
L1_WAVELET_ITERATIONS = 100
TV_CS_ITERATIONS = 200
#: PDHG's dual step of `tv_cs` is `sigma = PDHG_DUAL_SCALE * sqrt(lam)` (mean over the batch), the primal
#: step `tau = 1 / (sigma ||[A; D]||^2)`. SigPy's default, sigma = 1, converges slowly when lam is small (high
#: SNR): on a 181 x 96 8-coil Colin27 slice (4x, 30 dB) the objective after 200 iterations was 1e-2 above its
#: minimum and the SSIM 0.77 instead of 0.85; with sqrt(lam) the objective is within ~1e-4 at 30 dB and 4 dB
#: (measured against sigma = 0.02-0.5 for lam = 1e-3 to 0.5)
PDHG_DUAL_SCALE = 1.0
#: slices solved together (one SigPy problem / one batched CG)
CS_BATCH = 8
#: safety margin on the power-iteration estimate of ||A||^2 (an estimate from below)
NORM_MARGIN = 1.05
#: ||D||^2 <= 8 for circular finite differences along two axes
FINITE_DIFFERENCE_NORM_SQ = 8.0


def zero_filled_rss(m: Measurement) -> np.ndarray:
    """Root-sum-of-squares of the per-coil zero-filled images `sqrt(sum_c |ifft2c(y_c)|^2)` -> float32
    `[S, H, W]` (one coil: `|ifft2c(y)|`)."""
    return root_sum_of_squares(ifft2c(m.y)).cpu().numpy().astype(np.float32)


def _batches(m: Measurement, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, len(m))) for start in range(0, len(m), batch_size)]


def _slice_dot(a: Tensor, b: Tensor) -> Tensor:
    """Real part of `<a, b>` per slice of `[B, ...]` tensors -> `[B]`."""
    return torch.real((a.conj() * b).flatten(1).sum(1))


def conjugate_gradient(normal: Callable[[Tensor], Tensor], rhs: Tensor, max_iter: int = CG_MAX_ITERATIONS,
                       tol: float = CG_TOL, residuals: list[Tensor] | None = None) -> Tensor:
    """Solve `N x = rhs` per slice, `N` Hermitian positive (semi-)definite, by conjugate gradients from 0.

    Each slice `[b]` of `rhs` `[B, ...]` (complex) is its own system (own step sizes); a slice stops moving
    once its residual `||rhs - N x|| <= tol ||rhs||`; all stop after `max_iter` iterations. `residuals`: if a
    list, each iteration's relative residual `[B]` is appended. Returns x, shaped and typed like `rhs`.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = _slice_dot(r, r)
    target = (tol**2) * rr
    expand = (-1,) + (1,) * (rhs.dim() - 1)
    for _ in range(max_iter):
        active = rr > target
        if not bool(active.any()):
            break
        q = normal(p)
        alpha = torch.where(active, rr / _slice_dot(p, q).clamp_min(1e-30), 0.0).reshape(expand)
        x = x + alpha * p
        r = r - alpha * q
        rr_new = _slice_dot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(1e-30), 0.0).reshape(expand)
        p = r + beta * p
        rr = rr_new
        if residuals is not None:
            residuals.append((rr / (target / tol**2).clamp_min(1e-30)).sqrt())
    return x


def cg_sense(m: Measurement, lam_factor: float, max_iter: int = CG_MAX_ITERATIONS, tol: float = CG_TOL,
             batch_size: int = CS_BATCH) -> np.ndarray:
    """CG-SENSE with Tikhonov regularisation `lam = lam_factor * sigma_img^2` (module docstring), on the
    measurement's device -> magnitude float32 `[S, H, W]`."""
    lam = torch.from_numpy(m.image_sigma**2 * lam_factor).to(m.y.device, torch.float32)
    out = []
    for sl in _batches(m, batch_size):
        operator, lam_b = m.operator(sl), lam[sl].reshape(-1, 1, 1, 1)

        def normal(v: Tensor, a: ForwardOperator = operator, lam_b: Tensor = lam_b) -> Tensor:
            return a.adjoint(a.forward(v)) + lam_b * v

        x = conjugate_gradient(normal, operator.adjoint(m.y[sl]), max_iter, tol)
        out.append(x[:, 0].abs().cpu())
    return torch.cat(out).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# the measurement's operator as a SigPy Linop, and the SigPy CS reconstructions


class OperatorLinop(sigpy.linop.Linop):
    """A `ForwardOperator` of s slices as a SigPy Linop on numpy arrays: image `[s, H, W]` -> k-space
    `[s, C, H, W]` (`adjoint=True`: the reverse, `A^H`), evaluated in torch on `device` in `dtype`
    (complex64 or complex128); inputs are cast to `dtype`, outputs are numpy `dtype` on the CPU."""

    def __init__(self, operator: ForwardOperator, image_shape: tuple[int, int, int], n_coils: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.complex64,
                 adjoint: bool = False) -> None:
        self.operator, self.device, self.dtype = operator, torch.device(device), dtype
        self.adjoint = adjoint
        self.image_shape, self.n_coils = tuple(image_shape), int(n_coils)
        s, h, w = self.image_shape
        kspace_shape = (s, self.n_coils, h, w)
        oshape, ishape = (self.image_shape, kspace_shape) if adjoint else (kspace_shape, self.image_shape)
        super().__init__(oshape, ishape)

    def _apply(self, input: np.ndarray) -> np.ndarray:
        numpy_dtype = np.complex64 if self.dtype == torch.complex64 else np.complex128
        t = torch.from_numpy(np.ascontiguousarray(input, dtype=numpy_dtype)).to(self.device)
        if self.adjoint:
            out = self.operator.adjoint(t)[:, 0]
        else:
            out = self.operator.forward(t[:, None])
        return out.to(self.dtype).cpu().numpy()

    def _adjoint_linop(self) -> OperatorLinop:
        return OperatorLinop(self.operator, self.image_shape, self.n_coils, self.device, self.dtype,
                             not self.adjoint)


def operator_linop(m: Measurement, sl: slice = slice(None), dtype: torch.dtype = torch.complex64
                   ) -> OperatorLinop:
    """The measurement's operator A of the slices `sl` as a `sigpy.linop.Linop` (numpy in and out): image
    `[s, H, W]` -> k-space `[s, C, H, W]`; its `.H` is the exact adjoint `A^H`. Evaluated in torch on the
    measurement's device in `dtype`."""
    s = len(range(*sl.indices(len(m))))
    return OperatorLinop(m.operator(sl), (s, *m.matrix), m.y.shape[1], m.y.device, dtype)


Regulariser = Literal["wavelet", "tv"]


def cs_reconstruct(m: Measurement, regulariser: Regulariser, lam_factor: float, sl: slice = slice(None),
                   iterations: int | None = None, objective: list[float] | None = None) -> np.ndarray:
    """`argmin_x 1/2 ||A x - y||^2 + lam R(x)` for the slices `sl` of a measurement, with SigPy (module
    docstring): R the L1 norm of the db4 wavelet transform (`"wavelet"`, FISTA) or of the finite
    differences (`"tv"`, PDHG), `lam = lam_factor * sigma_img` per slice, started from `A^H y`.

    `iterations`: default `L1_WAVELET_ITERATIONS` / `TV_CS_ITERATIONS`. `objective`: if a list, the
    objective of the start and of every iterate (summed over the slices) is appended. Returns the complex
    image, numpy complex64 `[s, H, W]`.
    """
    A = operator_linop(m, sl)
    y = m.y[sl].cpu().numpy()
    lam = (m.image_sigma[sl] * lam_factor).astype(np.float32).reshape(-1, 1, 1)
    x = A.H(y)
    norm_sq = NORM_MARGIN * float(m.operator_norm_sq(sl).max())
    if regulariser == "wavelet":
        transform = sigpy.linop.Wavelet(A.ishape, axes=(1, 2), wave_name="db4")
        # SigPy pads every axis to an even length, the slice axis too: the padded slice's lam is irrelevant
        lam_w = np.pad(lam, ((0, transform.oshape[0] - lam.shape[0]), (0, 0), (0, 0)), mode="edge")
        proxg = sigpy.prox.UnitaryTransform(sigpy.prox.L1Reg(transform.oshape, lam_w), transform)
        options = {"alpha": 1.0 / norm_sq, "max_iter": iterations or L1_WAVELET_ITERATIONS}

        def g(v: np.ndarray) -> float:  # lam ||Psi x||_1 (SigPy's objective evaluates g(x))
            return float(np.sum(lam_w * np.abs(transform(v))))
    elif regulariser == "tv":
        transform = sigpy.linop.FiniteDifference(A.ishape, axes=(1, 2))
        proxg = sigpy.prox.L1Reg(transform.oshape, lam)
        # dual step PDHG_DUAL_SCALE * sqrt(lam) (SigPy's 1 without noise, lam = 0), the largest primal step
        # with tau sigma ||[A; D]||^2 <= 1
        dual_step = PDHG_DUAL_SCALE * (float(np.sqrt(lam.mean())) or 1.0)
        options = {"G": transform, "sigma": dual_step,
                   "tau": 1.0 / (dual_step * (norm_sq + FINITE_DIFFERENCE_NORM_SQ)),
                   "max_iter": iterations or TV_CS_ITERATIONS}

        def g(v: np.ndarray) -> float:  # lam ||D x||_1 (SigPy's objective evaluates g(D x))
            return float(np.sum(lam * np.abs(v)))
    else:
        raise ValueError(f"regulariser must be 'wavelet' or 'tv', got {regulariser!r}")
    app = sigpy.app.LinearLeastSquares(A, y, x=x, proxg=proxg, g=g, show_pbar=False,
                                       save_objective_values=objective is not None, **options)
    x = app.run()
    if objective is not None:
        objective.extend(float(v) for v in app.objective_values)
    return np.asarray(x, dtype=np.complex64)


def _cs(m: Measurement, regulariser: Regulariser, lam_factor: float, iterations: int | None,
        batch_size: int) -> np.ndarray:
    out = [cs_reconstruct(m, regulariser, lam_factor, sl, iterations) for sl in _batches(m, batch_size)]
    return np.abs(np.concatenate(out)).astype(np.float32)


def l1_wavelet(m: Measurement, lam_factor: float, iterations: int = L1_WAVELET_ITERATIONS,
               batch_size: int = CS_BATCH) -> np.ndarray:
    """L1-wavelet compressed sensing (SigPy, FISTA), `lam = lam_factor * sigma_img` -> magnitude float32
    `[S, H, W]`."""
    return _cs(m, "wavelet", lam_factor, iterations, batch_size)


def tv_cs(m: Measurement, lam_factor: float, iterations: int = TV_CS_ITERATIONS,
          batch_size: int = CS_BATCH) -> np.ndarray:
    """Total-variation compressed sensing (SigPy, PDHG), `lam = lam_factor * sigma_img` -> magnitude float32
    `[S, H, W]`."""
    return _cs(m, "tv", lam_factor, iterations, batch_size)
