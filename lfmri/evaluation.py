"""The paper's evaluation protocol (its outputs and their files: `lfmri.results`).

Protocol (`run_evaluation`): for every test volume of the data module and every regime, deterministic
degradations (a pure function of volume id, slice, regime and seed, as the data module draws them),
reconstruction by a sampler with k-space data consistency, the classical baselines (`lfmri.baselines`) on the
same measurements (both take the volume's `degradations.Measurement`: k-space y, the operator of the realised
parameters and the simulation's recorded noise std; the baselines' parameters tuned once per regime on the
data module's *validation* subjects, on their slices with signal: `TUNING_MIN_FOREGROUND`), and fastMRI
metrics on magnitude volumes in normalised units (data range = the reference volume's max) per volume x regime
x method; then mean ± std across the test volumes (one per subject unless a subject has several; sample std,
ddof=1). With a single test volume the spread is over its slices instead (per-slice metrics with the volume's
data range, `lfmri_utils.metrics.slice_metrics`; slices.csv), and the tables say so. Each row also
records the method's wall-clock seconds per slice: the image denoisers on the CPU, `tv_model` and lfmri on the
evaluation's device (torch's CPU threads on a CPU). Besides the default sampler (`lfmri`), further named
sampler configurations can be scored on the same slices and seeds (e.g. `lfmri_pc`, the paper's reference
predictor-corrector with gradient DC w = 0.3).

The result is written by `lfmri.results.write_results`, atomically: all the old files or all the new ones.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from datamodules.transforms import foreground_fractions
from degradations import LowFieldDegradation, Measurement, make_regime
from diffusion.inference import Reconstructor
from diffusion.sampling.samplers import Sampler
from lfmri.baselines import BASELINES, TuningResult, tune_baselines
from lfmri.results import LFMRI, EvaluationResult, ResultRow, SliceRow
from lfmri_utils.errors import InputError
from lfmri_utils.metrics import region_metrics, slice_metrics, ssim_volume
from lightning_modules.metric_classes import volume_metrics
from lightning_modules.module import ScoreModel

#: a validation slice tunes the baselines only when it has signal: at least this fraction of its pixels is
#: object (clean magnitude above 0.1 of the volume's scale, the data module's foreground rule). The slices the
#: data module keeps (`min_foreground_fraction`, 5 % by default) always pass; empty ones come in only when a
#: config keeps every slice (`min_foreground_fraction: 0`). An edge slice of a head (5 % object) is kept: the
#: test picks include such slices too, and there the background's noise, not the anatomy, decides the SSIM
#: (one slice per volume of the bundled validation subjects: TV's val SSIM 0.047 on 5 %-object slices)
TUNING_MIN_FOREGROUND = 0.01


def _magnitude(x: torch.Tensor) -> np.ndarray:
    """float [S,2,H,W] (real, imag) -> magnitude numpy [S,H,W]."""
    return torch.sqrt(x[:, 0].double() ** 2 + x[:, 1].double() ** 2).float().cpu().numpy()


def measurement(vol: Any, degradation: LowFieldDegradation, keep: np.ndarray | None = None) -> Measurement:
    """The `Measurement` of an `EvalVolume` simulated by the regime `degradation` (y, its operator evaluating
    B0 as the regime does, the recorded noise std: `Measurement.simulated`), what both the baselines and the
    reconstruction take; `keep`: a boolean mask of the slices to take (default: all). With the data
    module's `regime_overrides` `acceleration` / `coils`, y is `[S, C, H, W]` and the params hold the
    realised `mask` and `sensitivities` (every params value is indexed by slice, those too)."""
    y, params = vol.y, vol.params
    if keep is not None:
        index = torch.from_numpy(keep)
        y, params = y[index], {k: v[index] for k, v in params.items()}
    return Measurement.simulated(y, params, degradation)


def run_baseline(name: str, m: Measurement, params: Mapping[str, float] | None = None,
                 ) -> tuple[np.ndarray, float]:
    """(magnitude [S,H,W], wall-clock seconds per slice) of the baseline `name` on a measurement."""
    start = time.perf_counter()
    pred = BASELINES[name](m, **(params or {}))
    return pred, (time.perf_counter() - start) / max(len(m), 1)


def _volume_metrics(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(SSIM, PSNR, NMSE) of one volume, as the validation callback's torchmetrics Metrics score a volume."""
    values = volume_metrics(pred, ref)
    return values["ssim"], values["psnr"], values["nmse"]


def _tuning_metric(pred: np.ndarray, ref: np.ndarray) -> float:
    return ssim_volume(pred, ref)


def collect_split(datamodule: Any, split: str, regime: str) -> list[Any]:
    """A split's whole volumes under a regime (`EvalVolume`s: clean, degraded, y, params)."""
    return list(datamodule.volumes(split, regime))


def _regime_overrides(datamodule: Any) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in (getattr(datamodule, "regime_overrides", None) or {}).items()}


def _why_empty(datamodule: Any, split: str) -> str:
    """Why the data module gives no volume of `split`, where it can say (`empty_split_reason`: no subjects,
    or the files skipped and why)."""
    explain = getattr(datamodule, "empty_split_reason", None)
    return explain(split) if explain is not None else f"the data module has no {split} volumes"


