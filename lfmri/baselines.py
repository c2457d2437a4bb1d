"""Classical baselines on the same measurements as lfmri, and their tuning on validation data.

Every baseline maps a `degradations.Measurement` (one stack of S slices of one matrix size: the measured
k-space y, the degraded complex image `ifft2c(y)`, the operator A it owns and the k-space noise std per slice)
to a magnitude volume `[S, H, W]` (float32, the slices' normalised units):

- `degraded`: the magnitude of the degraded image itself (no parameters);
- `tv`: total-variation denoising of the magnitude image, scikit-image's `denoise_tv_chambolle`,
  `weight = weight_factor * sigma_img` (run to convergence: `TV_EPS`, `TV_MAX_ITERATIONS`);
- `nlm`: non-local means on the magnitude image, scikit-image's `denoise_nl_means` (fast mode, 5x5 patches,
  13x13 search window), `h = h_factor * sigma_img`;
- `tv_complex`, `nlm_complex`: the same denoisers on the real and imaginary parts of the complex image
  separately (the noise there is Gaussian, not Rician), then the magnitude;
- `bm3d`, `bm3d_complex` (optional extra `pip install 'lfmri[bm3d]'`; the `bm3d` package is free for
  non-commercial use only): BM3D (`bm3d.bm3d`, its default profile) on the magnitude image, or on the real and
  imaginary parts separately, with noise std `sigma_factor * sigma_img`;
- `tv_model`: model-based TV-regularised least squares with the known forward operator A (blur, T2*, B0),
  `min_x 1/2 ||A x - y||^2 + w TV(x)` on the complex image, `w = weight_factor * sigma_img` (the same as
  `1/2 ||A x - y||^2 / sigma^2 + lambda TV(x)` with `lambda = w / sigma^2`), by PDHG (`tv_reconstruct`);
- `zero_filled_rss`, `cg_sense`, `l1_wavelet`, `tv_cs`: the parallel-imaging and compressed-sensing baselines
  for multi-coil, undersampled measurements (`degradations.classical`: root-sum-of-squares of the zero-filled
  coil images; CG-SENSE with Tikhonov `lam = lam_factor * sigma_img^2`; L1-wavelet and TV compressed sensing
  with SigPy, `lam = lam_factor * sigma_img`), all with the measurement's own operator A (mask, coil
  sensitivities, blur, T2*, B0); they run on single-coil, fully sampled measurements too.

Noise level: `sigma` is the measurement's `noise_sigma`, the std of the complex k-space noise per sample
(recorded by the simulation, given, or estimated when the measurement is made: the same value the diffusion
reconstruction uses). With centred orthonormal FFTs the image noise is white
with std `sigma_img = sigma / sqrt(2)` in each of the real and imaginary channels, and about the same in
the magnitude where the signal is well above the noise. Every parameter is a factor of each slice's
`sigma_img`, so one tuned factor serves slices degraded at different SNRs.

`tune_baseline` chooses a baseline's parameters by grid search (`Baseline.grid`), maximising the mean SSIM
across the volumes it is given; callers pass validation volumes only (`tune_baselines` records which
volumes it saw). Grids (`Baseline.grid`) are small enough for a CPU: 7 points for the image denoisers
(TV and NL-means: < 1 s per slice), 3 for BM3D (seconds per slice, twice that for the complex variant), 6 for
`tv_model` (`TV_MODEL_ITERATIONS` PDHG iterations: about a second per 256^2 slice without B0 on one CPU
thread, several with B0) and for the CS baselines (seconds per 8-coil slice: `degradations.classical`).
`Baseline.defaults` are the parameters used without tuning (see `BASELINES`).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle
from torch import Tensor

from degradations import ForwardOperator, Measurement, operator_norm_sq
from degradations.classical import cg_sense, l1_wavelet, tv_cs, zero_filled_rss

#: a volume metric, `metric(pred [S,H,W], ref [S,H,W]) -> float` (higher is better for tuning)
VolumeMetric = Callable[[np.ndarray, np.ndarray], float]

#: stopping rule of scikit-image's Chambolle TV (`tv`, `tv_complex`): its defaults (eps 2e-4, at most 200
#: iterations) stop far from the minimum at 2-7 dB (MNI152, noise regime, complex TV: val SSIM 0.33 against
#: 0.42 converged), so relative energy change < 1e-6, at most 2000 iterations (~0.3 s per 197 x 233 image)
TV_EPS = 1e-6
TV_MAX_ITERATIONS = 2000
#: PDHG iterations of `tv_model`, a fixed count: on 128^2 MNI152 crops at 4 dB (noise, noise + blur and all
#: four degradations) the objective is within ~1e-4 (relative) of its minimum and the iterate within ~0.3 %
TV_MODEL_ITERATIONS = 150
#: PDHG primal / dual step ratio r: tau = r / L, sigma = 1 / (r L) (r = 0.2-0.3 converged fastest there)
PDHG_STEP_RATIO = 0.25
#: slices reconstructed together by `tv_model`
TV_MODEL_BATCH = 16


# ----------------------------------------------------------------------------------------------------------
# image-domain denoisers (magnitude, or real and imaginary parts separately)

#: a 2D denoiser, `denoise(image [H,W] float64, sigma, factor) -> [H,W]`
Denoiser2D = Callable[[np.ndarray, float, float], np.ndarray]


def _per_slice(m: Measurement, denoise: Denoiser2D, factor: float, complex_parts: bool) -> np.ndarray:
    """Apply `denoise` slice by slice to the magnitude (or to the real and imaginary parts, then take the
    magnitude) with each slice's image noise std -> float32 `[S, H, W]`."""
    sigmas = m.image_sigma
    out = []
    if complex_parts:
        for image, sigma in zip(m.complex_image(), sigmas, strict=True):
            if sigma <= 0.0:
                out.append(np.abs(image))
                continue
            re, im = denoise(image.real, sigma, factor), denoise(image.imag, sigma, factor)
            out.append(np.hypot(re, im))
    else:
        for image, sigma in zip(m.magnitude(), sigmas, strict=True):
            out.append(image if sigma <= 0.0 else denoise(image, sigma, factor))
    return np.stack(out).astype(np.float32)


