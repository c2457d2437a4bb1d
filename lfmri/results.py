"""The results of an evaluation and their files: rows (one per test volume x regime x method), summaries
(mean ± std across test volumes, or over one volume's slices), the markdown tables, results.csv /
slices.csv / results.json, figure.png, and their atomic writing (`write_results`: all the old files or all
the new ones). The protocol that produces them is `lfmri.evaluation`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from degradations import regime_label
from lfmri.baselines import BASELINES, TuningResult
from lfmri_utils.files import atomic_dir

#: the columns of results.csv, in order; nmse is a fraction (results.md shows it in %)
CSV_COLUMNS = ("volume_id", "regime", "method", "ssim", "psnr", "nmse", "n_slices", "seconds_per_slice")
#: the columns of slices.csv (per-slice metrics, the volume's data range)
SLICE_COLUMNS = ("volume_id", "regime", "method", "slice", "ssim", "psnr", "nmse")
#: the summarised columns (mean ± std across test volumes)
SUMMARY_METRICS = ("ssim", "psnr", "nmse", "seconds_per_slice")
#: the name of our own method in the results
LFMRI = "lfmri"


@dataclass(frozen=True)
class ResultRow:
    """Metrics of one method on one volume (`volume_id`: `datamodules.sources.VolumeRecord.volume_id`, the
    subject id unless the subject has several volumes) under one regime (nmse as a fraction, psnr in dB) and
    its wall-clock seconds per slice (NaN: not recorded)."""

    volume_id: str
    regime: str
    method: str
    ssim: float
    psnr: float
    nmse: float
    n_slices: int
    seconds_per_slice: float = math.nan


@dataclass(frozen=True)
class SliceRow:
    """Metrics of one method on one slice (index `slice` in its volume) with the volume's data range."""

    volume_id: str
    regime: str
    method: str
    slice: int
    ssim: float
    psnr: float
    nmse: float


@dataclass
class EvaluationResult:
    """All that `write_results` writes: rows, tuned baseline parameters, figure panels and the settings used.

    `panels[regime][column]` is a 2D magnitude image [H, W]; columns: degraded, each baseline, lfmri,
    reference. `regions[method][regime]`: where the error sits (`lfmri_utils.metrics.region_metrics`:
    object / background SSIM and RMSE), the mean over the test volumes.
    """

    rows: list[ResultRow]
    slice_rows: list[SliceRow] = field(default_factory=list)
    tuning: dict[str, dict[str, TuningResult]] = field(default_factory=dict)
    panels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    regions: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def _ordered(values: Sequence[str], first: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def over_slices(rows: Sequence[ResultRow], slice_rows: Sequence[SliceRow]) -> bool:
    """Whether the spread is over slices: a single test volume whose per-slice metrics are known."""
    return bool(slice_rows) and len({r.volume_id for r in rows}) == 1


def spread_note(result: EvaluationResult) -> str:
    """What the ± means in the tables, in words."""
    volumes = sorted({r.volume_id for r in result.rows})
    if over_slices(result.rows, result.slice_rows):
        n = len({(s.regime, s.slice) for s in result.slice_rows}) // max(1, len({s.regime for s in
                                                                                  result.slice_rows}))
        return (f"one test volume ({volumes[0]}): mean ± std over its {n} slices (per-slice metrics "
                "normalised by the volume: its data range, its mean energy per slice for NMSE; the SSIM and "
                "NMSE means are the volume's, PSNR's is the mean slice PSNR)")
    return (f"test volumes: {len(volumes)} (one per subject unless a subject has several); mean ± std "
            "across volumes (volume metrics)")


def summarise(rows: Sequence[ResultRow], slice_rows: Sequence[SliceRow] = (),
              ) -> dict[str, dict[str, dict[str, tuple[float, float, int]]]]:
    """{method: {regime: {metric: (mean, std, n)}}} for `SUMMARY_METRICS`; std across rows (n volumes),
    or, for a single volume with `slice_rows`, across its slices (n slices; `over_slices`); ddof=1, 0 when
    n = 1. seconds_per_slice is always the mean over the volumes."""
    out: dict[str, dict[str, dict[str, tuple[float, float, int]]]] = {}
    methods = _ordered([r.method for r in rows])
    regimes = _ordered([r.regime for r in rows])
    by_slice = over_slices(rows, slice_rows)
    for method in methods:
        for regime in regimes:
            sel = [r for r in rows if r.method == method and r.regime == regime]
            if not sel:
                continue
            sel_slices = [r for r in slice_rows if r.method == method and r.regime == regime]
            stats = {}
            for metric in SUMMARY_METRICS:
                source = sel_slices if by_slice and metric != "seconds_per_slice" and sel_slices else sel
                values = np.array([getattr(r, metric) for r in source], dtype=np.float64)
                with np.errstate(invalid="ignore"):  # inf (a perfect PSNR) or NaN (no timing): NaN std
                    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                stats[metric] = (float(values.mean()), std, len(values))
            out.setdefault(method, {})[regime] = stats
    return out


