"""Data consistency: the paper's gradient step, and the proximal step
argmin_x ||Ax - y||^2 / sigma_y^2 + rho ||x - x0||^2 in its limits, its closed form against conjugate
gradients and against a dense solve, and its optimality."""

import math

import pytest
import torch

from degradations import ForwardOperator, channels_to_complex, complex_to_channels, fft2c, make_regime
from diffusion.sampling.data_consistency import GradientDC, ProximalDC

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(regime: str, size: int = 16, batch: int = 2, seed: int = 0,
             **overrides: float) -> tuple[ForwardOperator, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, y, noise_sigma [B], x0 float [B,2,H,W]): the regime's operator for random complex images x, the
    noisy k-space y = A x + n and a starting estimate x0 = x + perturbation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, dtype=torch.complex64, generator=g)
    degradation = make_regime(regime, **overrides)
    params = degradation.sample_params(x, g)
    y = degradation.apply(x, params, g)
    x0 = complex_to_channels(x) + 0.3 * torch.randn(batch, 2, size, size, generator=g)
    return ForwardOperator.from_params(params), y, params["noise_sigma"], x0


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return _norm(x - reference) / _norm(reference)


def _gradient_parts(A: ForwardOperator, y: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
                    sigma_y: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the objective's gradient, ``A^H(Ax - y) / sigma_y^2`` and ``rho (x - x0)``,
    complex128, for float ``[B,2,H,W]`` x and x0."""
    z, z0 = (channels_to_complex(v).to(torch.complex128) for v in (x, x0))
    data = A.adjoint(A.forward(z) - y.to(torch.complex128)) / sigma_y.double()[:, None, None, None] ** 2
    return data, rho.double()[:, None, None, None] * (z - z0)


def _objective(A: ForwardOperator, y: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, sigma_y: torch.Tensor,
               rho: torch.Tensor) -> torch.Tensor:
    """``||Ax - y||^2 / sigma_y^2 + rho ||x - x0||^2`` per slice, float64."""
    z, z0 = (channels_to_complex(v).to(torch.complex128) for v in (x, x0))
    misfit = _norm(A.forward(z) - y.to(torch.complex128)) ** 2
    return misfit / sigma_y.double() ** 2 + rho.double() * _norm(z - z0) ** 2


# -- gradient step -------------------------------------------------------------------------------------------
def test_gradient_dc_is_the_papers_step():
    A, y, _, x = _problem("noise_blur_t2star_b0", seed=1)
    # the former samplers.KSpaceDataConsistency: x - weight A^H (A x - y) on the complex image
    expected = x - 0.3 * complex_to_channels(A.adjoint(A.forward(channels_to_complex(x)) - y))
    dc = GradientDC(A, y, weight=0.3)
    torch.testing.assert_close(dc(x, torch.ones(2)), expected)
    torch.testing.assert_close(dc.on_iterate(x, torch.full((2,), 0.5), torch.full((2,), 0.8)), expected)
    torch.testing.assert_close(dc.residual(x), A.forward(channels_to_complex(x)) - y)
    assert bool((_norm(dc.residual(dc(x))) < _norm(dc.residual(x))).all())


# -- proximal step: limits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", ["noise_blur", "noise_blur_t2star"])
def test_proximal_becomes_the_hard_projection_as_sigma_y_goes_to_zero(regime):
    A, y, _, x0 = _problem(regime, seed=2, fwhm_px=1.0)  # weights a > 0.1 everywhere
    misfits = []
    for sigma_y in (1e-1, 1e-2, 1e-3, 0.0):
        x = ProximalDC(A, y, sigma_y)(x0, torch.ones(2))
        misfits.append(_relative_error(A.forward(channels_to_complex(x)), y).max().item())
    assert misfits == sorted(misfits, reverse=True)
    assert misfits[-1] < 1e-5


def test_hard_projection_keeps_the_estimate_where_nothing_is_measured():
    _, y, _, x0 = _problem("noise", seed=3)
    weights = torch.ones(1, 1, 1, 16)
    weights[..., :4] = 0.0  # four unmeasured readout columns
    weights[..., 4:8] = 0.5
    A = ForwardOperator(weights)
    x = ProximalDC(A, y, 0.0)(x0, torch.zeros(2))  # sigma_y = 0 takes precedence over sigma_t = 0
    k, k0 = fft2c(channels_to_complex(x)), fft2c(channels_to_complex(x0))
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(k[..., :4], k0[..., :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(k[..., 4:8], y[..., 4:8] / 0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k[..., 8:], y[..., 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("regime", ["noise", "noise_blur_t2star", "noise_blur_t2star_b0"])
def test_proximal_leaves_x0_when_the_data_carry_no_weight(regime):
    A, y, sigma_y, x0 = _problem(regime, seed=4)
    ones = torch.ones(2)
    torch.testing.assert_close(ProximalDC(A, y, math.inf)(x0, ones), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ProximalDC(A, y, sigma_y)(x0, torch.zeros(2)), x0, atol=1e-5, rtol=0)
    assert _relative_error(ProximalDC(A, y, 1e4 * sigma_y)(x0, ones), x0).max() < 1e-4  # sigma_y -> inf
    assert _relative_error(ProximalDC(A, y, sigma_y, lam=1e8)(x0, ones), x0).max() < 1e-4  # rho -> inf
    hard = ProximalDC(A, y, sigma_y)(x0, torch.full((2,), math.inf))  # sigma_t = inf: data only, finite
    assert bool(torch.isfinite(hard).all())


# -- proximal step: solvers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precondition, cg_iters", [(True, 10), (False, 60)])
def test_closed_form_equals_conjugate_gradients(precondition, cg_iters):
    A, y, sigma_y, x0 = _problem("noise_blur_t2star", size=32, seed=5)
    for scale in (0.3, 1.0, 3.0):  # mu = lam sigma_y^2 / sigma_t^2 = 11, 1, 0.11
        sigma_t = scale * sigma_y
        closed = ProximalDC(A, y, sigma_y, method="closed_form")(x0, sigma_t)
        cg = ProximalDC(A, y, sigma_y, cg_iters=cg_iters, method="cg", precondition=precondition)(x0, sigma_t)
        assert _relative_error(cg, closed).max() < 1e-3


def _dense_operator(A: ForwardOperator, batch: int, size: int) -> torch.Tensor:
    """The matrices of A per slice, complex128 ``[B, size^2, size^2]``, column j = A e_j."""
    n = size * size
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, 1, 1, size, size).expand(n, batch, 1, size, size)
    columns = torch.stack([A.forward(e.contiguous()) for e in basis])  # [n, B, 1, size, size]
    return columns.reshape(n, batch, n).permute(1, 2, 0)


def test_cg_with_b0_matches_a_dense_solve_and_reduces_the_objective():
    size, batch = 8, 2
    A, y, sigma_y, x0 = _problem("noise_blur_t2star_b0", size=size, batch=batch, seed=6, b0_max_hz=60.0,
                                 te_ms=20.0)
    assert A.encoding is not None
    matrix = _dense_operator(A, batch, size)
    z0 = channels_to_complex(x0).to(torch.complex128).reshape(batch, -1)
    yv = y.to(torch.complex128).reshape(batch, -1)
    for scale in (0.3, 1.0, 3.0, 10.0):  # mu = 11 ... 0.01
        sigma_t = scale * sigma_y
        rho = 1.0 / sigma_t.double() ** 2
        s2 = sigma_y.double()[:, None, None] ** 2
        normal = matrix.mH @ matrix / s2 + rho[:, None, None] * torch.eye(size * size, dtype=torch.complex128)
        rhs = (matrix.mH @ yv[..., None] / s2)[..., 0] + rho[:, None] * z0
        dense = torch.linalg.solve(normal, rhs).reshape(batch, 1, size, size)
        x = ProximalDC(A, y, sigma_y)(x0, sigma_t)
        assert _relative_error(channels_to_complex(x), dense).max() < 1e-4
        objective = _objective(A, y, x, x0, sigma_y, rho)
        assert bool((objective < _objective(A, y, x0, x0, sigma_y, rho)).all())
        dense_objective = _objective(A, y, complex_to_channels(dense.to(torch.complex64)), x0, sigma_y, rho)
        torch.testing.assert_close(objective, dense_objective, rtol=1e-4, atol=0)


@pytest.mark.parametrize("regime", ["noise_blur_t2star", "noise_blur_t2star_b0"])
def test_the_result_is_stationary(regime):
    A, y, sigma_y, x0 = _problem(regime, size=32, seed=7)
    sigma_t = sigma_y.clone()
    x = ProximalDC(A, y, sigma_y)(x0, sigma_t)
    data, prior = _gradient_parts(A, y, x, x0, sigma_y, 1.0 / sigma_t**2)
    assert (_norm(data + prior) / (_norm(data) + _norm(prior))).max() < 1e-5


@pytest.mark.parametrize("regime", ["noise_blur_t2star", "noise_blur_t2star_b0"])
def test_the_floor_adds_to_the_prior_error_variance(regime):
    """rho_t = 1 / (sigma_t^2 / lam + floor^2): the result is stationary for that rho (closed form and CG)."""
    A, y, sigma_y, x0 = _problem(regime, size=32, seed=11)
    sigma_t, lam, floor = 0.5 * sigma_y, 4.0, 0.3
    x = ProximalDC(A, y, sigma_y, lam=lam, floor=floor)(x0, sigma_t)
    rho = 1.0 / (sigma_t**2 / lam + floor**2)
    data, prior = _gradient_parts(A, y, x, x0, sigma_y, rho)
    assert (_norm(data + prior) / (_norm(data) + _norm(prior))).max() < 1e-5
    # floor = 0 is the unfloored coupling lam / sigma_t^2
    torch.testing.assert_close(ProximalDC(A, y, sigma_y, lam=lam, floor=0.0)(x0, sigma_t),
                               ProximalDC(A, y, sigma_y, lam=lam)(x0, sigma_t))


def test_the_floor_keeps_precise_data_at_the_last_step():
    """sigma_t = 0 (a sampler's last step): without a floor the estimate x0 is returned whatever the data;
    with one, each k-space sample (A = F) is the average of F x0 and y weighted floor^2 : sigma_y^2."""
    A, y, _, x0 = _problem("noise", seed=12)
    sigma_y, floor = 0.02, 0.05
    assert A.weights is None and A.encoding is None
    zero = torch.zeros(2)
    torch.testing.assert_close(ProximalDC(A, y, sigma_y)(x0, zero), x0, atol=1e-6, rtol=0)
    x = ProximalDC(A, y, sigma_y, floor=floor)(x0, zero)
    w = floor**2 / (floor**2 + sigma_y**2)
    expected = w * y + (1 - w) * fft2c(channels_to_complex(x0))
    torch.testing.assert_close(fft2c(channels_to_complex(x)), expected, atol=1e-5, rtol=1e-5)


# -- interface -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("regime", ["noise", "noise_blur_t2star_b0"])
def test_layout_and_dtype_are_kept(regime, dtype):
    A, y, sigma_y, x0 = _problem(regime, seed=8)
    x0 = x0.to(dtype)
    for dc in (GradientDC(A, y), ProximalDC(A, y, sigma_y)):
        out = dc(x0, torch.ones(2))
        assert out.shape == x0.shape and out.dtype == dtype
        out = dc.on_iterate(x0, torch.full((2,), 0.5), torch.full((2,), 0.5))
        assert out.shape == x0.shape and out.dtype == dtype


def test_on_iterate_rescales_the_noisy_iterate():
    A, y, sigma_y, x = _problem("noise_blur_t2star", seed=9)
    dc = ProximalDC(A, y, sigma_y)
    alpha, std = torch.tensor([0.5, 0.9]), torch.tensor([0.8, 0.4])
    expected = alpha[:, None, None, None] * dc(x / alpha[:, None, None, None], std / alpha)
    torch.testing.assert_close(dc.on_iterate(x, alpha, std), expected)


def test_invalid_arguments_raise():
    A, y, sigma_y, x0 = _problem("noise_blur_t2star_b0", seed=10)
    with pytest.raises(ValueError, match="complex"):
        GradientDC(A, y.real)
    with pytest.raises(ValueError, match="noise_sigma"):
        ProximalDC(A, y, -1.0)
    with pytest.raises(ValueError, match="noise_sigma"):
        ProximalDC(A, y, torch.ones(3))
    with pytest.raises(ValueError, match="lam"):
        ProximalDC(A, y, sigma_y, lam=0.0)
    for floor in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="floor"):
            ProximalDC(A, y, sigma_y, floor=floor)
    with pytest.raises(ValueError, match="closed form"):
        ProximalDC(A, y, sigma_y, method="closed_form")
    with pytest.raises(ValueError, match="sigma_t"):
        ProximalDC(A, y, sigma_y)(x0, -torch.ones(2))
