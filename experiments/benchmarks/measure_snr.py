"""Independent SNR check of `lfmri degrade --kspace-out` (numpy only, no lfmri code): the k-space noise
y - fft2c(clean) against the definition snr_db = 10 log10(mean |x|^2 over |x| > 0.1 p99 / noise variance).

    python experiments/benchmarks/measure_snr.py CLEAN.nii.gz K.h5   # slices along axis 2
"""

import sys

import h5py
import nibabel as nib
import numpy as np


def fft2c(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D FFT over the last two axes."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def main(clean_path: str, kspace_path: str) -> None:
    clean = np.moveaxis(np.asarray(nib.load(clean_path).dataobj, dtype=np.float64), 2, 0)  # [S, H, W]
    with h5py.File(kspace_path) as f:
        y = f["kspace"][()].astype(np.complex128)
    noise = y - fft2c(clean)
    nvar = (np.abs(noise) ** 2).mean(axis=(1, 2))
    snr, fg_sum, fg_n = [], 0.0, 0
    for s in range(clean.shape[0]):
        a = np.abs(clean[s])
        m = a > 0.1 * np.percentile(a, 99)
        if m.any():
            snr.append(10 * np.log10((a[m] ** 2).mean() / nvar[s]))
            fg_sum, fg_n = fg_sum + (a[m] ** 2).sum(), fg_n + m.sum()
    snr = np.array(snr)
    print(f"slices with foreground: {len(snr)} of {clean.shape[0]}; real/imag noise variance ratio "
          f"{noise.real.var() / noise.imag.var():.4f}")
    print(f"per-slice SNR: mean {snr.mean():.3f} dB, median {np.median(snr):.3f}, "
          f"range [{snr.min():.3f}, {snr.max():.3f}] dB")
    print(f"volume SNR (pooled foreground power / mean noise variance): "
          f"{10 * np.log10(fg_sum / fg_n / nvar.mean()):.3f} dB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