def _tv_2d(image: np.ndarray, sigma: float, weight_factor: float) -> np.ndarray:
    return denoise_tv_chambolle(image, weight=weight_factor * sigma, eps=TV_EPS,
                                max_num_iter=TV_MAX_ITERATIONS)


def _nlm_2d(image: np.ndarray, sigma: float, h_factor: float) -> np.ndarray:
    return denoise_nl_means(image, h=h_factor * sigma, sigma=sigma, fast_mode=True, patch_size=5,
                            patch_distance=6)


def _import_bm3d() -> Any:
    """The `bm3d` module, or ModuleNotFoundError with a one-line message naming the extra."""
    try:
        import bm3d  # optional / heavy: imported on use (the `lfmri[bm3d]` extra)
    except ImportError as err:
        raise ModuleNotFoundError(BM3D_MISSING) from err
    return bm3d


BM3D_MISSING = ("baseline bm3d needs the optional package 'bm3d' (free for non-commercial use only): "
                "pip install 'lfmri[bm3d]'")


def _bm3d_2d(image: np.ndarray, sigma: float, sigma_factor: float) -> np.ndarray:
    return np.asarray(_import_bm3d().bm3d(image, sigma_psd=sigma_factor * sigma), dtype=np.float64)


def degraded_baseline(m: Measurement) -> np.ndarray:
    """The degraded magnitude `|ifft2c(y)|`, float32 `[S, H, W]`."""
    return m.magnitude().astype(np.float32)


def tv(m: Measurement, weight_factor: float) -> np.ndarray:
    """Magnitude TV (Chambolle), `weight = weight_factor * sigma_img` -> float32 `[S, H, W]`."""
    return _per_slice(m, _tv_2d, weight_factor, complex_parts=False)


def tv_complex(m: Measurement, weight_factor: float) -> np.ndarray:
    """TV on the real and imaginary parts separately, then the magnitude -> float32 `[S, H, W]`."""
    return _per_slice(m, _tv_2d, weight_factor, complex_parts=True)


def nlm(m: Measurement, h_factor: float) -> np.ndarray:
    """Magnitude NL-means, `h = h_factor * sigma_img` -> float32 `[S, H, W]`."""
    return _per_slice(m, _nlm_2d, h_factor, complex_parts=False)


