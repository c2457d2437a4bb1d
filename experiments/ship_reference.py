"""Write the shipped reference prior (`--ckpt reference-small`) from a `configs/reference_small.yaml` run.

    python experiments/ship_reference.py runs/reference_small/checkpoints/last.ckpt --wall-s 4650

The file (`diffusion/pretrained/reference_small.ckpt`) holds the run's EMA weights once, its hyper-
parameters and step, and a provenance record (config, command, wall time, validation losses of the run);
`lfmri.models.slim_checkpoint` says what is dropped. Written atomically; an existing file is replaced.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion.checkpoint import SHIPPED_CHECKPOINTS  # noqa: E402
from lfmri.models import slim_checkpoint  # noqa: E402
from lfmri_utils.files import atomic_path  # noqa: E402


def last_validation(metrics_csv: Path) -> dict[str, float]:
    """The last logged validation losses of a CSVLogger `metrics.csv` ({} when there are none)."""
    found: dict[str, float] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("val/") and value:
                    found[key] = float(value)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="last.ckpt of the configs/reference_small.yaml run (stacked on quickstart)")
    p.add_argument("--out", default=str(SHIPPED_CHECKPOINTS["reference-small"]))
    p.add_argument("--wall-s", type=float, required=True, help="the run's measured wall time (s)")
    p.add_argument("--config", default="configs/reference_small.yaml", help="the run config (on quickstart)")
    args = p.parse_args(argv)
    # the run's CSV logs: the nearest folder above the checkpoint that holds logs/version_*/metrics.csv
    runs = [d for d in Path(args.ckpt).resolve().parents if any(d.glob("logs/version_*/metrics.csv"))]
    metrics = sorted(runs[0].glob("logs/version_*/metrics.csv")) if runs else []
    command = f"OMP_NUM_THREADS=2 lfmri fit --config configs/quickstart.yaml --config {args.config}"
    provenance = {"config": args.config, "command": command,
                  "wall_s": args.wall_s, "machine": "2-core CPU",
                  "val": last_validation(metrics[-1]) if metrics else {}}
    ckpt = slim_checkpoint(args.ckpt, provenance)
    out = Path(args.out)
    with atomic_path(out) as tmp:  # (creates missing folders)
        torch.save(ckpt, tmp)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, step {ckpt['global_step']}, "
          f"val {provenance['val']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
