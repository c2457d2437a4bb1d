"""The measured per-regime table next to the paper's numbers, from `lfmri evaluate`'s results.csv files.

    python experiments/paper/compare.py finetuned=runs/paper/eval_finetune/results.csv \
        [scratch=runs/paper/eval_scratch/results.csv] [--out runs/paper/comparison.md] [--title T]

Each `LABEL=CSV` gives its `lfmri` rows as the column LABEL; the baselines (degraded input, TV, NL-means)
come from the first CSV that has them. One table per metric (SSIM, PSNR in dB, NMSE in %): mean ± std across
test volumes (one per subject unless a subject has several; sample std, ddof=1), beside the paper's figures
(10 held-out mouse subjects, DESIGN.md). With two or more CSVs, a last table per other label gives the
per-volume paired difference first label - that label (mean ± std over the volumes both evaluated, and on how
many volumes the first is better), e.g. fine-tuned minus from scratch: "does the transfer help?", and
fine-tuned minus the starting prior: "does the fine-tune keep what the prior knew?".
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from degradations import REGIMES, regime_label
from lfmri.baselines import BASELINES as _BASELINES

#: the paper's lfmri results on 10 held-out mouse subjects: (mean, std) per metric, nmse in %; None: not given
PAPER: dict[str, dict[str, tuple[float, float] | None]] = {
    "noise": {"ssim": (0.758, 0.050), "psnr": (32.72, 1.53), "nmse": (2.42, 0.77)},
    "noise_blur": {"ssim": (0.676, 0.049), "psnr": (27.73, 2.60), "nmse": None},
    "noise_blur_t2star": {"ssim": (0.626, 0.054), "psnr": (25.37, 2.58), "nmse": None},
    "noise_blur_t2star_b0": {"ssim": (0.657, 0.078), "psnr": (24.43, 2.31), "nmse": (19.25, 1.56)},
}
#: (key, heading, display scale, decimals, higher is better)
METRICS = (("ssim", "SSIM", 1.0, 3, True), ("psnr", "PSNR (dB)", 1.0, 2, True),
           ("nmse", "NMSE (%)", 100.0, 2, False))
BASELINES = tuple(_BASELINES)  # every classical method `lfmri evaluate` can run, in registry order
OURS = "lfmri"

#: {column: {regime: {volume_id: {metric: value}}}}
Table = dict[str, dict[str, dict[str, dict[str, float]]]]


def read_results(path: str | Path) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """results.csv -> {method: {regime: {volume_id: {ssim, psnr, nmse}}}} (nmse as a fraction; older files
    name the volume_id column "subject")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            values = {m: float(row[m]) for m in ("ssim", "psnr", "nmse")}
            volume_id = row["volume_id"] if "volume_id" in row else row["subject"]
            out.setdefault(row["method"], {}).setdefault(row["regime"], {})[volume_id] = values
    return out


def collect(sources: Sequence[tuple[str, str | Path]]) -> Table:
    """Columns in order: the baselines (from the first CSV holding them), then each label's lfmri rows."""
    results = [(label, read_results(path)) for label, path in sources]
    table: Table = {}
    for name in BASELINES:
        first = next((res[name] for _, res in results if name in res), None)
        if first is not None:
            table[name] = first
    for label, res in results:
        if OURS not in res:
            raise ValueError(f"{label}: the results hold no '{OURS}' rows")
        table[label] = res[OURS]
    return table


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _cell(values: Sequence[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    mean, std = _mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _regimes(table: Table) -> list[str]:
    seen = {r for per in table.values() for r in per}
    return [r for r in REGIMES if r in seen] + sorted(seen - set(REGIMES))


def format_comparison(table: Table, title: str = "lfmri vs the paper") -> str:
    """The markdown comparison (see the module docstring)."""
    regimes = _regimes(table)
    columns = list(table)
    volumes = sorted({v for per in table.values() for by_volume in per.values() for v in by_volume})
    lines = [f"# {title}", "",
             f"Measured: mean ± std across {len(volumes)} test volume(s) ({', '.join(volumes)}); "
             "magnitude "
             "volumes, fastMRI metrics. Paper: lfmri on 10 held-out mouse subjects (– = not reported). "
             "Columns: " + ", ".join(f"`{c}`" for c in columns) + " (lfmri columns are the labelled models)."]
    for key, name, scale, digits, _ in METRICS:
        lines += ["", f"## {name}", "", "| regime | paper (lfmri) | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 2) + "|"]
        for regime in regimes:
            ref = PAPER.get(regime, {}).get(key)
            paper = f"{ref[0]:.{digits}f} ± {ref[1]:.{digits}f}" if ref else "–"
            cells = [_cell([v[key] for v in table[c].get(regime, {}).values()], scale, digits)
                     for c in columns]
            lines.append(f"| {regime_label(regime)} | {paper} | " + " | ".join(cells) + " |")
    models = [c for c in columns if c not in BASELINES]
    for other in models[1:]:  # the first model against each other one
        lines += [""] + format_difference(table, models[0], other)
    return "\n".join(lines) + "\n"


def format_difference(table: Table, a: str, b: str) -> list[str]:
    """Markdown lines: paired per-volume differences a - b per regime and metric, and a's wins."""
    lines = [f"## Paired difference `{a}` − `{b}` (per test volume)", "",
             f"| regime | ΔSSIM | ΔPSNR (dB) | ΔNMSE (%) | volumes where `{a}` is better "
             "(SSIM / PSNR / NMSE) |",
             "|---|---|---|---|---|"]
    for regime in _regimes(table):
        ra, rb = table[a].get(regime, {}), table[b].get(regime, {})
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        cells, wins = [], []
        for key, _, scale, digits, higher_better in METRICS:
            diffs = [scale * (ra[s][key] - rb[s][key]) for s in common]
            mean, std = _mean_std(diffs)
            cells.append(f"{mean:+.{digits}f} ± {std:.{digits}f}")
            wins.append(str(sum((d > 0) if higher_better else (d < 0) for d in diffs)))
        lines.append(f"| {regime_label(regime)} | " + " | ".join(cells) + f" | {' / '.join(wins)} of "
                     f"{len(common)} |")
    return lines


def parse_source(spec: str) -> tuple[str, str]:
    """`LABEL=PATH` -> (label, path); a bare PATH is labelled `lfmri`."""
    label, sep, path = spec.partition("=")
    if not sep:
        return OURS, spec
    if not label or not path:
        raise ValueError(f"{spec!r}: expected LABEL=results.csv")
    return label, path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; writes --out (if given) and prints the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="LABEL=results.csv (lfmri evaluate output), one or more")
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--title", default="lfmri vs the paper", help="heading of the markdown")
    args = parser.parse_args(argv)
    try:
        sources = [parse_source(s) for s in args.results]
        labels = [label for label, _ in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {', '.join(labels)}")
        text = format_comparison(collect(sources), args.title)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
