"""The paper's evaluation protocol and its outputs (results.csv, results.md, results.json, figure.png).

Protocol (`run_evaluation`): for every test subject of the data module and every regime, deterministic
degradations (a pure function of subject, slice, regime and seed, as the data module draws them),
reconstruction by a sampler with k-space data consistency, the classical baselines on the same degraded
magnitude images (their parameters tuned once per regime on the data module's *validation* subjects), and
fastMRI metrics on magnitude volumes in normalised units (data range = the reference volume's max) per
subject x regime x method; then mean ± std across subjects (sample std, ddof=1; 0 for a single subject).

Everything is written atomically (`write_results`): files go to a temporary folder beside `--out` and are
moved in with `os.replace` only once all of them exist, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from datamodules.errors import InputError
from datamodules.io import usual_permissions
from lfmri.baselines import BASELINES, TuningResult, tune_baselines

if TYPE_CHECKING:
    from lightning_modules.module import ScoreModel
    from lightning_modules.samplers import Sampler

#: the columns of results.csv, in order; nmse is a fraction (results.md shows it in %)
CSV_COLUMNS = ("subject", "regime", "method", "ssim", "psnr", "nmse", "n_slices")
#: the name of our own method in the results
LFMRI = "lfmri"


@dataclass(frozen=True)
class ResultRow:
    """Metrics of one method on one subject's volume under one regime (nmse as a fraction, psnr in dB)."""

    subject: str
    regime: str
    method: str
    ssim: float
    psnr: float
    nmse: float
    n_slices: int


@dataclass
class EvaluationResult:
    """All that `write_results` writes: rows, tuned baseline parameters, figure panels and the settings used.

    `panels[regime][column]` is a 2D magnitude image [H, W]; columns: degraded, each baseline, lfmri,
    reference.
    """

    rows: list[ResultRow]
    tuning: dict[str, dict[str, TuningResult]] = field(default_factory=dict)
    panels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def regime_label(regime: str) -> str:
    """`noise_blur_t2star_b0` -> `noise + blur + T2* + B0` (the paper's row names)."""
    names = {"t2star": "T2*", "b0": "B0"}
    return " + ".join(names.get(part, part) for part in regime.split("_"))