def nlm_complex(m: Measurement, h_factor: float) -> np.ndarray:
    """NL-means on the real and imaginary parts separately, then the magnitude -> float32 `[S, H, W]`."""
    return _per_slice(m, _nlm_2d, h_factor, complex_parts=True)


def bm3d(m: Measurement, sigma_factor: float) -> np.ndarray:
    """Magnitude BM3D with noise std `sigma_factor * sigma_img` -> float32 `[S, H, W]` (optional extra)."""
    _import_bm3d()
    return _per_slice(m, _bm3d_2d, sigma_factor, complex_parts=False)


def bm3d_complex(m: Measurement, sigma_factor: float) -> np.ndarray:
    """BM3D on the real and imaginary parts separately, then the magnitude (optional extra)."""
    _import_bm3d()
    return _per_slice(m, _bm3d_2d, sigma_factor, complex_parts=True)


# ----------------------------------------------------------------------------------------------------------
# model-based TV reconstruction with the forward operator


def gradient(x: Tensor) -> Tensor:
    """Forward differences of an image `[B, 1, H, W]` (real or complex) -> `[B, 2, H, W]` (vertical along H,
    horizontal along W); zero at the last row / column (Neumann boundary)."""
    g = x.new_zeros(x.shape[0], 2, *x.shape[-2:])
    g[:, 0, :-1] = x[:, 0, 1:] - x[:, 0, :-1]
    g[:, 1, :, :-1] = x[:, 0, :, 1:] - x[:, 0, :, :-1]
    return g


def gradient_adjoint(g: Tensor) -> Tensor:
    """Exact adjoint of `gradient` (minus the divergence): `[B, 2, H, W]` -> `[B, 1, H, W]`."""
    x = g.new_zeros(g.shape[0], 1, *g.shape[-2:])
    x[:, 0, :-1] -= g[:, 0, :-1]
    x[:, 0, 1:] += g[:, 0, :-1]
    x[:, 0, :, :-1] -= g[:, 1, :, :-1]
    x[:, 0, :, 1:] += g[:, 1, :, :-1]
    return x


def total_variation(x: Tensor) -> Tensor:
    """Isotropic TV of complex images `[B, 1, H, W]`: `sum_pixels sqrt(|dv x|^2 + |dh x|^2)` -> `[B]`."""
    return gradient(x).abs().pow(2).sum(1).sqrt().flatten(1).sum(1)


def tv_objective(x: Tensor, y: Tensor, operator: ForwardOperator, weight: Tensor) -> Tensor:
    """`1/2 ||A x - y||^2 + weight TV(x)` per slice -> `[B]` (x, y complex `[B,1,H,W]`, weight `[B]`)."""
    data = (operator.forward(x) - y).abs().pow(2).flatten(1).sum(1)
    return 0.5 * data + weight * total_variation(x)


def tv_reconstruct(y: Tensor, operator: ForwardOperator, weight: Tensor, x0: Tensor | None = None,
                   iterations: int = TV_MODEL_ITERATIONS, history: list[Tensor] | None = None) -> Tensor:
    """`argmin_x 1/2 ||A x - y||^2 + weight TV(x)` on complex images by PDHG (Chambolle & Pock 2011).

    Splitting: `K x = (A x, grad x)`, `F(u, v) = 1/2 ||u - y||^2 + weight ||v||_{2,1}`, `G = 0`; the dual
    steps are the closed-form proxes of F* (a shrink towards `-y` and a projection onto the pointwise complex
    ball of radius `weight`). Step sizes `tau = r / L`, `sigma = 1 / (r L)` (`r = PDHG_STEP_RATIO`) with
    `L^2 = 1.05 ||A||^2 + 8` (power iteration for A, the bound 8 for the gradient): `tau sigma ||K||^2 < 1`.

    Args:
        y: measured k-space, complex `[B, 1, H, W]`.
        operator: A for these B slices (`forward` / `adjoint` on complex `[B,1,H,W]`).
        weight: TV weight per slice `[B]` (units of the image; 0 gives least squares).
        x0: start image, complex `[B,1,H,W]` (default `A^H y`).
        iterations: PDHG iterations (fixed count).
        history: if a list, the objective `[B]` of each iterate is appended to it.

    Returns:
        the reconstruction, complex `[B, 1, H, W]` (the dtype of y).
    """
    weight = torch.as_tensor(weight, dtype=y.real.dtype, device=y.device).reshape(-1, 1, 1, 1)
    x = operator.adjoint(y) if x0 is None else x0.to(y.dtype).clone()
    lipschitz = torch.sqrt(1.05 * operator_norm_sq(operator, y) + 8.0).to(y.real.dtype)[:, None, None, None]
    tau, sigma = PDHG_STEP_RATIO / lipschitz, 1.0 / (PDHG_STEP_RATIO * lipschitz)
    p = torch.zeros_like(y)
    q = y.new_zeros(y.shape[0], 2, *y.shape[-2:])
    x_bar = x
    for _ in range(iterations):
        p = (p + sigma * (operator.forward(x_bar) - y)) / (1.0 + sigma)
        q = q + sigma * gradient(x_bar)
        q = q / torch.clamp(q.abs().pow(2).sum(1, keepdim=True).sqrt() / weight.clamp_min(1e-30), min=1.0)
        x_new = x - tau * (operator.adjoint(p) + gradient_adjoint(q))
        x_bar = 2.0 * x_new - x
        x = x_new
        if history is not None:
            history.append(tv_objective(x, y, operator, weight.flatten()))
    return x