def tuning_slices(references: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{volume id: boolean mask of its slices with signal (`TUNING_MIN_FOREGROUND`)} of the validation
    volumes that have any, from their clean magnitudes `references` {volume id: [S, H, W]}; InputError when
    none has."""
    # the clean slices are in units of their volume's scale: the data module's rule is |x| > 0.1
    fractions = {vid: foreground_fractions(ref, 1.0) for vid, ref in references.items()}
    masks = {vid: f >= TUNING_MIN_FOREGROUND for vid, f in fractions.items()}
    masks = {vid: mask for vid, mask in masks.items() if mask.any()}
    if not masks:
        n_slices, most = sum(map(len, fractions.values())), max(f.max() for f in fractions.values())
        raise InputError(
            f"no validation slice has signal to tune the baselines on: the {n_slices} slice(s) of "
            f"{', '.join(fractions)} are at most {most:.1%} object, tuning needs "
            f"{TUNING_MIN_FOREGROUND:.0%}; keep slices with signal (min_foreground_fraction) or pass "
            "--baselines none")
    return masks


def tune_on_validation(datamodule: Any, regimes: Sequence[str], names: Sequence[str],
                       device: torch.device | str = "cpu") -> dict[str, dict[str, TuningResult]]:
    """Tune the named baselines once per regime on the data module's VALIDATION volumes (never test), on
    their slices with signal (`tuning_slices`); `device`: where the torch baselines (`tv_model`) compute."""
    names = [n for n in names if BASELINES[n].grid]
    if not names:
        return {}
    volumes_by_regime = {}
    for regime in regimes:
        degradation = make_regime(regime, **_regime_overrides(datamodule))
        vols = collect_split(datamodule, "val", regime)
        if not vols:
            raise InputError(f"{_why_empty(datamodule, 'val')}: nothing to tune the baselines on; give the "
                             "data module validation subjects (e.g. val_fraction / split_file) or pass "
                             "--baselines none")
        references = {v.volume_id: _magnitude(v.clean) for v in vols}
        masks = tuning_slices(references)
        volumes_by_regime[regime] = {
            v.volume_id: (measurement(v, degradation, masks[v.volume_id]).to(device),
                          references[v.volume_id][masks[v.volume_id]]) for v in vols if v.volume_id in masks}
    bar = tqdm(total=len(regimes) * len(names), desc="tune baselines (val)", unit="fit", file=sys.stderr)
    with bar:
        return tune_baselines(names, volumes_by_regime, _tuning_metric,
                              progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))


def run_evaluation(model: ScoreModel, datamodule: Any, regimes: Sequence[str], baselines: Sequence[str],
                   sampler: Sampler, samples: int = 1, batch_size: int = 8, seed: int = 0,
                   device: torch.device | str = "cpu", settings: Mapping[str, Any] | None = None,
                   other_samplers: Mapping[str, tuple[Sampler, int]] | None = None) -> EvaluationResult:
    """The paper's protocol on the data module's test subjects (see the module docstring).

    `baselines`: names from `lfmri.baselines.BASELINES` (tuned on validation first; a baseline without a grid
    runs with its defaults), each run on the volume's `Measurement`. Reconstruction is the
    one inference path (`diffusion.inference.Reconstructor`) at the slices' native matrix, with the
    simulation's known noise level: `sampler` is the method `lfmri` (the mean of `samples` per slice);
    `other_samplers` (method name, e.g. `lfmri_pc` -> (sampler, K samples)) are scored on the same slices with
    the same seeds. The figure shows the middle
    slice of the first test volume per regime.
    """
    device = torch.device(device)
    overrides = _regime_overrides(datamodule)
    score_fn = model.score_fn()  # one frozen copy of the EMA network for the whole protocol
    tuning = tune_on_validation(datamodule, regimes, baselines, device)
    ours = {LFMRI: (sampler, samples), **(other_samplers or {})}
    rows: list[ResultRow] = []
    slice_rows: list[SliceRow] = []
    regions: dict[str, dict[str, list[dict[str, float]]]] = {}
    panels: dict[str, dict[str, np.ndarray]] = {}
    for regime in regimes:
        degradation = make_regime(regime, **overrides)
        vols = collect_split(datamodule, "test", regime)
        if not vols:
            raise InputError(_why_empty(datamodule, "test"))
        for vol in tqdm(vols, desc=f"evaluate {regime}", unit="volume", file=sys.stderr):
            ref, m = _magnitude(vol.clean), measurement(vol, degradation).to(device)
            outputs, seconds = {}, {}
            for name in baselines:
                params = tuning[regime][name].params if name in tuning.get(regime, {}) else {}
                outputs[name], seconds[name] = run_baseline(name, m, params)
            for method, (method_sampler, k) in ours.items():
                reconstruct = Reconstructor(
                    score_fn, method_sampler, batch_size, device,
                    progress=f"{vol.volume_id} {regime} {method}", data_scale=model.data_scale)
                start = time.perf_counter()
                result = reconstruct(m, vol.degraded, vol.slices.tolist(), seed, k)
                seconds[method] = (time.perf_counter() - start) / max(len(m), 1)
                outputs[method] = result.mean[:, 0].numpy()
            for method, pred in outputs.items():
                regions.setdefault(method, {}).setdefault(regime, []).append(region_metrics(pred, ref))
                ssim, psnr, nmse = _volume_metrics(pred, ref)
                rows.append(ResultRow(vol.volume_id, regime, method, ssim, psnr, nmse, int(ref.shape[0]),
                                      seconds[method]))
                per_slice = slice_metrics(pred, ref)
                slice_rows += [SliceRow(vol.volume_id, regime, method, int(index),
                                        *(float(per_slice[k][i]) for k in ("ssim", "psnr", "nmse")))
                               for i, index in enumerate(vol.slices.tolist())]
            if regime not in panels:
                mid = ref.shape[0] // 2
                panels[regime] = {**{n: outputs[n][mid] for n in outputs}, "reference": ref[mid]}
    mean_regions = {method: {regime: {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                             for regime, values in per.items()} for method, per in regions.items()}
    return EvaluationResult(rows=rows, slice_rows=slice_rows, tuning=tuning, panels=panels,
                            settings=dict(settings or {}), regions=mean_regions)
