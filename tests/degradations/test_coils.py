"""Coil sensitivities (birdcage, ESPIRiT), coil noise covariance and whitening, root-sum-of-squares."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from degradations import fft2c
from degradations.coils import (
    CoilSensitivities,
    birdcage_sensitivities,
    calibration_width,
    espirit_kernel_width,
    espirit_sensitivities,
    noise_covariance,
    root_sum_of_squares,
    whitening_matrix,
)
from degradations.masks import cartesian_mask
from lfmri_utils.errors import InputError

COLIN27 = Path(__file__).resolve().parents[2] / "datamodules" / "data" / "colin27_ch2.nii.gz"


def _colin27_slice(size: int = 256) -> torch.Tensor:
    """Axial slice 90 of the bundled Colin27 brain in [0, 1], zero-padded to `size x size` (>= 217)."""
    axial = np.asarray(nib.load(COLIN27).dataobj[:, :, 90], dtype=np.float32).T  # [217, 181]
    img = np.zeros((size, size), np.float32)
    r0, c0 = (size - axial.shape[0]) // 2, (size - axial.shape[1]) // 2
    img[r0:r0 + axial.shape[0], c0:c0 + axial.shape[1]] = axial / axial.max()
    return torch.from_numpy(img).to(torch.complex64)


def test_birdcage_maps_are_normalised_and_distinct():
    maps = birdcage_sensitivities(8, 40, 48)
    assert maps.shape == (8, 40, 48) and maps.dtype == torch.complex64
    torch.testing.assert_close(maps.abs().pow(2).sum(0), torch.ones(40, 48), rtol=0, atol=1e-5)
    assert bool((maps.abs() > 0).all())
    # each coil is brightest near its own position on the ring: the coils' peaks are all different pixels
    peaks = {int(m.abs().argmax()) for m in maps}
    assert len(peaks) == 8
    with pytest.raises(ValueError, match="n_coils"):
        birdcage_sensitivities(0, 8, 8)


def test_coil_sensitivities_step_gives_the_birdcage_maps_per_slice():
    params = CoilSensitivities(4).sample_params(3, 24, 20, torch.Generator().manual_seed(0))
    maps = params["sensitivities"]
    assert maps.shape == (3, 4, 24, 20) and maps.dtype == torch.complex64
    for b in range(3):
        assert torch.equal(maps[b], birdcage_sensitivities(4, 24, 20))
    with pytest.raises(ValueError, match="n_coils"):
        CoilSensitivities(0)


def test_root_sum_of_squares_of_coil_images_is_the_magnitude():
    x = _colin27_slice(224)
    coils = birdcage_sensitivities(6, 224, 224) * x  # sum |s|^2 = 1 -> rss = |x|
    rss = root_sum_of_squares(torch.stack([coils, 2 * coils]))
    assert rss.shape == (2, 224, 224) and not rss.is_complex()
    torch.testing.assert_close(rss[0], x.abs(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rss[1], 2 * x.abs(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("acceleration", [1, 4])
def test_espirit_recovers_birdcage_maps_up_to_a_phase(acceleration):
    x = _colin27_slice(256)
    true_maps = birdcage_sensitivities(8, 256, 256)
    coil_images = true_maps * x
    lines = cartesian_mask("equispaced", 256, acceleration, 0.08, np.random.RandomState(0))
    kspace = fft2c(coil_images).numpy() * lines[None, :, None]
    # fully sampled: ESPIRiT's 24; 4x: the round(256 * 0.08) = 20 centre lines, or more where outer lines
    # happen to extend them; the centred window of that width is sampled, one line more is not (or 24)
    width = calibration_width(kspace)
    assert width == 24 if acceleration == 1 else 20 <= width <= 24
    assert lines[128 - width // 2:128 - width // 2 + width].all()
    assert width == 24 or not lines[128 - (width + 1) // 2:128 - (width + 1) // 2 + width + 1].all()

    maps = espirit_sensitivities(kspace)
    assert maps.shape == (8, 256, 256) and maps.dtype == np.complex64
    est = torch.from_numpy(maps)
    inside = x.abs() > 0.1
    rss = est.abs().pow(2).sum(0)
    torch.testing.assert_close(rss[inside], torch.ones_like(rss[inside]), rtol=0, atol=1e-4)
    # the maps reproduce the (fully sampled) coil images from their combination
    combined = (est.conj() * coil_images).sum(0)
    residual = (est * combined - coil_images).abs().pow(2).sum(0)
    energy = coil_images.abs().pow(2).sum(0)
    assert (residual[inside].sum() / energy[inside].sum()).sqrt() < 0.01
    # and equal the true maps up to one phase per pixel: |<s_est, s_true>| = 1
    overlap = (est * true_maps.conj()).sum(0).abs()[inside]
    assert overlap.min() > 0.99 and overlap.mean() > 0.999


def test_espirit_is_zero_outside_the_object_and_normalised_inside():
    x = torch.zeros(64, 64, dtype=torch.complex64)
    yy, xx = torch.meshgrid(torch.arange(64) - 32, torch.arange(64) - 32, indexing="ij")
    x[(yy ** 2 + xx ** 2) < 20 ** 2] = 1.0
    kspace = fft2c(birdcage_sensitivities(4, 64, 64) * x).numpy()
    maps = espirit_sensitivities(kspace, calib_width=16)
    rss = np.sqrt((np.abs(maps) ** 2).sum(0))
    disc = x.abs().numpy() > 0
    np.testing.assert_allclose(rss[disc], 1.0, atol=1e-4)
    assert rss[0, 0] == 0 and rss[63, 63] == 0  # corners: no signal, no maps


def test_calibration_width_is_the_centred_sampled_square():
    kspace = np.zeros((2, 64, 48), np.complex64)
    kspace[:, 27:37] = 1  # rows 27..36: 10 lines, the centred window of width 10 starts at 32 - 5
    assert calibration_width(kspace) == 10
    kspace[:, 10:60] = 1
    assert calibration_width(kspace) == 24  # at most 24
    kspace[:, 30, 16] = 0  # a hole: inside the centred square of side w once 24 - w // 2 <= 16
    assert calibration_width(kspace) == 15
    kspace[:, 30, 22] = 0  # a hole inside every square wider than 3
    with pytest.raises(InputError, match="3 lines wide"):
        calibration_width(kspace)


def test_espirit_rejects_bad_input():
    with pytest.raises(InputError, match="ESPIRiT needs at least 8"):
        three_lines = np.isin(np.arange(64), [30, 31, 32])[:, None]
        espirit_sensitivities(np.ones((2, 64, 64), np.complex64) * three_lines)
    with pytest.raises(InputError, match="complex"):
        espirit_sensitivities(np.ones((2, 64, 64), np.float32))
    bad = np.ones((2, 64, 64), np.complex64)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        espirit_sensitivities(bad)
    with pytest.raises(ValueError, match="calib_width"):
        espirit_sensitivities(np.ones((2, 64, 64), np.complex64), calib_width=4)


def test_whitening_decorrelates_coil_noise_and_keeps_mean_variance():
    rng = np.random.default_rng(0)
    n_coils, n = 6, 200_000
    mix = rng.standard_normal((n_coils, n_coils)) + 1j * rng.standard_normal((n_coils, n_coils))
    mix = np.eye(n_coils) + 0.4 * mix
    psi = mix @ mix.conj().T  # correlated, unequal coil noise
    white = (rng.standard_normal((n_coils, n)) + 1j * rng.standard_normal((n_coils, n))) / np.sqrt(2)
    samples = mix @ white
    cov = noise_covariance(samples)
    assert cov.shape == (n_coils, n_coils)
    scale = np.abs(psi).max()
    assert np.abs(cov - psi).max() < 6 * scale / np.sqrt(n)
    w = whitening_matrix(cov)
    mean_var = np.mean(np.real(np.diag(cov)))
    np.testing.assert_allclose(w @ cov @ w.conj().T, mean_var * np.eye(n_coils), atol=1e-9 * mean_var)
    # whitened fresh samples of the true covariance: identity times the mean variance, within sampling error
    fresh = mix @ ((rng.standard_normal((n_coils, n)) + 1j * rng.standard_normal((n_coils, n))) / np.sqrt(2))
    whitened_cov = noise_covariance(w @ fresh)
    assert np.abs(whitened_cov - mean_var * np.eye(n_coils)).max() < 6 * mean_var / np.sqrt(n)
    assert abs(np.mean(np.real(np.diag(whitened_cov))) / np.mean(np.real(np.diag(psi))) - 1) < 0.02


def test_noise_covariance_and_whitening_reject_bad_input():
    with pytest.raises(InputError, match="N >= C"):
        noise_covariance(np.ones((4, 3), np.complex64))
    with pytest.raises(InputError, match="positive definite"):
        whitening_matrix(np.ones((3, 3)))
    with pytest.raises(InputError, match="Hermitian"):
        whitening_matrix(np.array([[1.0, 0.5j], [0.5j, 1.0]]))
    with pytest.raises(InputError, match="square"):
        whitening_matrix(np.ones((2, 3)))


def test_espirit_finds_the_maps_with_eight_calibration_lines_on_a_small_matrix():
    # 8 of 40 lines, 40 x 47: with SigPy's 6-wide kernel the calibration matrix has 3 x 3 rows and ESPIRiT's
    # maps were zero everywhere; the kernel narrows with the calibration square (espirit_kernel_width)
    axial = torch.from_numpy(np.asarray(nib.load(COLIN27).dataobj[:, :, 90], dtype=np.float32).T.copy())
    x = torch.nn.functional.interpolate(axial[None, None], size=(40, 47), mode="area")[0, 0]
    x = (x / x.max()).to(torch.complex64)
    true_maps = birdcage_sensitivities(8, 40, 47)
    lines = np.isin(np.arange(40), np.arange(16, 24))  # the centred 8 rows, nothing else
    kspace = fft2c(true_maps * x).numpy() * lines[None, :, None]
    assert calibration_width(kspace) == 8
    assert [espirit_kernel_width(w) for w in (8, 10, 11, 12, 13, 24)] == [3, 3, 4, 5, 6, 6]
    est = torch.from_numpy(espirit_sensitivities(kspace))
    inside = x.abs() > 0.1
    assert inside.sum() > 500
    rss = est.abs().pow(2).sum(0)
    torch.testing.assert_close(rss[inside], torch.ones_like(rss[inside]), rtol=0, atol=1e-4)
    overlap = (est * true_maps.conj()).sum(0).abs()[inside]
    assert overlap.min() > 0.9 and overlap.mean() > 0.995  # 0.957 and 0.9986 measured


def test_espirit_refuses_empty_maps():
    x = torch.zeros(40, 47, dtype=torch.complex64)
    x[8:32, 10:38] = 1.0
    kspace = fft2c(birdcage_sensitivities(4, 40, 47) * x).numpy()
    # every eigenvalue is below a crop above 1: no support anywhere -> refused, not all-zero maps
    with pytest.raises(InputError, match="no coil maps in the 12-line"):
        espirit_sensitivities(kspace, calib_width=12, crop=1.01)
    with pytest.raises(ValueError, match="calib_width must be >= 8"):
        espirit_kernel_width(7)


def test_espirit_maps_make_the_combined_image_real():
    # a real image seen by 8 birdcage coils: with coil 0's phase (ESPIRiT's) the combined image
    # sum_c conj(s_c) x_c has a phase across the brain, with `real_image` (default) it is about real, as the
    # prior's training data
    x = _colin27_slice(224)[8:216, 8:216]
    coil_images = birdcage_sensitivities(8, 208, 208) * x
    lines = cartesian_mask("equispaced", 208, 4, 0.08, np.random.RandomState(0))
    kspace = fft2c(coil_images).numpy() * lines[:, None]
    inside = x.abs() > 0.1
    for real_image, low, high in ((True, 0.0, 0.05), (False, 0.5, np.pi)):
        maps = torch.from_numpy(espirit_sensitivities(kspace, real_image=real_image))
        combined = (maps.conj() * coil_images).sum(0)
        torch.testing.assert_close(combined.abs()[inside], x.abs()[inside], rtol=0, atol=3e-3)
        spread = combined[inside].angle().abs().quantile(0.95)
        assert low <= spread <= high, (real_image, float(spread))
