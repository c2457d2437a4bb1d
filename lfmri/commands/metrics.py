"""`lfmri metrics REF PRED [--slice-axis N]`: fastMRI SSIM / PSNR / NMSE of a volume against a reference.

REF and PRED are NIfTI magnitude volumes of the same shape. The metrics follow fastMRI's `evaluate.py` on the
whole volume: SSIM is the mean over slices (taken along `--slice-axis`, default the last) of scikit-image's
SSIM with a 7x7 uniform window and data range = the reference volume's maximum; PSNR (dB) uses the same data
range; NMSE = ||PRED - REF||^2 / ||REF||^2. Prints one line of standard JSON {"ssim": ..., "psnr": ...,
"nmse": ...}; a value that is not finite is printed as null: "psnr" is null when PRED equals REF (the PSNR of
identical volumes is infinite), never Python's non-standard `Infinity`.

Both volumes must pass lfmri's input rule (`lfmri_utils.volumes.check_volume`): 3D, finite, slices of at least
7x7 (SSIM's window), no negative voxel (they are magnitudes); REF must not be all zero (its maximum is the
data range), PRED may be (an empty reconstruction is scored, not refused).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from lfmri.commands import documented_parser
from lfmri_utils.errors import InputError
from lfmri_utils.volumes import check_volume


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `metrics` subcommand."""
    p = documented_parser(subparsers, "metrics", "fastMRI SSIM / PSNR / NMSE of PRED against REF (two NIfTI "
                          "volumes), as JSON", __doc__)
    p.add_argument("ref", metavar="REF", help="reference NIfTI volume (e.g. the high-field image)")
    p.add_argument("pred", metavar="PRED", help="NIfTI volume to score, same shape as REF")
    p.add_argument("--slice-axis", type=int, default=2, help="axis of REF/PRED along which slices are "
                   "taken for SSIM (0, 1 or 2; default 2, the last)")
    p.set_defaults(func=run)


def volume_metrics(ref: np.ndarray, pred: np.ndarray, slice_axis: int = 2) -> dict[str, float]:
    """fastMRI's {"ssim", "psnr", "nmse"} of 3D `pred` against 3D `ref`, slices along `slice_axis`."""
    from lfmri_utils.metrics import nmse_volume, psnr_volume, ssim_volume

    ref_s = np.moveaxis(ref, slice_axis, 0)
    pred_s = np.moveaxis(pred, slice_axis, 0)
    return {"ssim": ssim_volume(pred_s, ref_s), "psnr": psnr_volume(pred_s, ref_s),
            "nmse": nmse_volume(pred_s, ref_s)}


def run(args: argparse.Namespace) -> int:
    """Load both volumes, check them, print the metrics as JSON."""
    from datamodules.io import load_nifti
    from datamodules.transforms import check_slice_axis

    axis = check_slice_axis(args.slice_axis)
    ref, _ = load_nifti(args.ref)
    check_volume(ref, args.ref, axis, kind="magnitude")
    pred, _ = load_nifti(args.pred)
    check_volume(pred, args.pred, axis, kind="magnitude", allow_all_zero=True)
    if ref.shape != pred.shape:
        raise InputError(f"{args.pred}: shape {pred.shape} does not match {args.ref}: shape {ref.shape}")
    metrics = volume_metrics(ref, pred, args.slice_axis)
    print(json.dumps({k: v if math.isfinite(v) else None for k, v in metrics.items()}, allow_nan=False))
    return 0
