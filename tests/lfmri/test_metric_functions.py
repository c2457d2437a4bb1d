"""fastMRI metrics against scikit-image / numpy oracles on a real MRI volume (nilearn's MNI152 T1)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lfmri_utils.metrics import (
    nmse_volume,
    psnr_volume,
    region_metrics,
    slice_metrics,
    ssim_slices,
    ssim_volume,
)


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """A crop of the MNI template, axial slices first: float32 [12, 120, 100]."""
    data = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(data, 2, 0)[70:82, 40:160, 50:150])


def _noisy(ref: np.ndarray, rel_sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(ref + rng.normal(0, rel_sigma * ref.max(), ref.shape)).astype(np.float32)


def _oracle(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """fastMRI's evaluate.py definitions, computed with skimage / numpy on float64 copies."""
    ref64, pred64 = ref.astype(np.float64), pred.astype(np.float64)
    L = ref64.max()
    ssim = np.mean([structural_similarity(r, p, data_range=L) for r, p in zip(ref64, pred64, strict=True)])
    psnr = peak_signal_noise_ratio(ref64, pred64, data_range=L)
    nmse = np.linalg.norm(ref64 - pred64) ** 2 / np.linalg.norm(ref64) ** 2
    return {"ssim": ssim, "psnr": psnr, "nmse": nmse}


def test_slice_metrics_use_the_volume_range_slice_by_slice(mni: np.ndarray) -> None:
    pred = _noisy(mni, 0.05, seed=3)
    per = slice_metrics(pred, mni)
    assert all(v.shape == (mni.shape[0],) for v in per.values())
    L = float(mni.astype(np.float64).max())
    for s in (0, 5, 11):  # each slice against skimage / numpy with the VOLUME's data range
        ref64, pred64 = mni[s].astype(np.float64), pred[s].astype(np.float64)
        assert per["ssim"][s] == pytest.approx(structural_similarity(ref64, pred64, data_range=L), abs=1e-6)
        assert per["psnr"][s] == pytest.approx(peak_signal_noise_ratio(ref64, pred64, data_range=L), abs=1e-5)
        energy = (mni.astype(np.float64) ** 2).sum() / mni.shape[0]  # the volume's mean energy per slice
        assert per["nmse"][s] == pytest.approx(((ref64 - pred64) ** 2).sum() / energy, rel=1e-6)
    assert per["ssim"].mean() == pytest.approx(ssim_volume(pred, mni), abs=1e-9)
    assert per["nmse"].mean() == pytest.approx(nmse_volume(pred, mni), rel=1e-6)


@pytest.mark.parametrize("rel_sigma", [0.01, 0.05, 0.2])
def test_functions_match_skimage_on_mni(mni: np.ndarray, rel_sigma: float) -> None:
    pred = _noisy(mni, rel_sigma, seed=1)
    oracle = _oracle(pred, mni)
    assert abs(ssim_volume(pred, mni) - oracle["ssim"]) < 1e-6
    assert abs(psnr_volume(pred, mni) - oracle["psnr"]) < 1e-6
    assert abs(nmse_volume(pred, mni) - oracle["nmse"]) < 1e-8


def test_per_slice_ssim_matches_skimage_float32(mni: np.ndarray) -> None:
    """skimage computes float32 inputs in float32: still within 1e-4 of our float64 values."""
    pred = _noisy(mni, 0.1, seed=2)
    ours = ssim_slices(torch.from_numpy(pred), torch.from_numpy(mni)).numpy()
    theirs = [structural_similarity(r, p, data_range=mni.max()) for r, p in zip(mni, pred, strict=True)]
    assert np.abs(ours - theirs).max() < 1e-4


def test_ssim_uses_the_volume_max_not_the_slice_max(mni: np.ndarray) -> None:
    pred = _noisy(mni, 0.1, seed=3)
    per_slice_range = np.mean(
        [structural_similarity(r, p, data_range=r.max()) for r, p in zip(mni, pred, strict=True)]
    )
    s = ssim_volume(pred, mni)
    assert abs(s - per_slice_range) > 1e-4  # the convention matters on this volume
    assert abs(s - _oracle(pred, mni)["ssim"]) < 1e-6


def test_identities_and_shapes(mni: np.ndarray) -> None:
    ref = torch.from_numpy(mni)
    assert ssim_volume(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert nmse_volume(ref, ref) == 0.0
    assert psnr_volume(ref, ref) == float("inf")
    pred = torch.from_numpy(_noisy(mni, 0.05, seed=4))
    assert ssim_volume(pred[:, None], ref[:, None]) == pytest.approx(ssim_volume(pred, ref), abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        ssim_volume(pred[:, :50], ref)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim_volume(pred[:, :5, :5], ref[:, :5, :5])


def test_more_noise_scores_worse(mni: np.ndarray) -> None:
    low, high = _noisy(mni, 0.02, seed=5), _noisy(mni, 0.2, seed=5)
    assert ssim_volume(low, mni) > ssim_volume(high, mni)
    assert psnr_volume(low, mni) > psnr_volume(high, mni)
    assert nmse_volume(low, mni) < nmse_volume(high, mni)


def test_region_metrics_put_the_error_where_it_is(mni: np.ndarray) -> None:
    """Noise added only to the background lowers the background's SSIM and RMSE and leaves the object's."""
    ref = torch.nn.functional.pad(torch.as_tensor(mni[:4], dtype=torch.float64), (20, 20, 20, 20))  # + empty
    obj = ref > 0.1 * ref.amax(dim=(-2, -1), keepdim=True)
    noise = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(0))
    noisy_bg = ref + torch.where(obj, 0.0, 0.05 * float(ref.max()) * noise)
    perfect, m = region_metrics(ref, ref), region_metrics(noisy_bg, ref)
    assert perfect["ssim_object"] == pytest.approx(1) and perfect["rmse_background"] == 0
    assert m["rmse_object"] == 0 and m["rmse_background"] == pytest.approx(0.05 * float(ref.max()), rel=0.05)
    assert m["ssim_background"] < 0.5 < m["ssim_object"]
    assert m["background_fraction"] == pytest.approx(float((~obj).double().mean()))