def tv_model(m: Measurement, weight_factor: float, iterations: int = TV_MODEL_ITERATIONS,
             batch_size: int = TV_MODEL_BATCH) -> np.ndarray:
    """Model-based TV reconstruction with the measurement's operator, `weight = weight_factor * sigma_img`,
    started from the degraded image, batched over slices, on the measurement's device -> magnitude float32
    `[S, H, W]` (numpy)."""
    sigmas = torch.from_numpy(m.image_sigma).float().to(m.y.device)
    degraded = m.degraded
    out = []
    for start in range(0, len(m), batch_size):
        sl = slice(start, min(start + batch_size, len(m)))
        x = tv_reconstruct(m.y[sl], m.operator(sl), weight_factor * sigmas[sl], x0=degraded[sl],
                           iterations=iterations)
        out.append(x[:, 0].abs().cpu())
    return torch.cat(out).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Baseline:
    """A named baseline: `fn(measurement, **params) -> magnitude [S,H,W]`, its tuning grid and defaults.

    `extra`: the optional dependency group (`pip install 'lfmri[extra]'`) whose module `module` it needs.
    """

    name: str
    fn: Callable[..., np.ndarray]
    grid: Mapping[str, Sequence[float]] = field(default_factory=dict)
    defaults: Mapping[str, float] = field(default_factory=dict)
    extra: str | None = None
    module: str | None = None

    def __call__(self, m: Measurement, **params: float) -> np.ndarray:
        return self.fn(m, **{**self.defaults, **params})

    @property
    def available(self) -> bool:
        """Whether its optional module (if any) is installed."""
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def candidates(self) -> list[dict[str, float]]:
        """Every parameter combination of the grid (one empty dict when there is nothing to tune)."""
        keys = list(self.grid)
        grid = itertools.product(*(self.grid[k] for k in keys))
        return [dict(zip(keys, values, strict=True)) for values in grid]


_TV_GRID = {"weight_factor": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)}
_NLM_GRID = {"h_factor": (0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)}
_BM3D_GRID = {"sigma_factor": (1.0, 1.5, 2.0)}
#: CG-SENSE's Tikhonov factor (of sigma_img^2) and the CS weights (factors of sigma_img): on 8-coil Colin27
#: slices (ESPIRiT maps) the best were 100-300 / 0.25 (wavelet) / 0.125 (TV) at 4x and 30 dB, ~10 / 2 / 0.5 at
#: 2x and 4 dB; the defaults sit between
_CG_SENSE_GRID = {"lam_factor": (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)}
_CS_GRID = {"lam_factor": (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)}

