"""Classical baselines on the same degraded magnitude images as lfmri, and their tuning on validation data.

Every baseline maps a magnitude volume `[S, H, W]` (float, normalised units) to a volume of the same shape,
slice by slice:

- `degraded`: the degraded input itself (identity, no parameters);
- `tv`: total-variation denoising, scikit-image's `denoise_tv_chambolle`, `weight = weight_factor * sigma`;
- `nlm`: non-local means, scikit-image's `denoise_nl_means` (fast mode, 5x5 patches, 13x13 search window) with
  `h = h_factor * sigma`.

`sigma` is each slice's noise std, estimated by `estimate_noise_sigma` (Immerkaer's Laplacian-difference
estimator; scikit-image's `estimate_sigma` would need PyWavelets, which we do not depend on). Scaling both
parameters by the slice's own noise level lets one tuned factor serve slices degraded at different SNRs.

`tune_baseline` chooses a baseline's parameters by grid search, maximising the mean SSIM across the subjects
it is given; callers pass validation subjects only (`tune_baselines` records which subjects it saw).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

#: a volume metric, `metric(pred [S,H,W], ref [S,H,W]) -> float` (higher is better for tuning)
VolumeMetric = Callable[[np.ndarray, np.ndarray], float]


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Std of additive white noise in a 2D image [H, W] (same units), Immerkaer (1996):

    sigma = sqrt(pi / 2) * mean |image * L| / 6 over the interior, L the difference of two Laplacians, which
    cancels smooth structure. Accurate to a few percent for Gaussian noise on MR images.
    """
    # L = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] is separable: a second difference along each axis
    residual = np.diff(np.diff(np.asarray(image, np.float64), n=2, axis=0), n=2, axis=1)
    return float(np.sqrt(np.pi / 2.0) * np.abs(residual).mean() / 6.0)


def _identity(volume: np.ndarray) -> np.ndarray:
    return np.asarray(volume, dtype=np.float32).copy()


def _tv_slice(image: np.ndarray, weight_factor: float) -> np.ndarray:
    sigma = estimate_noise_sigma(image)
    if sigma <= 0.0:
        return image
    return denoise_tv_chambolle(image, weight=weight_factor * sigma)


def _tv(volume: np.ndarray, weight_factor: float) -> np.ndarray:
    return np.stack([_tv_slice(s, weight_factor) for s in np.asarray(volume, np.float64)]).astype(np.float32)


def _nlm_slice(image: np.ndarray, h_factor: float) -> np.ndarray:
    sigma = estimate_noise_sigma(image)
    if sigma <= 0.0:
        return image
    return denoise_nl_means(
        image, h=h_factor * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6
    )


def _nlm(volume: np.ndarray, h_factor: float) -> np.ndarray:
    return np.stack([_nlm_slice(s, h_factor) for s in np.asarray(volume, np.float64)]).astype(np.float32)


@dataclass(frozen=True)
class Baseline:
    """A named baseline: `fn(volume [S,H,W], **params) -> volume [S,H,W]` and its tuning grid."""

    name: str
    fn: Callable[..., np.ndarray]
    grid: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def __call__(self, volume: np.ndarray, **params: float) -> np.ndarray:
        return self.fn(volume, **params)

    def candidates(self) -> list[dict[str, float]]:
        """Every parameter combination of the grid (one empty dict when there is nothing to tune)."""
        keys = list(self.grid)
        grid = itertools.product(*(self.grid[k] for k in keys))
        return [dict(zip(keys, values, strict=True)) for values in grid]


#: name -> baseline; parameters are factors of each slice's estimated noise std
BASELINES: dict[str, Baseline] = {
    "degraded": Baseline("degraded", _identity),
    "tv": Baseline("tv", _tv, {"weight_factor": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)}),
    "nlm": Baseline("nlm", _nlm, {"h_factor": (0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3)}),
}


def parse_baselines(spec: str) -> list[str]:
    """`all` | `none` | comma-separated names -> baseline names; `degraded` is always included first.

    Raises ValueError naming an unknown baseline and the valid ones.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(BASELINES)
    names = [] if spec == "none" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        valid = ", ".join(("all", "none", *BASELINES))
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {valid}")
    return ["degraded"] + [n for n in names if n != "degraded"]


@dataclass
class TuningResult:
    """The parameters chosen for one baseline and regime, the mean SSIM they reached and the subjects seen."""

    params: dict[str, float]
    score: float
    subjects: list[str]
    scores: list[tuple[dict[str, float], float]] = field(default_factory=list)

    def to_jsonable(self) -> dict[str, Any]:
        return {"params": self.params, "val_ssim": self.score, "subjects": self.subjects}


def tune_baseline(
    baseline: Baseline,
    volumes: Mapping[str, tuple[np.ndarray, np.ndarray]],
    metric: VolumeMetric,
) -> TuningResult:
    """Grid search for one baseline: maximise the subjects' mean `metric(baseline(degraded), reference)`.

    `volumes` maps subject -> (degraded magnitude [S,H,W], reference magnitude [S,H,W]); pass validation
    subjects only. Ties keep the first grid point.
    """
    if not volumes:
        raise ValueError(f"no volumes to tune baseline {baseline.name!r} on")
    scores = []
    for params in baseline.candidates():
        values = [metric(baseline(deg, **params), ref) for deg, ref in volumes.values()]
        scores.append((params, float(np.mean(values))))
    best_params, best = max(scores, key=lambda item: item[1])
    return TuningResult(params=best_params, score=best, subjects=list(volumes), scores=scores)


def tune_baselines(
    names: Sequence[str],
    volumes_by_regime: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    metric: VolumeMetric,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, TuningResult]]:
    """Tune each named baseline once per regime -> {regime: {name: TuningResult}}.

    `volumes_by_regime[regime]` maps a (validation) subject to its (degraded, reference) magnitude volumes.
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
