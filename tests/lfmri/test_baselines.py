"""Baselines: they denoise a real noisy MR image, tuning picks the best grid point, the noise estimate."""

from __future__ import annotations

import importlib.resources

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from lfmri.baselines import (
    BASELINES,
    Baseline,
    estimate_noise_sigma,
    parse_baselines,
    tune_baseline,
    tune_baselines,
)

MNI = importlib.resources.files("nilearn") / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _ssim(pred: np.ndarray, ref: np.ndarray) -> float:
    """fastMRI's SSIM (7x7 uniform window, data range = reference volume max), as the test oracle."""
    rng = float(ref.max())
    pairs = zip(pred, ref, strict=True)
    return float(np.mean([structural_similarity(p, r, data_range=rng, win_size=7) for p, r in pairs]))


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """Three axial MNI slices [3, 197, 233], normalised to their 99th percentile."""
    vol = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)[:, :, 50:80:10].transpose(2, 0, 1)
    return vol / np.percentile(vol, 99)


def _rician(ref: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = sigma * (rng.standard_normal(ref.shape) + 1j * rng.standard_normal(ref.shape))
    return np.abs(ref + noise).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_noise_estimate_matches_the_added_noise(mni: np.ndarray, sigma: float) -> None:
    noisy = mni + sigma * np.random.default_rng(1).standard_normal(mni.shape)
    for s in noisy:
        assert estimate_noise_sigma(s) == pytest.approx(sigma, rel=0.15)


@pytest.mark.parametrize("name", ["tv", "nlm"])
def test_tuned_baseline_improves_ssim_of_a_noisy_real_image(mni: np.ndarray, name: str) -> None:
    val_ref, test_ref = mni[:2], mni[2:]
    tuned = tune_baseline(BASELINES[name], {"val": (_rician(val_ref, 0.08, 0), val_ref)}, _ssim)
    noisy = _rician(test_ref, 0.08, 1)
    denoised = BASELINES[name](noisy, **tuned.params)
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    assert _ssim(denoised, test_ref) > _ssim(noisy, test_ref) + 0.05


def test_degraded_baseline_is_the_identity(mni: np.ndarray) -> None:
    out = BASELINES["degraded"](mni)
    np.testing.assert_array_equal(out, mni)
    assert out is not mni


def test_tuning_picks_the_grid_point_with_the_best_mean_score() -> None:
    shift = Baseline("shift", lambda v, offset: v + offset, {"offset": (-1.0, 0.25, 2.0)})
    zero = np.zeros((1, 4, 4))
    vols = {"a": (zero, np.full((1, 4, 4), 0.5)), "b": (zero, zero)}
    result = tune_baseline(shift, vols, lambda p, r: -float(np.abs(p - r).mean()))
    assert result.params == {"offset": 0.25}
    assert result.subjects == ["a", "b"]
    assert [p for p, _ in result.scores] == shift.candidates()


def test_tune_baselines_sees_only_the_volumes_it_is_given(mni: np.ndarray) -> None:
    seen: list[int] = []

    def metric(pred: np.ndarray, ref: np.ndarray) -> float:
        seen.append(id(ref))
        return _ssim(pred, ref)

    vols = {"noise": {"val-1": (_rician(mni[:1], 0.05, 0), mni[:1])}}
    out = tune_baselines(["degraded", "tv"], vols, metric)
    assert set(out) == {"noise"} and set(out["noise"]) == {"degraded", "tv"}
    assert out["noise"]["tv"].subjects == ["val-1"]
    assert set(seen) == {id(vols["noise"]["val-1"][1])}
    assert out["noise"]["degraded"].params == {}


def test_parse_baselines() -> None:
    assert parse_baselines("all") == ["degraded", "tv", "nlm"]
    assert parse_baselines("none") == ["degraded"]
    assert parse_baselines("nlm, tv") == ["degraded", "nlm", "tv"]
    with pytest.raises(ValueError, match="bm3d"):
        parse_baselines("tv,bm3d")
