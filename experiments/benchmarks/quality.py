"""The benchmark table of issue 11: every method on the held-out volume(s), per regime, at native resolution.

    # the make demo checkpoint on the bundled held-out subject (Colin27), 4 slices per regime,
    # baselines tuned on one validation pseudo-subject, the reference PC with 50 predictor steps
    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/quality.py \
        --ckpt runs/demo/transfer/finetune/checkpoints/last.ckpt --slices 4 --reference-pc-steps 50 \
        --out runs/quality

Rows: degraded, TV, NL-means (on the magnitude and on the complex image), BM3D (both, when the optional
extra `lfmri[bm3d]` is installed), model-based TV with the forward operator A, lfmri with its default
sampler, and lfmri's reference predictor-corrector (gradient DC w = 0.3). Columns: the four regimes. Cells:
SSIM / PSNR / NMSE mean ± std (over the slices when there is one test volume, as with the bundled data;
across test volumes otherwise) and each method's seconds per slice on this machine, measured in the same run.

This is `lfmri evaluate` with the data block of `--config` (default: quality_data.yaml beside this script,
the bundled data at native resolution with one validation pseudo-subject for tuning) and
`--reference-pc-steps`: the command prints the same table and writes the same files (results.csv / .md /
.json, slices.csv, figure.png with each method's image and error map) into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfmri.cli import main as lfmri_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ScoreModel Lightning checkpoint, or reference-small")
    p.add_argument("--config", default=str(Path(__file__).with_name("quality_data.yaml")),
                   help="YAML whose data: block gives the test (and validation) subjects")
    p.add_argument("--slices", type=int, default=4, help="evenly spaced slices per volume (test and val)")
    p.add_argument("--reference-pc-steps", type=int, default=50,
                   help="predictor steps of the reference PC (the paper: 2000; 0: leave it out)")
    p.add_argument("--baselines", default="all", help="lfmri evaluate --baselines")
    p.add_argument("--also", default="warm_ddim,warm_ddim:8,tweedie",
                   help="lfmri evaluate --also: the other estimators side by side (none: only the default)")
    p.add_argument("--regimes", default="all")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/quality")
    args = p.parse_args(argv)
    return lfmri_main(["evaluate", "--ckpt", args.ckpt, "--config", args.config, "--regimes", args.regimes,
                       "--baselines", args.baselines, "--max-slices-per-volume", str(args.slices),
                       "--reference-pc-steps", str(args.reference_pc_steps), "--device", args.device,
                       "--out", args.out, *(["--also", args.also] if args.also != "none" else [])])


if __name__ == "__main__":
    sys.exit(main())
