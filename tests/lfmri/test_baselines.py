"""Baselines: the measurement they get, the image denoisers on a real noisy MR image (magnitude and complex),
tuning picks the best grid point, the registry and the optional BM3D extra."""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI
from skimage.metrics import structural_similarity

from degradations import Measurement, fft2c, ifft2c, make_regime, neutral_params
from degradations.b0 import segment_count
from lfmri.baselines import (
    BASELINES,
    BM3D_MISSING,
    Baseline,
    available_baselines,
    parse_baselines,
    tune_baseline,
    tune_baselines,
)
from lfmri_utils.errors import InputError

HAS_BM3D = importlib.util.find_spec("bm3d") is not None
pytestmark = pytest.mark.usefixtures("one_thread")


def _ssim(pred: np.ndarray, ref: np.ndarray) -> float:
    """fastMRI's SSIM (7x7 uniform window, data range = reference volume max), as the test oracle."""
    rng = float(ref.max())
    pairs = zip(pred, ref, strict=True)
    return float(np.mean([structural_similarity(p, r, data_range=rng, win_size=7) for p, r in pairs]))


def _psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(ref.max() ** 2 / np.mean((pred - ref) ** 2)))


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """Three axial MNI slices cropped to [3, 96, 96] (brain and background), normalised to their 99th
    percentile."""
    vol = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)[:, :, 50:80:10].transpose(2, 0, 1)
    return (vol / np.percentile(vol, 99))[:, 50:146, 10:106].copy()


def _measure(ref: np.ndarray, sigma: float, seed: int, known: bool = True) -> Measurement:
    """Fully sampled k-space of the real images ref [S,H,W] plus complex noise of std sigma per sample."""
    x = torch.from_numpy(ref).to(torch.complex64)[:, None]
    g = torch.Generator().manual_seed(seed)
    noise = torch.complex(torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g))
    noise = sigma / math.sqrt(2) * noise
    params = neutral_params(x.shape[0], *x.shape[-2:])
    params.pop("noise_sigma")
    return Measurement.from_kspace(fft2c(x) + noise, params, sigma if known else None)


def test_measurement_takes_the_known_noise_level_or_estimates_it(mni: np.ndarray) -> None:
    known = _measure(mni, 0.1, 0)
    assert known.noise_sigma.tolist() == pytest.approx([0.1] * 3)
    assert known.image_sigma == pytest.approx([0.1 / math.sqrt(2)] * 3)
    noise = (known.degraded[:, 0] - torch.from_numpy(mni)).numpy()
    assert np.std(noise.real) == pytest.approx(0.1 / math.sqrt(2), rel=0.05)  # sigma / sqrt(2) per channel
    estimated = _measure(mni, 0.1, 0, known=False)
    assert estimated.noise_sigma.tolist() == pytest.approx([0.1] * 3, rel=0.1)
    assert known.degraded.shape == (3, 1, 96, 96) and known.magnitude().shape == (3, 96, 96)
    np.testing.assert_allclose(known.magnitude(), known.degraded[:, 0].abs().numpy(), rtol=1e-6)


def test_measurement_refuses_an_all_empty_stack_and_fills_one_empty_slice() -> None:
    params = neutral_params(2, 8, 8)
    params.pop("noise_sigma")
    with pytest.raises(InputError, match="noise level"):
        Measurement.from_kspace(torch.zeros(2, 1, 8, 8, dtype=torch.complex64), params)
    y = torch.zeros(2, 1, 8, 8, dtype=torch.complex64)
    y[1] = torch.randn(1, 8, 8, dtype=torch.complex64)
    m = Measurement.from_kspace(y, params)
    assert m.noise_sigma[0] == m.noise_sigma[1] > 0