def _format_params(params: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "none"


def _methods(summary: Mapping[str, Any]) -> list[str]:
    """The summary's methods: baselines in registry order, then lfmri and its other configurations."""
    methods = _ordered(list(summary), first=[m for m in BASELINES if m in summary])
    ours = [m for m in methods if m == LFMRI] + [m for m in methods if m.startswith(LFMRI + "_")]
    return [m for m in methods if m not in ours] + ours


def format_benchmark(result: EvaluationResult) -> str:
    """One table per metric (SSIM, PSNR, NMSE): a row per method, a column per regime (mean ± std, see
    `spread_note`), and the method's mean seconds per slice over the regimes; the best mean per regime in
    bold."""
    summary = summarise(result.rows, result.slice_rows)
    methods = _methods(summary)
    regimes = _ordered([r.regime for r in result.rows])
    lines = []
    metrics = (("ssim", "SSIM", 1.0, 3, True), ("psnr", "PSNR (dB)", 1.0, 2, True),
               ("nmse", "NMSE (%)", 100.0, 2, False))
    for key, name, scale, digits, higher in metrics:
        lines += ["", f"### {name}", "", "| method | " + " | ".join(regime_label(g) for g in regimes)
                  + " | s / slice |", "|---" * (len(regimes) + 2) + "|"]
        best = {}
        for g in regimes:
            means = [summary[m][g][key][0] for m in methods if g in summary[m]]
            finite = [v for v in means if math.isfinite(v)]
            best[g] = (max(finite) if higher else min(finite)) if finite else None
        for m in methods:
            cells = []
            for g in regimes:
                if g not in summary[m]:
                    cells.append("–")
                    continue
                mean, sd, _ = summary[m][g][key]
                cell = f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"
                cells.append(f"**{cell}**" if mean == best[g] else cell)
            secs = [summary[m][g]["seconds_per_slice"][0] for g in regimes if g in summary[m]]
            secs = [s for s in secs if math.isfinite(s)]
            cells.append(f"{np.mean(secs):.3g}" if secs else "–")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:]) + "\n"


def format_markdown(result: EvaluationResult) -> str:
    """The benchmark tables (`format_benchmark`), then the mean ± std table in the paper's format, one block
    per method (baselines first, lfmri last), with the mean seconds per slice in a last column."""
    summary = summarise(result.rows, result.slice_rows)
    settings = result.settings
    lines = ["# lfmri evaluation", ""]
    lines.append(spread_note(result)[0].upper() + spread_note(result)[1:] + "; metrics on magnitude images "
                 "in normalised units, data range = reference volume max (fastMRI definitions).")
    if settings:
        lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    lines += ["", format_benchmark(result).rstrip("\n")]
    if result.regions:
        lines += ["", "### Where the error sits: object (reference > 10 % of its slice's max), background",
                  "", "| method | regime | SSIM object | SSIM background | RMSE object | RMSE background |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {method} | {regime_label(regime)} | {m['ssim_object']:.3f} | "
                  f"{m['ssim_background']:.3f} | {m['rmse_object']:.4f} | {m['rmse_background']:.4f} |"
                  for method in _methods(summary) for regime, m in result.regions.get(method, {}).items()]
    for method in _methods(summary):
        lines += ["", f"## {method}", "", "| regime | SSIM | PSNR (dB) | NMSE (%) | s / slice |",
                  "|---|---|---|---|---|"]
        for regime, stats in summary[method].items():
            (s, s_sd, _), (p, p_sd, _), (n, n_sd, _) = stats["ssim"], stats["psnr"], stats["nmse"]
            secs = stats["seconds_per_slice"][0]
            lines.append(f"| {regime_label(regime)} | {s:.3f} ± {s_sd:.3f} | {p:.2f} ± {p_sd:.2f} | "
                         f"{100 * n:.2f} ± {100 * n_sd:.2f} | {'–' if math.isnan(secs) else f'{secs:.3g}'} |")
        tuned = {regime: per[method] for regime, per in result.tuning.items() if method in per}
        if tuned and any(t.params for t in tuned.values()):
            volumes = sorted({v for t in tuned.values() for v in t.volume_ids})
            lines += ["", f"Parameters tuned on validation volumes ({', '.join(volumes)}), "
                      "maximising mean SSIM:", ""]
            lines += [f"- {regime_label(regime)}: {_format_params(t.params)} (val SSIM {t.score:.3f})"
                      for regime, t in tuned.items()]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[ResultRow], path: str | os.PathLike) -> None:
    """results.csv: one row per volume x regime x method, columns `CSV_COLUMNS`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.volume_id, r.regime, r.method, f"{r.ssim:.6f}", f"{r.psnr:.6f}",
                             f"{r.nmse:.8f}", r.n_slices, f"{r.seconds_per_slice:.6g}"])


def write_slices_csv(rows: Sequence[SliceRow], path: str | os.PathLike) -> None:
    """slices.csv: one row per volume x regime x method x slice, columns `SLICE_COLUMNS`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SLICE_COLUMNS)
        for r in rows:
            writer.writerow([r.volume_id, r.regime, r.method, r.slice, f"{r.ssim:.6f}", f"{r.psnr:.6f}",
                             f"{r.nmse:.8f}"])


