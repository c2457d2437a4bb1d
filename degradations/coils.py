"""Receive coils: simulated and estimated sensitivity maps, coil noise covariance and whitening, RSS.

SigPy is imported inside the functions that use it: importing it (and numba) takes ~2 s, which every user
of `degradations` would otherwise pay.

Sensitivity maps `s` `[C, H, W]` (or `[B, C, H, W]`) are complex64 and normalised so that
`sum_c |s_c|^2 = 1` wherever there is signal (0 outside ESPIRiT's support): the coil-combined image
`x = sum_c conj(s_c) x_c` of coil images `x_c = s_c x` is then `x` itself.
"""

from __future__ import annotations

import numpy as np
import torch

from degradations.fourier import ifft2c
from lfmri_utils.errors import InputError

__all__ = ["birdcage_sensitivities", "CoilSensitivities", "espirit_sensitivities", "calibration_width",
           "espirit_kernel_width", "noise_covariance", "whitening_matrix", "root_sum_of_squares",
           "MIN_CALIB_WIDTH", "MAX_CALIB_WIDTH", "MIN_KERNEL_WIDTH", "MAX_KERNEL_WIDTH"]

#: ESPIRiT's calibration square: at least 8 k-space lines, at most 24 used
MIN_CALIB_WIDTH = 8
MAX_CALIB_WIDTH = 24
#: ESPIRiT's kernel: 6 wide (SigPy's default) where the calibration square allows, narrower below 13 lines
MAX_KERNEL_WIDTH = 6
#: the calibration square must exceed the kernel by this many lines (the calibration matrix has
#: (calib_width - kernel + 1)^2 rows: 64 from 11 lines, 36 at 8 with MIN_KERNEL_WIDTH, the narrowest kernel).
#: Measured with 8 birdcage coils on Colin27 slices (40 x 47, 64 x 64, 181 x 217; 8-14 centre lines): with a
#: margin under 5 the maps covered 0-99 % of the brain (SigPy's kernel 6: none with 8-10 lines, 87-90 % with
#: 11, 99 % with 12), with 5-7 and more all of it, equal to the true maps up to a phase (mean
#: |<s, s_true>| >= 0.997 with kernel 3 at 8 lines, 0.9995 with kernel 6 at 13)
KERNEL_MARGIN = 7
MIN_KERNEL_WIDTH = 3


def birdcage_sensitivities(n_coils: int, height: int, width: int) -> torch.Tensor:
    """Simulated birdcage coil maps, complex64 `[C, H, W]` (SigPy's `sigpy.mri.birdcage_maps` with its
    defaults: `C` coils on a ring of relative radius 1.5 around the field of view, `1 / distance` magnitude).

    SigPy divides by the root-sum-of-squares, so `sum_c |s_c|^2 = 1` at every pixel (the maps are nonzero
    everywhere).
    """
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    import sigpy.mri

    return torch.from_numpy(sigpy.mri.birdcage_maps((n_coils, height, width), dtype=np.complex64))


