"""`lfmri metrics` against fastMRI's definitions computed with scikit-image (the oracle), on real volumes.

    python experiments/benchmarks/metrics_oracle.py REF.nii.gz PRED.nii.gz     # slices along axis 2

fastMRI (`fastmri/evaluate.py`): SSIM = mean over slices of skimage's structural_similarity with a 7x7
uniform window and data_range = max of the reference volume; PSNR = skimage's peak_signal_noise_ratio with the
same data range; NMSE = ||pred - ref||^2 / ||ref||^2.
"""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def oracle(ref: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """fastMRI's three metrics of volumes [S, H, W] in float64."""
    rng = ref.max()
    ssim = np.mean([structural_similarity(r, p, data_range=rng) for r, p in zip(ref, pred, strict=True)])
    return {"ssim": float(ssim), "psnr": float(peak_signal_noise_ratio(ref, pred, data_range=rng)),
            "nmse": float(np.linalg.norm(pred - ref) ** 2 / np.linalg.norm(ref) ** 2)}


def main(ref_path: str, pred_path: str) -> None:
    load = lambda p: np.moveaxis(np.asarray(nib.load(p).dataobj, dtype=np.float64), 2, 0)  # noqa: E731
    expected = oracle(load(ref_path), load(pred_path))
    lfmri = Path(sys.executable).with_name("lfmri")
    got = json.loads(subprocess.run([str(lfmri), "metrics", ref_path, pred_path], check=True,
                                    capture_output=True, text=True).stdout)
    for key in expected:
        print(f"{key}: lfmri {got[key]:.8f}  skimage/fastMRI {expected[key]:.8f}  "
              f"|diff| {abs(got[key] - expected[key]):.2e}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
