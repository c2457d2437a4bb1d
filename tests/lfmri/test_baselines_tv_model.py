"""Model-based TV (`tv_model`): the gradient's exact adjoint, the operator norm, convergence to known
solutions (scikit-image's Chambolle TV, least squares), and reconstruction with blur and B0 operators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.restoration import denoise_tv_chambolle

from degradations import ForwardOperator, Measurement, fft2c, ifft2c, make_regime, operator_norm_sq
from lfmri.baselines import (
    BASELINES,
    gradient,
    gradient_adjoint,
    total_variation,
    tv_objective,
    tv_reconstruct,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(ref.max() ** 2 / np.mean((pred - ref) ** 2)))


def phantom(size: int = 48) -> torch.Tensor:
    """A piecewise-constant phantom, complex64 [1, 1, size, size]: an ellipse with a bright and a dark
    inclusion and a bar, on a zero background."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 0.6 * ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float()
    img[(xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.06] = 1.0
    img[(xx + 0.35) ** 2 + (yy - 0.3) ** 2 < 0.04] = 0.25
    img[(yy.abs() < 0.08) & (xx.abs() < 0.5) & (yy > -0.6)] = 0.85
    return img.to(torch.complex64)[None, None]


def test_gradient_adjoint_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(2, 1, 9, 7, generator=g, dtype=torch.float64),
                      torch.randn(2, 1, 9, 7, generator=g, dtype=torch.float64))
    d = torch.complex(torch.randn(2, 2, 9, 7, generator=g, dtype=torch.float64),
                      torch.randn(2, 2, 9, 7, generator=g, dtype=torch.float64))
    lhs = torch.sum(gradient(x) * d.conj())
    rhs = torch.sum(x * gradient_adjoint(d).conj())
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    assert bool((gradient(x)[:, 0, -1] == 0).all()) and bool((gradient(x)[:, 1, :, -1] == 0).all())


def test_total_variation_of_a_step_is_its_height_times_its_length() -> None:
    x = torch.zeros(1, 1, 6, 5, dtype=torch.complex64)
    x[..., 3:, :] = 2.0j
    assert float(total_variation(x)) == pytest.approx(2.0 * 5)


def test_operator_norm_is_the_largest_k_space_weight_squared() -> None:
    x = phantom(32)
    regime = make_regime("noise_blur_t2star", fwhm_px=2.0, t2star_ms=20.0)
    A = ForwardOperator.from_params(regime(x, torch.Generator().manual_seed(0))[1])
    norm, exact = float(operator_norm_sq(A, x)[0]), float(A.weights.max()) ** 2
    assert exact * 0.95 < norm <= exact * (1 + 1e-5)  # a Rayleigh quotient: never above, within the margin
    assert float(operator_norm_sq(ForwardOperator(), x)[0]) == pytest.approx(1.0, rel=1e-4)


def test_with_a_plain_fourier_operator_it_is_scikit_images_tv_denoiser() -> None:
    """A = F, a real image: the minimiser is the ROF solution, which Chambolle's algorithm also finds."""
    ref = phantom(32)
    noisy = ref.real + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    weight = 0.15
    expected = denoise_tv_chambolle(noisy[0, 0].double().numpy(), weight=weight, eps=1e-12,
                                    max_num_iter=20000)
    history: list[torch.Tensor] = []
    y = fft2c(noisy.to(torch.complex64))
    out = tv_reconstruct(y, ForwardOperator(), torch.tensor([weight]), iterations=600, history=history)
    assert float(out.imag.abs().max()) < 1e-5
    np.testing.assert_allclose(out[0, 0].real.numpy(), expected, atol=2e-3)
    x_best = torch.from_numpy(expected).to(torch.complex64)[None, None]
    best = float(tv_objective(x_best, y, ForwardOperator(), torch.tensor([weight])))
    objective = torch.cat(history).tolist()
    assert objective[-1] == pytest.approx(best, rel=1e-4)
    assert objective[-1] < objective[0] and objective[-1] <= min(objective[:300]) + 1e-4 * best


def test_without_regularisation_it_reproduces_the_data() -> None:
    y = fft2c(phantom(24) + 0.1 * torch.randn(1, 1, 24, 24, dtype=torch.complex64,
                                              generator=torch.Generator().manual_seed(2)))
    out = tv_reconstruct(y, ForwardOperator(), torch.zeros(1), x0=torch.zeros_like(y), iterations=300)
    torch.testing.assert_close(out, ifft2c(y), atol=1e-4, rtol=0)


def test_it_is_batched_over_slices_with_their_own_weights() -> None:
    g = torch.Generator().manual_seed(3)
    noise = 0.1 * torch.randn(2, 1, 24, 24, dtype=torch.complex64, generator=g)
    y = fft2c(torch.cat([phantom(24), 0.5 * phantom(24)]) + noise)
    both = tv_reconstruct(y, ForwardOperator(), torch.tensor([0.1, 0.2]), iterations=40)
    second = tv_reconstruct(y[1:], ForwardOperator(), torch.tensor([0.2]), iterations=40)
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)


def _measurement(regime: str, snr_db: float, seed: int, **overrides: float) -> tuple[Measurement, np.ndarray]:
    x = phantom(48)
    degradation = make_regime(regime, snr_db=snr_db, **overrides)
    y, params = degradation(x, torch.Generator().manual_seed(seed))
    return Measurement.simulated(y, params, degradation), x[:, 0].abs().numpy()


def test_a_blurred_noisy_phantom_is_recovered_better_than_by_image_denoising() -> None:
    m, ref = _measurement("noise_blur", 12.0, 0, fwhm_px=2.5)
    model = BASELINES["tv_model"](m, weight_factor=1.0)
    assert _psnr(model, ref) > _psnr(BASELINES["degraded"](m), ref) + 3.0
    assert _psnr(model, ref) > _psnr(BASELINES["tv"](m, weight_factor=1.0), ref) + 1.0
    assert _psnr(model, ref) > _psnr(BASELINES["tv_complex"](m, weight_factor=1.0), ref) + 1.0


def test_it_undoes_b0_distortion_with_the_b0_operator() -> None:
    m, ref = _measurement("noise_blur_t2star_b0", 15.0, 1, fwhm_px=1.0, b0_max_hz=60.0, readout_ms=10.0)
    assert m.operator().encoding is not None
    model = BASELINES["tv_model"](m, weight_factor=1.0)
    no_b0 = Measurement.from_kspace(m.y, {**m.params, "b0_map_hz": torch.zeros_like(m.params["b0_map_hz"])},
                                    m.noise_sigma)
    assert _psnr(model, ref) > _psnr(BASELINES["tv_model"](no_b0, weight_factor=1.0), ref) + 0.8  # 27.3, 26.1
    assert _psnr(model, ref) > _psnr(BASELINES["tv_complex"](m, weight_factor=1.0), ref) + 2.0  # 24.3
    assert math.isfinite(_psnr(model, ref))
