"""Accuracy of `degradations.estimate_noise_sigma` on real MRI slices: relative error of the estimated k-space
noise std against the true `params["noise_sigma"]`, per regime and SNR.

    .venv/bin/python experiments/benchmarks/noise_estimate.py            # about a minute on CPU
    .venv/bin/python experiments/benchmarks/noise_estimate.py --slices 10 --snr 2 5 10 20 --seed 1

Data (all at native resolution, each slice normalised by its 99.5th percentile, made complex):
- `mni`: `--slices` slices of nilearn's MNI152 2009 T1 template (1 mm, 197x233x189), spread evenly over the
  central 60 % of each of the three axes (a third of them per orientation);
- `mni+phase`: the same slices times a smooth random phase (a cubic polynomial, up to +-pi), as a real
  complex MR image has;
- `epi`, `anat`: nibabel's test volumes `example4d.nii.gz` (EPI, 128x96) and `anatomical.nii` (T1, 33x41),
  real acquisitions that carry noise of their own: the estimate measures that noise too, so at high SNR their
  error is the image's own noise, not the estimator's (their k-space noise floor is about 0.3-0.4 (EPI) and
  0.6-1.0 (T1) of the added noise at 20 dB).
Each slice is degraded with `make_regime(regime, snr_db=s)` (a fixed generator) and the estimate is given the
regime's forward operator (`A`), or nothing (`blind`). Columns: mean and max |relative error| in %.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import nibabel
import nilearn
import numpy as np
import torch

from degradations import REGIMES, estimate_noise_sigma, make_regime, random_b0_map

MNI = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def load(path: Path) -> np.ndarray:
    """A 3D volume (the first frame of a 4D one) as float32."""
    data = np.asarray(nibabel.load(path).dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def normalised(slab: np.ndarray) -> torch.Tensor:
    """Slices ``[S, H, W]`` -> complex ``[S, 1, H, W]``, each divided by its 99.5th percentile."""
    scale = np.percentile(slab.reshape(slab.shape[0], -1), 99.5, axis=1)
    return torch.from_numpy(slab / scale[:, None, None])[:, None].to(torch.complex64)


def mni_batches(n_slices: int) -> list[torch.Tensor]:
    """One batch per orientation (slices of one shape), ``n_slices`` in all, from the central 60 %."""
    volume = load(MNI)
    batches = []
    for axis, count in enumerate(np.diff(np.linspace(0, n_slices, 4).round().astype(int))):
        size = volume.shape[axis]
        index = np.linspace(0.2 * size, 0.8 * size, count).round().astype(int)
        batches.append(normalised(np.moveaxis(np.take(volume, index, axis=axis), axis, 0)))
    return batches


def with_phase(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` times a smooth random phase map (cubic polynomial, max |phase| = pi) per slice."""
    phase = random_b0_map(torch.full((x.shape[0],), math.pi), x.shape[-2], x.shape[-1], generator)
    return x * torch.polar(torch.ones_like(phase), phase)


def relative_errors(batches: list[torch.Tensor], regime: str, snr_db: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """|relative error| of the estimate with the regime's operator and blind, over all slices (``seed``: the
    degradation's generator)."""
    generator = torch.Generator().manual_seed(seed)
    degradation = make_regime(regime, snr_db=snr_db)
    with_a, blind = [], []
    for x in batches:
        y, params = degradation(x, generator)
        sigma = params["noise_sigma"]
        with_a.append((estimate_noise_sigma(y, degradation.operator(params)) / sigma - 1).abs())
        blind.append((estimate_noise_sigma(y) / sigma - 1).abs())
    return torch.cat(with_a).numpy(), torch.cat(blind).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=20, help="MNI slices (a third per orientation)")
    parser.add_argument("--snr", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0], help="SNRs in dB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    mni = mni_batches(args.slices)
    phase_generator = torch.Generator().manual_seed(args.seed + 1)
    data = {
        "mni": mni,
        "mni+phase": [with_phase(x, phase_generator) for x in mni],
        "epi": [normalised(np.moveaxis(load(NIBABEL_DATA / "example4d.nii.gz")[..., 3:21:2], 2, 0))],
        "anat": [normalised(np.moveaxis(load(NIBABEL_DATA / "anatomical.nii")[..., 3:22:2], 2, 0))],
    }
    counts = ", ".join(f"{name} {sum(len(x) for x in batches)}" for name, batches in data.items())
    print(f"slices: {counts}; |relative error| of sigma in %, mean / max (A: with the operator)")
    header = (f"{'regime':22s} {'SNR dB':>6s} | {'mni A':>11s} | {'mni blind':>11s} | {'mni+phase A':>11s} | "
              f"{'epi A':>11s} | {'anat A':>11s}")
    print(header)
    print("-" * len(header))
    worst = {name: 0.0 for name in data}
    for row, (regime, snr) in enumerate((regime, snr) for regime in REGIMES for snr in args.snr):
        cells = []
        for name, batches in data.items():
            with_a, blind = relative_errors(batches, regime, snr, 1000 * args.seed + row)
            worst[name] = max(worst[name], float(with_a.max()))
            cells.append(f"{100 * with_a.mean():4.1f} / {100 * with_a.max():4.1f}")
            if name == "mni":
                cells.append(f"{100 * blind.mean():4.1f} / {100 * blind.max():4.1f}")
        print(f"{regime:22s} {snr:6.1f} | " + " | ".join(cells))
    print("worst |relative error| with A: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in worst.items()))
    print(f"time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
