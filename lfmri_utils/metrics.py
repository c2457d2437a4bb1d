"""Reconstruction metrics with fastMRI's definitions (`fastmri/evaluate.py`), in torch.

All metrics compare a predicted magnitude VOLUME with a reference volume, slices along the first axis:
inputs are `[S, H, W]` or `[S, 1, H, W]` (a single `[H, W]` slice is a volume of one slice).

- SSIM: scikit-image's `structural_similarity` on each slice (7x7 uniform window: `SSIM_WIN_SIZE`, defined
  in `lfmri_utils.volumes`, where it is also the smallest slice every lfmri entry takes; K1 = 0.01, K2 = 0.03,
  sample covariance, the mean over the "valid" region 3 pixels in from each border), with
  `data_range = ref.max()` of the whole reference volume, averaged over slices.
- PSNR: `10 log10(data_range^2 / MSE)` over the whole volume, `data_range = ref.max()` (dB).
- NMSE: `||pred - ref||^2 / ||ref||^2` over the whole volume (a fraction, not %).
- `region_metrics`: SSIM and RMSE over the object and over the background apart (where the error sits).

The volume functions return Python floats for one volume; `slice_metrics` gives per-slice arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lfmri_utils.volumes import SSIM_WIN_SIZE

__all__ = [
    "SSIM_WIN_SIZE",
    "nmse_volume",
    "psnr_volume",
    "region_metrics",
    "slice_metrics",
    "ssim_map",
    "ssim_slices",
    "ssim_volume",
]

SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_volume(x: Tensor | np.ndarray, name: str) -> Tensor:
    """`[S,H,W]`, `[S,1,H,W]` or `[H,W]` -> float64 `[S,H,W]`."""
    x = torch.as_tensor(x)
    if x.is_complex():
        raise ValueError(f"{name} must be a real magnitude volume, got a complex tensor")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [S,H,W] or [S,1,H,W], got {tuple(x.shape)}")
    return x.to(torch.float64)


def _pair(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    pred, ref = _as_volume(pred, "pred"), _as_volume(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != ref shape {tuple(ref.shape)}")
    return pred, ref.to(pred.device)


def ssim_slices(
    pred: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float | None = None
) -> Tensor:
    """Per-slice SSIM, float64 `[S]`, as skimage's `structural_similarity(ref[s], pred[s], data_range=...)`.

    `data_range` defaults to `ref.max()` over the whole volume (fastMRI's convention).
    """
    return ssim_map(pred, ref, data_range).mean(dim=(-2, -1))


def ssim_map(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray, data_range: float | None = None) -> Tensor:
    """The SSIM of every 7x7 window, float64 `[S, H - 6, W - 6]` (entry [s, i, j]: the window centred on pixel
    (i + 3, j + 3)); its mean per slice is `ssim_slices`."""
    pred, ref = _pair(pred, ref)
    if min(ref.shape[-2:]) < SSIM_WIN_SIZE:
        w = SSIM_WIN_SIZE
        raise ValueError(f"SSIM needs slices of at least {w}x{w}, got {tuple(ref.shape[-2:])}")
    L = ref.max() if data_range is None else torch.as_tensor(data_range, dtype=torch.float64)
    c1, c2 = (SSIM_K1 * L) ** 2, (SSIM_K2 * L) ** 2
    n_px = SSIM_WIN_SIZE**2
    cov_norm = n_px / (n_px - 1)  # skimage's use_sample_covariance=True

    x, y = ref[:, None], pred[:, None]  # [S,1,H,W]
    # a 7x7 box mean without padding is skimage's uniform filter on the cropped ("valid") region
    means = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), SSIM_WIN_SIZE, stride=1)
    ux, uy, uxx, uyy, uxy = means.unbind(dim=1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def region_metrics(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray,
                   threshold: float = 0.1) -> dict[str, float]:
    """Where the error sits: SSIM (mean of `ssim_map`, volume data range) and RMSE (normalised units) over the
    object, pixels whose reference is above `threshold` times its slice's maximum, and over the background,
    the others (windows counted by their centre pixel). Keys `ssim_object`, `ssim_background`,
    `rmse_object`, `rmse_background`, `background_fraction` (a region with no pixel gives NaN)."""
    pred, ref = _pair(pred, ref)
    obj = ref > threshold * ref.amax(dim=(-2, -1), keepdim=True)
    h = SSIM_WIN_SIZE // 2
    smap, inner = ssim_map(pred, ref), obj[:, h:-h, h:-h]
    err = (pred - ref) ** 2
    return {"ssim_object": float(smap[inner].mean()), "ssim_background": float(smap[~inner].mean()),
            "rmse_object": float(err[obj].mean().sqrt()), "rmse_background": float(err[~obj].mean().sqrt()),
            "background_fraction": float((~obj).double().mean())}


def ssim_volume(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """fastMRI's volume SSIM: the mean over slices of per-slice SSIM with `data_range = ref.max()`."""
    return float(ssim_slices(pred, ref).mean())


def psnr_volume(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """fastMRI's PSNR in dB over the whole volume, `data_range = ref.max()`; inf when pred == ref."""
    pred, ref = _pair(pred, ref)
    mse = torch.mean((ref - pred) ** 2)
    return float(10 * torch.log10(ref.max() ** 2 / mse))


def nmse_volume(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """fastMRI's NMSE `||pred - ref||^2 / ||ref||^2` over the whole volume (fraction)."""
    pred, ref = _pair(pred, ref)
    return float(torch.sum((ref - pred) ** 2) / torch.sum(ref**2))


def slice_metrics(pred: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice SSIM, PSNR (dB) and NMSE (fraction) of a volume, float64 `[S]` each, every slice normalised
    by the VOLUME (for the spread over a single subject's slices): SSIM and PSNR with `data_range = ref.max()`
    of the volume, NMSE = the slice's squared error over the volume's mean energy per slice
    (`||ref||^2 / S`). The means over slices of SSIM and NMSE are `ssim_volume` and `nmse_volume`; PSNR's is
    the mean slice PSNR (inf for a perfect slice). A slice's own energy is not used: near-empty edge slices
    would dominate."""
    pred, ref = _pair(pred, ref)
    se = ((ref - pred) ** 2).flatten(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        psnr = (10 * torch.log10(ref.max() ** 2 / se.mean(dim=1))).cpu().numpy()
        nmse = (se.sum(dim=1) / ((ref**2).sum() / ref.shape[0])).cpu().numpy()
    return {"ssim": ssim_slices(pred, ref).cpu().numpy(), "psnr": psnr, "nmse": nmse}

