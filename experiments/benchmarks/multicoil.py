"""The multi-coil, undersampled benchmark of issue 24: the CS-MRI field's baselines and lfmri on the same
measurements.

    # a quick CPU configuration (minutes): 2 test and 1 validation slices per row
    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/multicoil.py --test-slices 2 --val-slices 1 \
        --out runs/multicoil

Data: axial slices (slice axis 2, `datamodules.transforms.to_slices`, the project's layout) of the bundled
Colin27 T1 volume (datamodules/data/colin27_ch2.nii.gz) at its native 181 x 217 matrix (phase encoding along
H: 181 lines), normalised by the volume's 99.5th percentile (`robust_scale`), as complex images. Test slices
are spread evenly over axial slices 60-120, validation slices over 65-115, never the same slices.

Acquisition: 8 simulated birdcage coils (`make_regime(..., coils=8)`), equispaced Cartesian undersampling
(fastMRI's `EquispacedMaskFractionFunc`) and the regime's degradations, noise at the SNR of the fully sampled
single-coil image (the project's convention). Rows (the issue's):
(a) regime "noise" at 30 dB, 4x with an 8 % centre and 8x with a 4 % centre;
(b) 2x with an 8 % centre, each of the four regimes at 2-7 dB.
ESPIRiT needs at least 8 fully sampled centre lines (`degradations.coils.MIN_CALIB_WIDTH`), more than
181 x 4 % = 7, so a centre is widened to `--min-centre-lines` (default 14; the first run, RESULTS.md, used it
when 8-10 lines still gave empty maps) where it is narrower; the table names the centre used.

Every method gets the same `degradations.Measurement` with ESPIRiT-estimated coil maps
(`Measurement.from_kspace` without the true maps) and the simulation's noise std. Baselines
(`lfmri.baselines`, default the CS ones: zero-filled RSS, CG-SENSE, L1-wavelet and TV CS) are tuned per row on
the validation slices (`tune_baseline`, mean SSIM over the grid `Baseline.grid`). lfmri: the shipped prior
(`--ckpt`, default reference-small) with the default sampler, made as `lfmri reconstruct` makes them
(`load_score_model`, `SamplerOptions().build`, `Reconstructor`; undersampled data get the registry's
undersampled defaults, a TV start image included, `Sampler.for_measurement`); with `--lfmri-variants` also
the same sampler started from the zero-filled image (`LFMRI_VARIANTS`).

Metrics: PSNR / SSIM / NMSE of the test slices as one volume (`lfmri_utils.metrics`, data range = the
reference's max) and wall-clock seconds per slice on this machine (tuning excluded). Writes multicoil.md (one
table per metric: methods x rows, and the tuned parameters) and multicoil.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from datamodules.transforms import robust_scale, to_slices
from degradations import Measurement, complex_to_channels, make_regime, regime_label
from lfmri.baselines import BASELINES, parse_baselines, tune_baseline
from lfmri_utils.metrics import nmse_volume, psnr_volume, ssim_volume

COLIN = Path(__file__).resolve().parents[2] / "datamodules" / "data" / "colin27_ch2.nii.gz"
SLICE_AXIS = 2
TEST_RANGE, VAL_RANGE = (60, 120), (65, 115)
N_COILS = 8
LFMRI = "lfmri"


@dataclass(frozen=True)
class Row:
    """One acquisition of the table: a regime, an acceleration and centre fraction, an SNR (range)."""

    regime: str
    acceleration: float
    center_fraction: float
    snr_db_range: tuple[float, float]

    def label(self, center_lines: int) -> str:
        snr = self.snr_db_range
        snr_text = f"{snr[0]:g} dB" if snr[0] == snr[1] else f"{snr[0]:g}-{snr[1]:g} dB"
        return (f"{self.acceleration:g}x ({center_lines} centre lines), {regime_label(self.regime)}, "
                f"{snr_text}")


ROWS = (
    Row("noise", 4.0, 0.08, (30.0, 30.0)),
    Row("noise", 8.0, 0.04, (30.0, 30.0)),
    *(Row(regime, 2.0, 0.08, (2.0, 7.0)) for regime in
      ("noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0")),
)


def slice_indices(n: int, bounds: tuple[int, int], avoid: Collection[int] = ()) -> list[int]:
    """`n` axial slice indices spread evenly over `bounds` (inclusive; one: the middle), each moved up past
    the indices in `avoid` and those already taken."""
    out: list[int] = []
    starts = np.linspace(*bounds, n).round().astype(int).tolist() if n > 1 else [sum(bounds) // 2]
    for z in starts:
        while z in avoid or z in out:
            z += 1
        out.append(z)
    return out


def load_slices(indices: list[int], width: int | None = None) -> np.ndarray:
    """The Colin27 axial slices `indices`, float32 `[S, 181, W]`, in units of the volume's 99.5th
    percentile; `width`: the central `width` readout columns only (default all 217)."""
    vol = np.asarray(nib.load(str(COLIN)).dataobj, dtype=np.float32)
    stack = to_slices(vol / robust_scale(vol), SLICE_AXIS)[indices]
    start = 0 if width is None else (stack.shape[-1] - width) // 2
    return np.ascontiguousarray(stack[..., start:start + (width or stack.shape[-1])])


def measure(ref: np.ndarray, row: Row, center_fraction: float, seed: int) -> Measurement:
    """The measurement of the real images `ref` `[S,H,W]` under `row` (one draw of `seed`), with coil maps
    estimated by ESPIRiT (the simulation's maps are dropped) and the recorded noise std."""
    degradation = make_regime(row.regime, snr_db_range=row.snr_db_range, acceleration=row.acceleration,
                              center_fraction=center_fraction, mask="equispaced", coils=N_COILS)
    x = torch.from_numpy(ref).to(torch.complex64)[:, None]
    y, params = degradation(x, torch.Generator().manual_seed(seed))
    kept = {k: v for k, v in params.items() if k not in ("sensitivities", "noise_sigma")}
    return Measurement.from_kspace(y, kept, params["noise_sigma"], "recorded", *degradation.b0_settings)


#: lfmri's rows: the default (`lfmri reconstruct` without sampler options) and the same sampler started from
#: the zero-filled image instead of the TV image (how much of the default is its TV start)
LFMRI_VARIANTS: dict[str, dict[str, Any]] = {
    LFMRI: {},
    "lfmri, zero-filled start": {"start": "degraded", "start_error": 1.0, "t0_ratio": 4.0},
}


def lfmri_method(ckpt: str, device: torch.device, batch_size: int, options: dict[str, Any]) -> Any:
    """`reconstruct(measurement, slice_ids) -> magnitude [S,H,W]` with the prior `ckpt` and the default
    sampler under `options` (`--sampling.*`), as `lfmri reconstruct` builds them (imported here: the model
    code is heavy); with the settings of the sampler undersampled data get."""
    from diffusion.inference import Reconstructor
    from diffusion.sampling.samplers import SamplerOptions
    from lfmri.models import load_score_model

    model = load_score_model(ckpt, device)
    sampler = SamplerOptions(**options).build(model.sde)
    reconstructor = Reconstructor(model.score_fn(), sampler, batch_size, device, data_scale=model.data_scale)

    def reconstruct(m: Measurement, slice_ids: list[int]) -> np.ndarray:
        result = reconstructor(m, complex_to_channels(m.degraded), slice_ids, seed=0, samples=1)
        return result.mean[:, 0].numpy()

    return reconstruct, {"ckpt": ckpt, **sampler.for_measurement(True).settings()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    test_ids = slice_indices(args.test_slices, TEST_RANGE)
    val_ids = slice_indices(args.val_slices, VAL_RANGE, avoid=set(test_ids))
    test_ref, val_ref = load_slices(test_ids, args.width), load_slices(val_ids, args.width)
    height = test_ref.shape[1]
    device = torch.device(args.device)
    names = [n for n in parse_baselines(args.baselines) if n != "degraded" or args.with_degraded]
    ours = {} if args.ckpt == "none" else {
        label: lfmri_method(args.ckpt, device, args.batch_size, options)
        for label, options in LFMRI_VARIANTS.items() if label == LFMRI or args.lfmri_variants}
    rows = [(i, r) for i, r in enumerate(ROWS) if args.rows is None or i in args.rows]
    results, tuning, labels = [], {}, []
    for index, row in rows:  # a row's draw depends on its place in ROWS and --draw only
        lines = max(round(row.center_fraction * height), args.min_centre_lines)
        widened = lines > round(row.center_fraction * height)
        center_fraction = lines / height if widened else row.center_fraction
        label = row.label(lines)
        labels.append(label)
        test = measure(test_ref, row, center_fraction, seed=1000 + index + 100 * args.draw).to(device)
        val = measure(val_ref, row, center_fraction, seed=2000 + index + 100 * args.draw).to(device)
        tuning[label] = {}
        for name in names:
            params = {}
            if BASELINES[name].grid:
                tuned = tune_baseline(BASELINES[name], {"val": (val, val_ref)}, ssim_volume)
                params = tuned.params
                tuning[label][name] = {"params": params, "val_ssim": tuned.score,
                                       "grid": [[p, s] for p, s in tuned.scores]}
            start = time.perf_counter()
            pred = BASELINES[name](test, **params)
            results.append(_row(label, name, pred, test_ref, time.perf_counter() - start, params))
        for method, (reconstruct, _) in ours.items():
            start = time.perf_counter()
            pred = reconstruct(test, test_ids)
            results.append(_row(label, method, pred, test_ref, time.perf_counter() - start, {}))
    settings = {"test_slices": test_ids, "val_slices": val_ids, "draw": args.draw, "coils": N_COILS,
                "mask": "equispaced",
                "maps": "ESPIRiT (degradations.espirit_sensitivities)", "device": str(device),
                "torch_threads": torch.get_num_threads(), "min_centre_lines": args.min_centre_lines,
                "matrix": list(test_ref.shape[1:]),
                "lfmri": {method: settings for method, (_, settings) in ours.items()}}
    return {"settings": settings, "rows": labels, "results": results, "tuning": tuning}


def _row(label: str, method: str, pred: np.ndarray, ref: np.ndarray, seconds: float,
         params: dict[str, float]) -> dict[str, Any]:
    row = {"row": label, "method": method, "psnr": psnr_volume(pred, ref), "ssim": ssim_volume(pred, ref),
           "nmse": nmse_volume(pred, ref), "seconds_per_slice": seconds / ref.shape[0], "params": params}
    print(f"{label}: {method} SSIM {row['ssim']:.3f}, PSNR {row['psnr']:.2f} dB, "
          f"{row['seconds_per_slice']:.1f} s / slice", file=sys.stderr)
    return row


def markdown(payload: dict[str, Any]) -> str:
    """One table per metric (methods x rows, and the mean seconds per slice), then the tuned parameters."""
    labels, results = payload["rows"], payload["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    cell = {(r["method"], r["row"]): r for r in results}
    s = payload["settings"]
    out = [f"Colin27 axial slices {s['test_slices']} (tuning: {s['val_slices']}), matrix "
           f"{s['matrix'][0]} x {s['matrix'][1]}, {s['coils']} birdcage coils, {s['mask']} Cartesian, "
           f"ESPIRiT maps for every method; device {s['device']}.", ""]
    for metric, title, fmt in (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
                               ("nmse", "NMSE (%)", "{:.2f}")):
        out += [f"### {title}", "", "| method | " + " | ".join(labels) + " | s / slice |",
                "|---" * (len(labels) + 2) + "|"]
        for method in methods:
            values = [cell[(method, label)] for label in labels]
            scale = 100.0 if metric == "nmse" else 1.0
            seconds = float(np.mean([v["seconds_per_slice"] for v in values]))
            out.append(f"| {method} | " + " | ".join(fmt.format(v[metric] * scale) for v in values)
                       + f" | {seconds:.2f} |")
        out.append("")
    out += ["Tuned on the validation slices (mean SSIM): " + "; ".join(
        f"{label}: " + ", ".join(f"{n} {json.dumps(t['params'])}" for n, t in per.items())
        for label, per in payload["tuning"].items()), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="reference-small", help="lfmri's prior (a checkpoint or shipped name); "
                   "none: baselines only")
    p.add_argument("--baselines", default="zero_filled_rss,cg_sense,l1_wavelet,tv_cs",
                   help="lfmri evaluate --baselines names")
    p.add_argument("--with-degraded", action="store_true", help="also the coil-combined zero-filled image")
    p.add_argument("--lfmri-variants", action="store_true",
                   help="also lfmri's sampler started from the zero-filled image (LFMRI_VARIANTS)")
    p.add_argument("--test-slices", type=int, default=4)
    p.add_argument("--val-slices", type=int, default=2)
    p.add_argument("--rows", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help=f"comma-separated indices of the rows to run (0-{len(ROWS) - 1}; default all)")
    p.add_argument("--width", type=int, default=None,
                   help="crop the readout (W) to its central WIDTH columns, for speed (default: all 217; the "
                   "181 phase-encoding lines are always kept)")
    p.add_argument("--min-centre-lines", type=int, default=14,
                   help="fully sampled centre lines at least (ESPIRiT's calibration)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--draw", type=int, default=0,
                   help="the noise draw of every measurement (test / validation seeds 1000 / 2000 + the "
                   "row's index + 100 x DRAW; 0: the published tables)")
    p.add_argument("--out", default="runs/multicoil")
    args = p.parse_args(argv)
    if args.test_slices < 1 or args.val_slices < 1:
        p.error("--test-slices and --val-slices must be >= 1")
    if args.width is not None and not 16 <= args.width <= 217:
        p.error("--width must be in [16, 217]")
    payload = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(payload)
    (out / "multicoil.md").write_text(table)
    (out / "multicoil.json").write_text(json.dumps(payload, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