def test_measurement_resolves_one_number_of_b0_segments_for_the_stack() -> None:
    x = torch.ones(3, 1, 16, 16, dtype=torch.complex64)
    y, params = make_regime("noise_blur_t2star_b0")(x, torch.Generator().manual_seed(0))
    m = Measurement.simulated(y, params, make_regime("noise_blur_t2star_b0"))
    assert m.n_segments == segment_count(params["b0_map_hz"], params["readout_ms"], 16)
    assert m.operator(slice(1, 2)).encoding.n_segments == m.n_segments
    torch.testing.assert_close(m.operator().forward(x), make_regime("noise_blur_t2star_b0").operator(
        params).forward(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["tv", "nlm", "tv_complex", "nlm_complex", "tv_model"])
def test_tuned_baseline_improves_ssim_of_a_noisy_real_image(mni: np.ndarray, name: str) -> None:
    val_ref, test_ref = mni[:2], mni[2:]
    tuned = tune_baseline(BASELINES[name], {"val": (_measure(val_ref, 0.16, 0), val_ref)}, _ssim)
    m = _measure(test_ref, 0.16, 1)
    denoised = BASELINES[name](m, **tuned.params)
    assert denoised.shape == test_ref.shape and denoised.dtype == np.float32
    assert _ssim(denoised, test_ref) > _ssim(m.magnitude(), test_ref) + 0.05


@pytest.mark.parametrize("name", ["tv", "nlm"])
def test_complex_denoising_avoids_the_rician_bias_of_the_magnitude(mni: np.ndarray, name: str) -> None:
    m = _measure(mni[:1], 0.3, 2)  # low SNR: the magnitude's background is biased to ~0.37, not 0
    magnitude, complex_ = BASELINES[name](m), BASELINES[f"{name}_complex"](m)
    assert _psnr(complex_, mni[:1]) > _psnr(magnitude, mni[:1]) + 3.0


def test_degraded_baseline_is_the_magnitude_of_the_degraded_image(mni: np.ndarray) -> None:
    m = _measure(mni[:1], 0.05, 0)
    out = BASELINES["degraded"](m)
    np.testing.assert_allclose(out, ifft2c(m.y)[:, 0].abs().numpy(), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32


def test_a_noise_free_measurement_is_left_alone(mni: np.ndarray) -> None:
    m = _measure(mni[:1], 0.0, 0)
    for name in ("tv", "tv_complex", "nlm", "nlm_complex"):
        np.testing.assert_allclose(BASELINES[name](m), mni[:1], atol=1e-5)


def test_tuning_picks_the_grid_point_with_the_best_mean_score() -> None:
    shift = Baseline("shift", lambda m, offset, scale: m.magnitude() * scale + offset,
                     {"offset": (-1.0, 0.25, 2.0)}, {"offset": 0.0, "scale": 1.0})
    zero = _measure(np.zeros((1, 4, 4), np.float32), 0.0, 0)
    vols = {"a": (zero, np.full((1, 4, 4), 0.5)), "b": (zero, np.zeros((1, 4, 4)))}
    result = tune_baseline(shift, vols, lambda p, r: -float(np.abs(p - r).mean()))
    assert result.params == {"offset": 0.25, "scale": 1.0}  # the defaults fill what the grid does not tune
    assert result.volume_ids == ["a", "b"]
    assert [p["offset"] for p, _ in result.scores] == [-1.0, 0.25, 2.0]
    assert shift(zero).max() == 0.0 and shift(zero, offset=2.0).min() == 2.0


def test_tune_baselines_sees_only_the_volumes_it_is_given(mni: np.ndarray) -> None:
    seen: list[int] = []

    def metric(pred: np.ndarray, ref: np.ndarray) -> float:
        seen.append(id(ref))
        return _ssim(pred, ref)

    vols = {"noise": {"val-1": (_measure(mni[:1], 0.1, 0), mni[:1])}}
    out = tune_baselines(["degraded", "tv"], vols, metric)
    assert set(out) == {"noise"} and set(out["noise"]) == {"degraded", "tv"}
    assert out["noise"]["tv"].volume_ids == ["val-1"]
    assert set(seen) == {id(vols["noise"]["val-1"][1])}
    assert out["noise"]["degraded"].params == {}


def test_every_baseline_has_defaults_inside_its_grid() -> None:
    for b in BASELINES.values():
        assert set(b.defaults) == set(b.grid)
        assert all(b.defaults[k] in b.grid[k] for k in b.grid)


def test_parse_baselines(monkeypatch: pytest.MonkeyPatch) -> None:
    core = ["degraded", "tv", "nlm", "tv_complex", "nlm_complex", "tv_model"]
    assert [n for n in parse_baselines("all") if n in core] == core
    assert parse_baselines("none") == ["degraded"]
    assert parse_baselines("nlm, tv,nlm") == ["degraded", "nlm", "tv"]
    with pytest.raises(ValueError, match="unknown baseline.*bogus"):
        parse_baselines("tv,bogus")
    missing = dataclasses.replace(BASELINES["bm3d"], module="lfmri_no_such_module")
    monkeypatch.setitem(BASELINES, "bm3d", missing)
    assert "bm3d" not in parse_baselines("all") and "bm3d" not in available_baselines()
    with pytest.raises(ValueError, match=r"pip install 'lfmri\[bm3d\]'") as err:
        parse_baselines("tv,bm3d")
    assert "\n" not in str(err.value) and "non-commercial" in str(err.value)


def test_bm3d_without_the_extra_says_how_to_install_it(mni: np.ndarray, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d -> ImportError
    for name in ("bm3d", "bm3d_complex"):
        with pytest.raises(ModuleNotFoundError) as err:
            BASELINES[name](_measure(mni[:1], 0.1, 0))
        assert str(err.value) == BM3D_MISSING and "lfmri[bm3d]" in BM3D_MISSING


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BM3D, reason="the optional bm3d extra is not installed")
def test_bm3d_denoises_the_magnitude_and_the_complex_image(mni: np.ndarray) -> None:
    ref = mni[:1, :48, :48]
    m = _measure(ref, 0.2, 3)
    assert {"bm3d", "bm3d_complex"} <= set(parse_baselines("all"))
    noisy = _ssim(m.magnitude(), ref)
    magnitude, complex_ = BASELINES["bm3d"](m), BASELINES["bm3d_complex"](m)
    assert magnitude.shape == complex_.shape == ref.shape and complex_.dtype == np.float32
    assert _ssim(magnitude, ref) > noisy + 0.05 and _ssim(complex_, ref) > noisy + 0.05
    assert _psnr(complex_, ref) > _psnr(magnitude, ref)