def read_csv(path: str | os.PathLike) -> list[ResultRow]:
    """Read back a results.csv written by `write_csv` (seconds_per_slice NaN in files without it; older files
    name the volume_id column "subject")."""
    with open(path, newline="") as fh:
        return [ResultRow(d["volume_id"] if "volume_id" in d else d["subject"], d["regime"], d["method"],
                          float(d["ssim"]), float(d["psnr"]), float(d["nmse"]), int(d["n_slices"]),
                          float(d.get("seconds_per_slice") or "nan"))
                for d in csv.DictReader(fh)]


def write_json(result: EvaluationResult, path: str | os.PathLike) -> None:
    """results.json: settings, tuned baseline parameters (and the validation volumes seen), rows, summary.

    Standard JSON: a value that is not finite (e.g. the infinite PSNR of a perfect reconstruction) is null.
    """
    payload = {
        "settings": result.settings,
        "tuned_baselines": {regime: {m: t.to_jsonable() for m, t in per.items()}
                            for regime, per in result.tuning.items()},
        "rows": [asdict(r) for r in result.rows],
        "spread": spread_note(result),
        "regions": result.regions,
        "summary": {m: {g: {k: {"mean": v[0], "std": v[1], "n": v[2]} for k, v in stats.items()}
                        for g, stats in per.items()}
                    for m, per in summarise(result.rows, result.slice_rows).items()},
    }
    with open(path, "w") as fh:
        json.dump(_finite_or_none(payload), fh, indent=2, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (inf, nan) inside dicts and lists replaced by None."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_figure(panels: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike) -> None:
    """figure.png: two rows per regime, each method's image (and the reference) above its error map
    |method - reference|.

    Magnitudes share one grey scale per regime (0 to the reference's max); the error maps share one scale per
    regime (0 to the 99.5th percentile of lfmri's error, or of the first method's without lfmri).
    """
    from lightning_modules.figures import Panel, image_grid  # optional / heavy: imported on use (matplotlib)

    regimes = list(panels)
    columns = list(panels[regimes[0]]) if regimes else []
    has_ref = "reference" in columns
    cells: list[list[Panel | None]] = []
    labels: list[str] = []
    for i, regime in enumerate(regimes):
        row = panels[regime]
        vmax = float(np.max(row["reference"])) if has_ref else None
        cells.append([Panel(row[col], vmax=vmax, title=col if i == 0 else "") for col in columns])
        labels.append(regime_label(regime))
        if not has_ref:
            continue
        errors = {c: np.abs(row[c] - row["reference"]) for c in columns if c != "reference"}
        scale_from = errors.get(LFMRI, next(iter(errors.values()), None))
        emax = float(np.percentile(scale_from, 99.5)) if scale_from is not None else 0.0
        cells.append([Panel(errors[col], "magma", vmax=emax or None) if col in errors else None
                      for col in columns])
        labels.append("|error|")
    image_grid(cells, labels).savefig(path, dpi=110)


def write_files_atomically(out_dir: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Call every `writer(path)` into a temporary folder beside `out_dir`, then give the files to `out_dir`
    all at once (`lfmri_utils.files.atomic_dir`, which states the guarantee precisely).

    If any writer fails, `out_dir` is left as it was (not created when it did not exist). A new `out_dir`, or
    an existing folder of files (e.g. a previous run's results), gets the new set in one swap of folders:
    readers see all the old files or all the new ones; `out_dir`'s other files are kept. Only a folder with
    sub-folders (or the working folder) gets the files one `os.replace` each (each file whole).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    with atomic_dir(out) as tmp:
        for name, writer in writers.items():
            writer(tmp / name)


def write_results(result: EvaluationResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write results.csv, .md, .json, slices.csv and figure.png into `out_dir` atomically; returns the
    paths."""
    writers: dict[str, Callable[[Path], None]] = {
        "results.csv": lambda p: write_csv(result.rows, p),
        "results.md": lambda p: p.write_text(format_markdown(result)),
        "results.json": lambda p: write_json(result, p),
    }
    if result.slice_rows:
        writers["slices.csv"] = lambda p: write_slices_csv(result.slice_rows, p)
    if result.panels:
        writers["figure.png"] = lambda p: write_figure(result.panels, p)
    write_files_atomically(out_dir, writers)
    return [Path(out_dir) / name for name in writers]