class CoilSensitivities:
    """Multi-coil reception as a degradation step: fixed birdcage maps (`birdcage_sensitivities`).

    Args:
        n_coils: number of receive coils (>= 1).
    """

    def __init__(self, n_coils: int) -> None:
        if n_coils < 1:
            raise ValueError(f"n_coils must be >= 1, got {n_coils}")
        self.n_coils = int(n_coils)

    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`{"sensitivities": complex64 [B, C, H, W]}`: the same maps for every slice (no draw; `generator`
        is accepted for the steps' common interface)."""
        maps = birdcage_sensitivities(self.n_coils, height, width).to(device)
        return {"sensitivities": maps.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()}


def calibration_width(kspace: np.ndarray) -> int:
    """Side of the largest fully sampled centred k-space square ESPIRiT can use, capped at 24.

    `kspace` is `[C, H, W]`; a sample counts as measured where any coil is nonzero. The square of side `w`
    is the one SigPy's `resize` crops (rows `H // 2 - w // 2 ...`, same for columns), so for a Cartesian
    mask `w` is the number of contiguous sampled centre rows (at most 24 and `W`). InputError when it is
    under 8.
    """
    sampled = np.any(kspace != 0, axis=0)
    height, width = sampled.shape
    best = 0
    for w in range(1, min(MAX_CALIB_WIDTH, height, width) + 1):
        r0, c0 = height // 2 - w // 2, width // 2 - w // 2
        if not sampled[r0:r0 + w, c0:c0 + w].all():
            break
        best = w
    if best < MIN_CALIB_WIDTH:
        raise InputError(f"k-space: the fully sampled centre is {best} lines wide, ESPIRiT needs at least "
                         f"{MIN_CALIB_WIDTH} (sample more centre lines or pass the sensitivity maps)")
    return best


def espirit_kernel_width(calib_width: int) -> int:
    """ESPIRiT's kernel width for a calibration square of side `calib_width` (>= `MIN_CALIB_WIDTH`):
    `calib_width - KERNEL_MARGIN` clipped to [3, 6] (6 from 13 lines, 3 up to 10), so that the calibration
    matrix has enough rows to find the coils' signal subspace."""
    if calib_width < MIN_CALIB_WIDTH:
        raise ValueError(f"calib_width must be >= {MIN_CALIB_WIDTH}, got {calib_width}")
    return max(MIN_KERNEL_WIDTH, min(MAX_KERNEL_WIDTH, calib_width - KERNEL_MARGIN))


def espirit_sensitivities(kspace: np.ndarray, calib_width: int | None = None, threshold: float = 0.02,
                          crop: float = 0.95, real_image: bool = True) -> np.ndarray:
    """ESPIRiT coil maps, complex64 `[C, H, W]`, from (undersampled) multi-coil k-space `[C, H, W]`.

    Runs `sigpy.mri.app.EspiritCalib` on the CPU (kernel `espirit_kernel_width(calib_width)`: 6 from 13
    lines, narrower down to 3 at 8-10; one set of maps) on the centred
    `calib_width x calib_width` calibration square (None = `calibration_width(kspace)`).
    `threshold` keeps the calibration matrix's singular values above that fraction of the largest; `crop`
    zeroes the maps where the eigenvalue is below it. Maps are normalised to `sum_c |s_c|^2 = 1` inside
    that support, 0 outside. k-space follows `degradations.fft2c` (centred, orthonormal). InputError when
    the maps are zero everywhere (no consistent coil signal in the calibration square).

    `real_image` (default): the maps' common phase per pixel (ESPIRiT's is coil 0's) is set so that the
    coil-combined image is about real: the maps are multiplied by the phase of the low-resolution combined
    image (the calibration square, Hann-windowed). The priors are trained on real images; with coil 0's
    phase the combined image of 8 birdcage coils carries a phase the prior does not expect (three Colin27
    slices, 30 dB, the default sampler: fully sampled 30.9 dB PSNR instead of 42.3 dB, as with the true maps;
    4x, warm_ddim: 18.8 dB instead of 27.4 dB).
    """
    kspace = np.asarray(kspace)
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise InputError(f"k-space: expected complex [C, H, W], got {kspace.dtype} {kspace.shape}")
    if not np.isfinite(kspace).all():
        raise InputError("k-space: contains NaN or infinite values")
    if calib_width is None:
        calib_width = calibration_width(kspace)
    elif not (MIN_CALIB_WIDTH <= calib_width <= min(kspace.shape[1:])):
        raise ValueError(f"calib_width must be in [{MIN_CALIB_WIDTH}, min(H, W)], got {calib_width}")
    import sigpy.mri.app

    # single precision: ~1.6x faster than double, the same maps to ~1e-6 (2e-7 measured)
    maps = sigpy.mri.app.EspiritCalib(kspace.astype(np.complex64), calib_width=calib_width, thresh=threshold,
                                      kernel_width=espirit_kernel_width(calib_width), crop=crop,
                                      show_pbar=False).run()
    # SigPy's maps have unit norm already, up to rounding (NaN where coil 0 is exactly 0): renormalise
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    if not (rss > 0).any():
        raise InputError(f"k-space: ESPIRiT found no coil maps in the {calib_width}-line calibration square "
                         f"(eigenvalues all below crop = {crop}; pass the sensitivity maps)")
    maps = np.where(rss > 0, maps / np.where(rss > 0, rss, 1), 0)
    if real_image:
        maps = maps * np.exp(1j * np.angle(_low_resolution_image(kspace, maps, calib_width)))
    return maps.astype(np.complex64)


def _low_resolution_image(kspace: np.ndarray, maps: np.ndarray, calib_width: int) -> np.ndarray:
    """The coil-combined image `[H, W]` of the centred `calib_width` square of `kspace` `[C, H, W]` under a
    separable Hann window (a smooth image whose phase is the object's low-resolution phase)."""
    height, width = kspace.shape[1:]
    window = np.zeros((height, width))
    r0, c0 = height // 2 - calib_width // 2, width // 2 - calib_width // 2
    hann = np.hanning(calib_width + 2)[1:-1]
    window[r0:r0 + calib_width, c0:c0 + calib_width] = np.outer(hann, hann)
    coil_images = ifft2c(torch.from_numpy((kspace * window).astype(np.complex64))).numpy()
    return np.sum(maps.conj() * coil_images, axis=0)


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Coil noise covariance `Psi = X X^H / N` `[C, C]` (complex128) of zero-mean noise samples `X` `[C, N]`
    (e.g. a noise pre-scan, or k-space corners without signal); the mean is not removed."""
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] < samples.shape[0]:
        raise InputError(f"noise samples: expected [C, N] with N >= C, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise InputError("noise samples: contain NaN or infinite values")
    x = samples.astype(np.complex128)
    return x @ x.conj().T / x.shape[1]


def whitening_matrix(cov: np.ndarray) -> np.ndarray:
    """Prewhitening matrix `W = sqrt(mean(diag(Psi))) L^-1` `[C, C]` (complex128), `Psi = L L^H` (Cholesky).

    `W Psi W^H = mean(diag(Psi)) I`: applied to coil data (`W @ y` over the coil axis) and to the
    sensitivities, it decorrelates the coils and keeps the mean noise variance per coil.
    """
    cov = np.asarray(cov, dtype=np.complex128)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not np.isfinite(cov).all():
        raise InputError(f"noise covariance: expected a finite square [C, C] matrix, got shape {cov.shape}")
    if not np.allclose(cov, cov.conj().T, rtol=1e-6, atol=1e-12 * np.abs(cov).max()):
        raise InputError("noise covariance: not Hermitian")
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise InputError("noise covariance: not positive definite") from None
    scale = np.sqrt(np.mean(np.real(np.diag(cov))))
    return scale * np.linalg.inv(chol)


def root_sum_of_squares(coil_images: torch.Tensor) -> torch.Tensor:
    """Root-sum-of-squares combination `sqrt(sum_c |x_c|^2)`: `[..., C, H, W]` -> real `[..., H, W]`."""
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=-3))