def _ordered(values: Sequence[str], first: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def summarise(rows: Sequence[ResultRow]) -> dict[str, dict[str, dict[str, tuple[float, float, int]]]]:
    """{method: {regime: {metric: (mean, std, n_subjects)}}}; std across subjects, ddof=1 (0 when n = 1)."""
    out: dict[str, dict[str, dict[str, tuple[float, float, int]]]] = {}
    methods = _ordered([r.method for r in rows])
    regimes = _ordered([r.regime for r in rows])
    for method in methods:
        for regime in regimes:
            sel = [r for r in rows if r.method == method and r.regime == regime]
            if not sel:
                continue
            stats = {}
            for metric in ("ssim", "psnr", "nmse"):
                values = np.array([getattr(r, metric) for r in sel], dtype=np.float64)
                std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                stats[metric] = (float(values.mean()), std, len(values))
            out.setdefault(method, {})[regime] = stats
    return out


def _format_params(params: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "none"


def format_markdown(result: EvaluationResult) -> str:
    """The mean ± std table in the paper's format, one block per method (baselines first, lfmri last)."""
    summary = summarise(result.rows)
    settings = result.settings
    lines = ["# lfmri evaluation", ""]
    n_subjects = len({r.subject for r in result.rows})
    lines.append(f"Test subjects: {n_subjects}; mean ± std across subjects; metrics on magnitude volumes in "
                 "normalised units, data range = reference volume max (fastMRI definitions).")
    if settings:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    methods = _ordered(list(summary), first=[m for m in ("degraded", "tv", "nlm") if m in summary])
    methods = [m for m in methods if m != LFMRI] + ([LFMRI] if LFMRI in summary else [])
    for method in methods:
        lines += ["", f"## {method}", "", "| regime | SSIM | PSNR (dB) | NMSE (%) |", "|---|---|---|---|"]
        for regime, stats in summary[method].items():
            (s, s_sd, _), (p, p_sd, _), (n, n_sd, _) = stats["ssim"], stats["psnr"], stats["nmse"]
            lines.append(f"| {regime_label(regime)} | {s:.3f} ± {s_sd:.3f} | {p:.2f} ± {p_sd:.2f} | "
                         f"{100 * n:.2f} ± {100 * n_sd:.2f} |")
        tuned = {regime: per[method] for regime, per in result.tuning.items() if method in per}
        if tuned and any(t.params for t in tuned.values()):
            subjects = sorted({s for t in tuned.values() for s in t.subjects})
            lines += ["", f"Parameters tuned on validation subjects ({', '.join(subjects)}), "
                      "maximising mean SSIM:", ""]
            lines += [f"- {regime_label(regime)}: {_format_params(t.params)} (val SSIM {t.score:.3f})"
                      for regime, t in tuned.items()]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[ResultRow], path: str | os.PathLike) -> None:
    """results.csv: one row per subject x regime x method, columns `CSV_COLUMNS`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.subject, r.regime, r.method, f"{r.ssim:.6f}", f"{r.psnr:.6f}", f"{r.nmse:.8f}",
                             r.n_slices])


def read_csv(path: str | os.PathLike) -> list[ResultRow]:
    """Read back a results.csv written by `write_csv`."""
    with open(path, newline="") as fh:
        return [ResultRow(d["subject"], d["regime"], d["method"], float(d["ssim"]), float(d["psnr"]),
                          float(d["nmse"]), int(d["n_slices"])) for d in csv.DictReader(fh)]


def write_json(result: EvaluationResult, path: str | os.PathLike) -> None:
    """results.json: settings, tuned baseline parameters (and the validation subjects seen), rows, summary."""
    payload = {
        "settings": result.settings,
        "tuned_baselines": {regime: {m: t.to_jsonable() for m, t in per.items()}
                            for regime, per in result.tuning.items()},
        "rows": [asdict(r) for r in result.rows],
        "summary": {m: {g: {k: {"mean": v[0], "std": v[1], "n_subjects": v[2]} for k, v in stats.items()}
                        for g, stats in per.items()} for m, per in summarise(result.rows).items()},
    }
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, allow_nan=True)


def write_figure(panels: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike) -> None:
    """figure.png: rows = regimes; columns = the panels' images then |lfmri - reference|.

    Magnitudes share one grey scale per row (0 to the reference's max); the error map has its own scale.
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend is left alone

    regimes = list(panels)
    columns = list(panels[regimes[0]]) if regimes else []
    has_error = LFMRI in columns and "reference" in columns
    n_cols = len(columns) + int(has_error)
    fig = Figure(figsize=(2.2 * n_cols, 2.3 * len(regimes)))
    axes = fig.subplots(len(regimes), n_cols, squeeze=False)
    for i, regime in enumerate(regimes):
        row = panels[regime]
        vmax = float(np.max(row["reference"])) if "reference" in row else None
        for j, col in enumerate(columns):
            axes[i, j].imshow(row[col], cmap="gray", vmin=0.0, vmax=vmax)
            if i == 0:
                axes[i, j].set_title(col, fontsize=9)
        if has_error:
            err = np.abs(row[LFMRI] - row["reference"])
            axes[i, -1].imshow(err, cmap="magma", vmin=0.0, vmax=float(np.percentile(err, 99.5)) or None)
            if i == 0:
                axes[i, -1].set_title(f"|{LFMRI} - reference|", fontsize=9)
        axes[i, 0].set_ylabel(regime_label(regime), fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_files_atomically(out_dir: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Call every `writer(path)` into a temporary folder beside `out_dir`, then move the files into `out_dir`.

    If any writer fails, `out_dir` is left as it was (not created when it did not exist). An existing
    `out_dir` gets the new files one `os.replace` each (each file whole, old or new).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    usual_permissions(tmp, 0o777)
    try:
        for name, writer in writers.items():
            writer(tmp / name)
        if not out.exists():
            os.replace(tmp, out)
            return
        for name in writers:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_results(result: EvaluationResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write results.csv, .md, .json and figure.png into `out_dir` atomically; returns the paths."""
    writers: dict[str, Callable[[Path], None]] = {
        "results.csv": lambda p: write_csv(result.rows, p),
        "results.md": lambda p: p.write_text(format_markdown(result)),
        "results.json": lambda p: write_json(result, p),
    }
    if result.panels:
        writers["figure.png"] = lambda p: write_figure(result.panels, p)
    write_files_atomically(out_dir, writers)
    return [Path(out_dir) / name for name in writers]


# ----------------------------------------------------------------------------------------------------
# model, device and data module loading (shared by `lfmri evaluate` and `lfmri reconstruct`)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cpu` / `cuda` (InputError when CUDA is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device: unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return torch.device(name)


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """The dict of an lfmri `ScoreModel` Lightning checkpoint, read once on the CPU.

    Raises InputError (one line naming the file) for a missing file or anything that is not one of our
    checkpoints (e.g. a score_sde checkpoint, which is imported through `model.pretrained` instead).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        # never weights_only=False: unpickling arbitrary objects would run a crafted file's code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                         "containers (not an lfmri checkpoint; loading it could run code)") from err
    except Exception as err:  # torch raises many types for a non-checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({reason})") from err
    if isinstance(ckpt, dict) and {"model", "ema"} <= set(ckpt):
        raise InputError(f"{path}: a score_sde checkpoint, not an lfmri (Lightning) one; fine-tune from it "
                         "(model.init_args.pretrained in a config) and pass the Lightning checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    if "ema" not in ckpt or not any(k.startswith("net.") for k in ckpt["state_dict"]):
        raise InputError(f"{path}: not a ScoreModel checkpoint (no 'ema' or no 'net.*' weights)")
    return ckpt


def score_model_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> ScoreModel:
    """A `ScoreModel` (CPU) with the weights and EMA of a checkpoint dict from `read_lightning_checkpoint`."""
    from lightning_modules.module import ScoreModel

    accepted = inspect.signature(ScoreModel.__init__).parameters
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in accepted}
    try:
        model = ScoreModel(**hparams)
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"{path}: checkpoint does not fit its ScoreModel hyperparameters ({first})") from err
    return model


def load_score_model(path: str | os.PathLike, device: torch.device) -> ScoreModel:
    """Load an lfmri `ScoreModel` Lightning checkpoint onto `device` (eval mode; samplers use its EMA);
    reconstruction needs a 2-channel (real, imaginary) network. Bad files -> InputError."""
    model = score_model_from_checkpoint(read_lightning_checkpoint(path), path)
    if int(model.hparams.num_channels) != 2:
        raise InputError(f"--ckpt {path}: the network has {model.hparams.num_channels} channel(s); "
                         "reconstruction needs a 2-channel (real, imaginary) model")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# the protocol


def _magnitude(x: torch.Tensor) -> np.ndarray:
    """float [S,2,H,W] (real, imag) -> magnitude numpy [S,H,W]."""
    return torch.sqrt(x[:, 0].double() ** 2 + x[:, 1].double() ** 2).float().cpu().numpy()


def _volume_metrics(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    from lightning_modules.metrics import nmse_volume, psnr_volume, ssim_volume

    return ssim_volume(pred, ref), psnr_volume(pred, ref), nmse_volume(pred, ref)


def _tuning_metric(pred: np.ndarray, ref: np.ndarray) -> float:
    from lightning_modules.metrics import ssim_volume

    return ssim_volume(pred, ref)


def collect_split(datamodule: Any, split: str, regime: str) -> list[Any]:
    """A split's whole volumes under a regime (`EvalVolume`s: clean, degraded, y, params)."""
    return list(datamodule.volumes(split, regime))


def tune_on_validation(datamodule: Any, regimes: Sequence[str], names: Sequence[str],
                       ) -> dict[str, dict[str, TuningResult]]:
    """Tune the named baselines once per regime on the data module's VALIDATION volumes (never test)."""
    names = [n for n in names if BASELINES[n].grid]
    if not names:
        return {}
    volumes_by_regime = {}
    for regime in regimes:
        vols = collect_split(datamodule, "val", regime)
        if not vols:
            raise InputError("the data module has no validation subjects to tune the baselines on; "
                             "give it some (e.g. val_fraction / split_file) or pass --baselines none")
        volumes_by_regime[regime] = {v.subject: (_magnitude(v.degraded), _magnitude(v.clean)) for v in vols}
    bar = tqdm(total=len(regimes) * len(names), desc="tune baselines (val)", unit="fit", file=sys.stderr)
    with bar:
        return tune_baselines(names, volumes_by_regime, _tuning_metric,
                              progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))


def run_evaluation(model: ScoreModel, datamodule: Any, regimes: Sequence[str], baselines: Sequence[str],
                   sampler: Sampler, samples: int = 1, batch_size: int = 8, seed: int = 0,
                   device: torch.device | str = "cpu", settings: Mapping[str, Any] | None = None,
                   ) -> EvaluationResult:
    """The paper's protocol on the data module's test subjects (see the module docstring).

    `baselines`: names from `lfmri.baselines.BASELINES` (tuned on validation first). Reconstruction is the
    one inference path (`lightning_modules.inference.Reconstructor`) at the slices' native matrix, with the
    simulation's known noise level. The figure shows the middle slice of the first test subject per regime.
    """
    from degradations import make_regime
    from lightning_modules.inference import Reconstructor

    device = torch.device(device)
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in (getattr(datamodule, "regime_overrides", None) or {}).items()}
    score_fn = model.score_fn()  # one frozen copy of the EMA network for the whole protocol
    tuning = tune_on_validation(datamodule, regimes, baselines)
    rows: list[ResultRow] = []
    panels: dict[str, dict[str, np.ndarray]] = {}
    for regime in regimes:
        degradation = make_regime(regime, **overrides)
        vols = collect_split(datamodule, "test", regime)
        if not vols:
            raise InputError("the data module has no test subjects")
        for vol in tqdm(vols, desc=f"evaluate {regime}", unit="subject", file=sys.stderr):
            ref, deg = _magnitude(vol.clean), _magnitude(vol.degraded)
            outputs = {}
            for name in baselines:
                params = tuning[regime][name].params if name in tuning.get(regime, {}) else {}
                outputs[name] = BASELINES[name](deg, **params)
            reconstruct = Reconstructor.for_degradation(score_fn, sampler, degradation, batch_size, device,
                                                        progress=f"{vol.subject} {regime}")
            result = reconstruct(vol.degraded, vol.y, vol.params, vol.slices.tolist(), seed, samples)
            outputs[LFMRI] = result.mean[:, 0].numpy()
            for method, pred in outputs.items():
                ssim, psnr, nmse = _volume_metrics(pred, ref)
                rows.append(ResultRow(vol.subject, regime, method, ssim, psnr, nmse, int(ref.shape[0])))
            if regime not in panels:
                mid = ref.shape[0] // 2
                panels[regime] = {**{m: outputs[m][mid] for m in baselines}, LFMRI: outputs[LFMRI][mid],
                                  "reference": ref[mid]}
    return EvaluationResult(rows=rows, tuning=tuning, panels=panels, settings=dict(settings or {}))