#: name -> baseline; parameters are factors of each slice's image noise std (module docstring). Defaults:
#: the best grid points on two MNI152 axial slices (z = 50, 70; 197 x 233) in the noise and noise_blur
#: regimes at 2-7 dB (the same in both); SSIM prefers more smoothing than the noise std alone suggests
BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("degraded", degraded_baseline),
    Baseline("tv", tv, _TV_GRID, {"weight_factor": 1.0}),
    Baseline("nlm", nlm, _NLM_GRID, {"h_factor": 0.8}),
    Baseline("tv_complex", tv_complex, _TV_GRID, {"weight_factor": 2.0}),
    Baseline("nlm_complex", nlm_complex, _NLM_GRID, {"h_factor": 1.3}),
    Baseline("bm3d", bm3d, _BM3D_GRID, {"sigma_factor": 1.0}, extra="bm3d", module="bm3d"),
    Baseline("bm3d_complex", bm3d_complex, _BM3D_GRID, {"sigma_factor": 1.5}, extra="bm3d", module="bm3d"),
    Baseline("tv_model", tv_model, {"weight_factor": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)}, {"weight_factor": 1.5}),
    Baseline("zero_filled_rss", zero_filled_rss),
    Baseline("cg_sense", cg_sense, _CG_SENSE_GRID, {"lam_factor": 100.0}),
    Baseline("l1_wavelet", l1_wavelet, _CS_GRID, {"lam_factor": 0.5}),
    Baseline("tv_cs", tv_cs, _CS_GRID, {"lam_factor": 0.25}),
)}


def available_baselines() -> list[str]:
    """Names of the baselines whose optional dependencies are installed, in registry order."""
    return [name for name, b in BASELINES.items() if b.available]


def parse_baselines(spec: str) -> list[str]:
    """`all` (the installed ones) | `none` | comma-separated names -> baseline names; `degraded` first.

    Raises ValueError (one line) naming an unknown baseline and the valid ones, or a named baseline whose
    optional extra is not installed.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return available_baselines()
    names = [] if spec == "none" else list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        valid = ", ".join(("all", "none", *BASELINES))
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {valid}")
    missing = [n for n in names if not BASELINES[n].available]
    if missing:
        extra = BASELINES[missing[0]].extra
        raise ValueError(f"baseline(s) {', '.join(missing)} need the optional package '{extra}' (free for "
                         f"non-commercial use only): pip install 'lfmri[{extra}]'")
    return ["degraded"] + [n for n in names if n != "degraded"]


@dataclass
class TuningResult:
    """The parameters chosen for one baseline and regime, the mean SSIM they reached and the volumes seen
    (their ids)."""

    params: dict[str, float]
    score: float
    volume_ids: list[str]
    scores: list[tuple[dict[str, float], float]] = field(default_factory=list)

    def to_jsonable(self) -> dict[str, Any]:
        return {"params": self.params, "val_ssim": self.score, "volume_ids": self.volume_ids}


def tune_baseline(
    baseline: Baseline,
    volumes: Mapping[str, tuple[Measurement, np.ndarray]],
    metric: VolumeMetric,
) -> TuningResult:
    """Grid search for one baseline: maximise the volumes' mean `metric(baseline(measurement), reference)`.

    `volumes` maps volume id -> (measurement of S slices, reference magnitude [S,H,W]); pass validation
    volumes only. Ties keep the first grid point. Without a grid: the defaults, scored once.
    """
    if not volumes:
        raise ValueError(f"no volumes to tune baseline {baseline.name!r} on")
    scores = []
    for params in baseline.candidates():
        values = [metric(baseline(m, **params), ref) for m, ref in volumes.values()]
        scores.append(({**baseline.defaults, **params}, float(np.mean(values))))
    best_params, best = max(scores, key=lambda item: item[1])
    return TuningResult(params=best_params, score=best, volume_ids=list(volumes), scores=scores)


def tune_baselines(
    names: Sequence[str],
    volumes_by_regime: Mapping[str, Mapping[str, tuple[Measurement, np.ndarray]]],
    metric: VolumeMetric,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, TuningResult]]:
    """Tune each named baseline once per regime -> {regime: {name: TuningResult}}.

    `volumes_by_regime[regime]` maps a (validation) volume id to its (measurement, reference magnitude).
    `progress(message)` is called after each baseline x regime is tuned.
    """
    results: dict[str, dict[str, TuningResult]] = {}
    for regime, volumes in volumes_by_regime.items():
        results[regime] = {}
        for name in names:
            results[regime][name] = tune_baseline(BASELINES[name], volumes, metric)
            if progress is not None:
                progress(f"{name} on {regime}")
    return results
