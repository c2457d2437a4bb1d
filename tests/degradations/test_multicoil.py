"""Multi-coil, undersampled k-space (issue 24): the operator `A x = M W E(s_c x)` and its exact adjoint, the
regimes' coil and mask steps, the noise on sampled samples only, the measurement (coil checks, ESPIRiT,
prewhitening, the coil-combined degraded image, the noise estimate, the operator norm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from degradations import (
    PARAM_KEYS,
    REGIMES,
    ComplexGaussianNoise,
    Measurement,
    birdcage_sensitivities,
    build_operator,
    gaussian_mtf,
    make_regime,
    neutral_params,
    params_to_jsonable,
)
from degradations.fourier import fft2c, ifft2c
from lfmri_utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, C = 24, 20, 4


def _phantom(n: int = 2, h: int = H, w: int = W) -> torch.Tensor:
    """Smooth complex test images [n,1,h,w] (ellipses with a phase ramp)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = [((xx / (0.6 + 0.1 * i)) ** 2 + (yy / 0.75) ** 2 < 1).float() * (1 + 0.3 * yy)
            * torch.exp(1j * 0.5 * xx) for i in range(n)]
    return torch.stack(imgs)[:, None].to(torch.complex64)


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _line_mask(n: int = 2, h: int = H, w: int = W) -> torch.Tensor:
    """A Cartesian mask [n,1,h,w]: the centre rows and every third row (a different offset per slice)."""
    rows = torch.zeros(n, h, dtype=torch.bool)
    for i in range(n):
        rows[i, i::3] = True
        rows[i, h // 2 - 2:h // 2 + 2] = True
    return rows[:, None, :, None].expand(n, 1, h, w).float()


def _params(regime: str = "noise_blur_t2star_b0", n: int = 2, coils: int = C, mask: bool = True,
            **overrides: object) -> dict[str, torch.Tensor]:
    """The regime's realised parameters of the phantom with the given coils / mask, without noise_sigma."""
    params = make_regime(regime, **overrides).sample_params(_phantom(n), torch.Generator().manual_seed(3))
    params.pop("noise_sigma")
    if coils:
        params["sensitivities"] = birdcage_sensitivities(coils, H, W)[None].expand(n, -1, -1, -1).contiguous()
    if mask:
        params["mask"] = _line_mask(n)
    return params


# ---------------------------------------------------------------------------------------------- the operator
@pytest.mark.parametrize("b0_method", ["segmented", "exact"])
def test_the_multicoil_operator_and_its_adjoint_are_adjoint(b0_method: str) -> None:
    """<A x, k> = <x, A^H k> with coils, a mask, blur, T2* and B0 (complex128 to 1e-10, complex64 to 1e-5)."""
    A = build_operator(_params(b0_max_hz=60.0), b0_method)
    assert A.n_coils == C and not A.is_diagonal and A.encoding is not None
    for dtype, tol in ((torch.complex128, 1e-10), (torch.complex64, 1e-5)):
        x, k = _random((2, 1, H, W), 4).to(dtype), _random((2, C, H, W), 5).to(dtype)
        ax = A.forward(x)
        assert ax.shape == (2, C, H, W) and ax.dtype == dtype and A.adjoint(k).shape == (2, 1, H, W)
        lhs = (ax.conj() * k).sum(dim=(1, 2, 3))
        rhs = (x.conj() * A.adjoint(k)).sum(dim=(1, 2, 3))
        assert float(((lhs - rhs).abs() / lhs.abs()).max()) <= tol


def test_the_operator_is_the_mask_times_the_single_coil_operator_of_each_coil_image() -> None:
    params = _params(b0_max_hz=40.0)
    A = build_operator(params)
    single = build_operator({k: v for k, v in params.items() if k not in ("mask", "sensitivities")})
    x = _random((2, 1, H, W), 1)
    s, m = params["sensitivities"].to(torch.complex128), params["mask"].double()
    expected = torch.cat([single.forward(x * s[:, c:c + 1]) for c in range(C)], dim=1) * m
    torch.testing.assert_close(A.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert bool((A.forward(x)[m.expand(-1, C, -1, -1) == 0] == 0).all())  # exact zeros where not sampled
    k = _random((2, C, H, W), 2)
    expected_adjoint = sum(s[:, c:c + 1].conj() * single.adjoint(k[:, c:c + 1] * m) for c in range(C))
    torch.testing.assert_close(A.adjoint(k), expected_adjoint, rtol=1e-12, atol=1e-12)


def test_one_coil_of_ones_and_a_full_mask_give_todays_operator() -> None:
    params = _params(coils=0, mask=False)
    plain = build_operator(params)
    ones = build_operator({**params, "mask": torch.ones(2, 1, H, W),
                           "sensitivities": torch.ones(2, 1, H, W, dtype=torch.complex64)})
    x, k = _random((2, 1, H, W), 1, torch.complex64), _random((2, 1, H, W), 2, torch.complex64)
    torch.testing.assert_close(ones.forward(x), plain.forward(x))
    torch.testing.assert_close(ones.adjoint(k), plain.adjoint(k))
    assert plain.sensitivities is None and plain.mask is None and plain.n_coils == 1


def test_a_mask_keeps_the_operator_diagonal_and_its_closed_form_agrees_with_conjugate_gradients() -> None:
    """With a mask alone A = diag(a) F (a = 0 where not sampled): the closed form of
    (c A^H A + d I) x = c A^H y + d z0 equals a long CG run (the normal equations' exact solution), and the
    k-space of the solution keeps F z0 at every unsampled sample (d > 0, and d = 0: the projection)."""
    params = _params("noise_blur_t2star", coils=0)
    A = build_operator(params)
    assert A.is_diagonal and A.weights is not None and A.signal_weights is not None
    y, z0 = A.forward(_random((2, 1, H, W), 1)), _random((2, 1, H, W), 2)
    unsampled = params["mask"].expand(2, 1, H, W) == 0
    for c, d in ((0.5, 0.5), (1.0, 0.0)):
        cc, dd = torch.full((2,), c, dtype=torch.float64), torch.full((2,), d, dtype=torch.float64)
        closed = A.solve_normal(z0, y, cc, dd)
        torch.testing.assert_close(fft2c(closed)[unsampled], fft2c(z0)[unsampled])
        if d > 0:
            x = z0.clone()
            r = c * A.adjoint(y) + d * z0 - (c * A.adjoint(A.forward(x)) + d * x)
            p, rr = r, (r.abs() ** 2).sum()
            while float(rr) > 1e-24:
                q = c * A.adjoint(A.forward(p)) + d * p
                alpha = rr / (p.conj() * q).real.sum()
                x, r = x + alpha * p, r - alpha * q
                rr, rr_old = (r.abs() ** 2).sum(), rr
                p = r + rr / rr_old * p
            torch.testing.assert_close(closed, x, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="coil sensitivities"):
        build_operator(_params("noise", mask=False)).solve_normal(z0, y, cc, dd)


def test_the_echo_preconditioner_is_exact_for_normalised_coils_fully_sampled() -> None:
    """sum_c |s_c|^2 = 1, no mask, no blur: A^H A = I, so the preconditioner inverts c A^H A + d I exactly."""
    A = build_operator(_params("noise", mask=False))
    c, d = torch.tensor([0.3, 0.9]), torch.tensor([0.7, 0.1])
    r = _random((2, 1, H, W), 3, torch.complex64)
    normal = c[:, None, None, None] * A.adjoint(A.forward(r)) + d[:, None, None, None] * r
    torch.testing.assert_close(A.echo_preconditioner(c, d)(normal), r, rtol=1e-5, atol=1e-5)


def test_the_noise_free_image_and_demodulation_keep_their_single_coil_meaning() -> None:
    params = _params(b0_max_hz=50.0)
    A, single = build_operator(params), build_operator({k: v for k, v in params.items()
                                                        if k not in ("mask", "sensitivities")})
    x = _phantom()
    torch.testing.assert_close(A.noise_free_image(x), single.noise_free_image(x), rtol=0, atol=0)
    torch.testing.assert_close(A.demodulate(x), single.demodulate(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="single-coil, fully sampled"):
        A.noise_free_image(x, A.forward(x))


# ----------------------------------------------------------------------------------------------- the regimes
@pytest.mark.parametrize("regime", REGIMES)
def test_coils_and_a_mask_draw_last_and_leave_todays_parameters_and_noise_level(regime: str) -> None:
    """Same seed: the coil and mask steps draw after everything else, so every PARAM_KEYS value (noise_sigma
    included: the SNR is the fully sampled single-coil image's) equals the regime's without them."""
    x = _phantom(3)
    plain = make_regime(regime, snr_db=5.0).sample_params(x, torch.Generator().manual_seed(0))
    multi = make_regime(regime, snr_db=5.0, acceleration=4, center_fraction=0.2, mask="equispaced",
                        coils=C).sample_params(x, torch.Generator().manual_seed(0))
    assert tuple(multi) == (*PARAM_KEYS, "sensitivities", "mask")
    assert all(torch.equal(plain[k], multi[k]) for k in PARAM_KEYS)
    assert multi["sensitivities"].shape == (3, C, H, W) and multi["sensitivities"].dtype == torch.complex64
    assert multi["mask"].shape == (3, 1, H, W) and multi["mask"].dtype == torch.float32
    rows = multi["mask"][:, 0, :, 0]
    assert bool((multi["mask"] == rows[:, None, :, None]).all())  # whole rows
    assert 0.2 < float(rows.mean()) < 0.45


def test_apply_masks_the_noise_of_the_full_grid_and_is_todays_draw_where_sampled() -> None:
    degradation = make_regime("noise_blur", acceleration=3, coils=C)
    x = _phantom()
    params = degradation.sample_params(x, torch.Generator().manual_seed(1))
    y = degradation.apply(x, params, torch.Generator().manual_seed(9))
    assert y.shape == (2, C, H, W) and y.dtype == torch.complex64
    k = build_operator(params).forward(x)
    noise = ComplexGaussianNoise.draw(k, params["noise_sigma"], torch.Generator().manual_seed(9))
    sampled = params["mask"].expand(2, C, H, W) > 0
    torch.testing.assert_close(y[sampled], (k + noise)[sampled])
    assert bool((y[~sampled] == 0).all()) and bool((noise[~sampled] != 0).all())


def test_absent_or_neutral_acquisition_overrides_give_todays_regime_and_bad_ones_are_refused() -> None:
    for overrides in ({}, {"acceleration": None, "coils": None, "mask": None, "center_fraction": None},
                      {"acceleration": 1, "coils": 1}):
        degradation = make_regime("noise_blur", **overrides)
        assert degradation.coils is None and degradation.mask is None and len(degradation.steps) == 2
    assert make_regime("noise", acceleration=4).mask.kind == "random"
    with pytest.raises(ValueError, match="mask need"):
        make_regime("noise", mask="equispaced")
    with pytest.raises(ValueError, match="center_fraction need"):
        make_regime("noise", center_fraction=0.1, acceleration=1)
    with pytest.raises(ValueError, match="coils must be an integer"):
        make_regime("noise", coils=2.5)
    with pytest.raises(ValueError, match="acceleration"):
        make_regime("noise", acceleration=0.5)


def test_params_to_jsonable_summarises_the_mask_and_the_coils() -> None:
    x = _phantom(2)
    params = make_regime("noise", acceleration=4, center_fraction=0.2, coils=C).sample_params(
        x, torch.Generator().manual_seed(0))
    rows = params_to_jsonable(params)
    lines = params["mask"][:, 0, :, 0].sum(1)
    for i, row in enumerate(rows):
        assert row["n_coils"] == C and row["n_lines"] == float(lines[i])
        assert row["acceleration"] == pytest.approx(H / float(lines[i]))
        assert "mask" not in row and "sensitivities" not in row
    poisson = {"mask": torch.from_numpy(np.indices((H, W)).sum(0) % 2 == 0)[None, None].float()}
    assert params_to_jsonable({**neutral_params(1, H, W), **poisson})[0]["n_lines"] is None  # not Cartesian
    plain = params_to_jsonable(make_regime("noise").sample_params(x, torch.Generator().manual_seed(0)))
    assert set(plain[0]) == set(PARAM_KEYS) - {"b0_map_hz"}


# -------------------------------------------------------------------------------------------- the measurement
def _simulated(regime: str = "noise_blur", n: int = 2, snr_db: float = 10.0, size: tuple[int, int] = (H, W),
               **overrides: object) -> tuple[Measurement, dict[str, torch.Tensor], torch.Tensor]:
    degradation = make_regime(regime, snr_db=snr_db, **overrides)
    x = _phantom(n, *size)
    y, params = degradation(x, torch.Generator().manual_seed(0))
    return Measurement.simulated(y, params, degradation), params, x


def test_a_simulated_multicoil_measurement_has_its_coils_mask_and_coil_combined_image() -> None:
    m, params, _ = _simulated(acceleration=3, coils=C)
    assert m.n_coils == C and m.y.shape == (2, C, H, W)
    assert torch.equal(m.mask, params["mask"])
    assert torch.equal(m.params["sensitivities"], params["sensitivities"])
    expected = (params["sensitivities"].conj() * ifft2c(m.y)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(m.degraded, expected)
    assert m.magnitude().shape == (2, H, W)
    single, _, _ = _simulated()
    assert single.n_coils == 1 and single.mask is None
    assert torch.equal(single.degraded, ifft2c(single.y))


def test_the_measurement_checks_coils_and_mask_against_y() -> None:
    m, params, _ = _simulated(acceleration=3, coils=C)
    operator_params = {k: v for k, v in params.items() if k != "noise_sigma"}
    with pytest.raises(ValueError, match="sensitivities must be complex"):
        Measurement.from_kspace(m.y[:, :2], operator_params, 0.1)
    with pytest.raises(ValueError, match="mask must be real"):
        Measurement.from_kspace(m.y, {**operator_params, "mask": params["mask"][..., :-1]}, 0.1)
    with pytest.raises(ValueError, match="no sensitivities"):
        Measurement(m.y, {k: v for k, v in m.params.items() if k != "sensitivities"}, m.noise_sigma, "given")
    broadcast = Measurement.from_kspace(m.y, {**operator_params, "mask": params["mask"][:1]}, 0.1)
    assert broadcast.mask.shape == (2, 1, H, W)


def test_missing_sensitivities_are_estimated_by_espirit() -> None:
    """Without maps, ESPIRiT's span the simulated maps' (per pixel one coil-space direction: |<s_est, s>| = 1
    inside the object) and the coil-combined image has the true magnitude there."""
    m, params, x = _simulated("noise", snr_db=30.0, size=(48, 40), acceleration=2, center_fraction=0.25,
                              coils=C)
    operator_params = {k: v for k, v in params.items() if k not in ("noise_sigma", "sensitivities")}
    estimated = Measurement.from_kspace(m.y, operator_params, m.noise_sigma)
    maps = estimated.params["sensitivities"]
    assert maps.shape == (2, C, 48, 40) and maps.dtype == torch.complex64
    inside = x.abs()[:, 0] > 0.5
    overlap = (maps.conj() * params["sensitivities"]).sum(1).abs()
    assert float(overlap[inside].min()) > 0.98
    full = Measurement.from_kspace(fft2c(x * params["sensitivities"]), {**operator_params, "mask":
                                   torch.ones(2, 1, 48, 40)}, 0.0)
    torch.testing.assert_close(full.degraded.abs()[:, 0][inside], x.abs()[:, 0][inside], atol=0.02, rtol=0.02)


def test_a_noise_covariance_prewhitens_y_and_the_sensitivities() -> None:
    """Correlated coil noise of covariance Psi: after `from_kspace(..., noise_covariance=Psi)` the residual
    y - A x is white with the mean coil variance, and A (whitened maps) still explains the data."""
    n, size = 2, (32, 32)
    x = _phantom(n, *size)
    maps = birdcage_sensitivities(C, *size)[None].expand(n, -1, -1, -1)
    params = {**{k: v for k, v in neutral_params(n, *size).items() if k != "noise_sigma"},
              "sensitivities": maps}
    mixing = torch.tensor(np.array([[1.0, 0, 0, 0], [0.5, 1.2, 0, 0], [0.2, -0.3, 0.8, 0],
                                    [0, 0.4j, 0.1, 1.5]]), dtype=torch.complex128)
    psi = (mixing @ mixing.conj().T).numpy() * 0.01
    white = _random((n, C, *size), 7) * 0.1
    noise = torch.einsum("ij,sjhw->sihw", mixing, white).to(torch.complex64)
    y = fft2c(x * maps) + noise
    m = Measurement.from_kspace(y, params, 0.1, noise_covariance=psi)
    residual = (m.y - m.operator().forward(x)).permute(1, 0, 2, 3).reshape(C, -1).to(torch.complex128)
    covariance = residual @ residual.conj().T / residual.shape[1]
    target = float(np.real(np.diag(psi)).mean())
    torch.testing.assert_close(covariance, target * torch.eye(C, dtype=torch.complex128), atol=0.1 * target,
                               rtol=0)
    unwhitened = (y - fft2c(x * maps)).permute(1, 0, 2, 3).reshape(C, -1).to(torch.complex128)
    raw_covariance = unwhitened @ unwhitened.conj().T / unwhitened.shape[1]
    assert float((raw_covariance - target * torch.eye(C)).abs().max()) > 0.5 * target  # correlated indeed
    with pytest.raises(InputError, match=r"expected \[C, C\]"):
        Measurement.from_kspace(y, params, 0.1, noise_covariance=psi[:2, :2])


@pytest.mark.parametrize(("acceleration", "coils"), [(1, C), (4, 1), (4, 8)])
def test_the_noise_level_of_undersampled_multicoil_data_is_estimated_from_the_sampled_samples(
        acceleration: int, coils: int) -> None:
    m, params, _ = _simulated("noise_blur_t2star", n=3, snr_db=8.0, size=(96, 80), acceleration=acceleration,
                              coils=coils)
    operator_params = {k: v for k, v in params.items() if k != "noise_sigma"}
    estimated = Measurement.from_kspace(m.y, operator_params)
    assert estimated.noise_origin == "estimated"
    ratio = estimated.noise_sigma / params["noise_sigma"]
    assert bool(((ratio > 0.9) & (ratio < 1.1)).all()), ratio.tolist()


def test_the_operator_norm_of_a_multicoil_measurement_matches_the_dense_operator() -> None:
    m, _, _ = _simulated("noise_blur_t2star_b0", b0_method="exact", b0_max_hz=80.0, acceleration=2,
                         center_fraction=0.3, coils=3, size=(8, 6))
    for i in range(len(m)):
        op = m.operator(slice(i, i + 1))
        basis = torch.eye(48, dtype=torch.complex128).reshape(48, 1, 1, 8, 6)
        dense = torch.stack([op.forward(e).flatten() for e in basis], dim=1)  # [C*H*W, H*W]
        exact = float(torch.linalg.matrix_norm(dense, ord=2)) ** 2
        assert float(m.operator_norm_sq(slice(i, i + 1), iterations=300)[0]) == pytest.approx(exact, rel=1e-3)
    assert math.isfinite(float(m.operator_norm_sq().max()))


def test_coils_of_unequal_noise_are_balanced_when_the_noise_level_is_estimated() -> None:
    """No covariance, no noise std: the coils (noise stds 0.5 to 2 times sigma) are prewhitened with their
    estimated variances, so every coil's residual y - A x has the slice's estimated std, their RMS. (The
    phantom is smoothed as MR images at their native resolution are: on hard edges the coil of highest SNR
    keeps signal in the noise band, +28 % at 23 dB per coil.)"""
    n, size, factors = 2, (96, 80), torch.tensor([0.5, 1.0, 1.5, 2.0])
    x = ifft2c(fft2c(_phantom(n, *size)) * gaussian_mtf(torch.full((n,), 1.5), *size))
    params = {**{k: v for k, v in neutral_params(n, *size).items() if k != "noise_sigma"},
              "sensitivities": birdcage_sensitivities(C, *size)[None].expand(n, -1, -1, -1),
              "mask": _line_mask(n, *size)}
    sigma = 0.05
    noise = _random((n, C, *size), 3).to(torch.complex64) * sigma * factors[None, :, None, None]
    y = (build_operator(params).forward(x) + noise) * params["mask"]
    m = Measurement.from_kspace(y, params)
    assert m.noise_origin == "estimated"
    rms = sigma * float(factors.square().mean().sqrt())
    torch.testing.assert_close(m.noise_sigma, torch.full((n,), rms), rtol=0.1, atol=0)
    sampled = params["mask"].expand(n, 1, *size)[:, 0] > 0
    residual = (m.y - m.operator().forward(x)).permute(1, 0, 2, 3)[:, sampled]  # [C, sampled samples]
    per_coil = residual.abs().square().mean(dim=1).sqrt()
    torch.testing.assert_close(per_coil, torch.full((C,), rms), rtol=0.1, atol=0)
    given = Measurement.from_kspace(y, params, rms)  # a known level: y is kept as it is
    assert torch.equal(given.y, y)


@pytest.mark.parametrize("acceleration", [2, 3, 4, 6])
def test_the_aliasing_estimate_follows_the_zero_filled_images_error(acceleration: int) -> None:
    """`Measurement.alias_sigma` (from the sampled rows' k-space energy) is the zero-filled coil-combined
    image's error std per pixel within -5 % / +25 % (an upper bound by construction: the coil combination
    can only shrink the skipped energy), at 40 dB where that error is aliasing; 0 without a mask."""
    m, _, x = _simulated("noise", snr_db=40.0, size=(64, 56), acceleration=acceleration, center_fraction=0.12,
                         mask="equispaced", coils=C)
    true = (m.degraded - x).abs().square().mean(dim=(1, 2, 3)).sqrt()
    assert bool((true > 5 * m.noise_sigma).all())  # the error is aliasing
    ratio = m.alias_sigma / true
    assert bool((ratio > 0.95).all()) and bool((ratio < 1.25).all()), ratio
    full, _, _ = _simulated("noise", snr_db=40.0, size=(64, 56), coils=C)
    assert full.alias_sigma.tolist() == [0.0, 0.0]


def test_the_support_is_where_the_maps_see_the_object() -> None:
    """`Measurement.support`: None without maps, everywhere for birdcage maps (nonzero everywhere), and for
    ESPIRiT's maps (0 outside the object) a region that holds every pixel of the object."""
    single, _, _ = _simulated()
    assert single.support is None
    m, _, x = _simulated("noise", snr_db=40.0, size=(64, 56), acceleration=3, center_fraction=0.2,
                         mask="equispaced", coils=C)
    assert m.support.shape == (2, 1, 64, 56) and bool(m.support.all())
    estimated = Measurement.from_kspace(m.y, {k: v for k, v in m.params.items() if k != "sensitivities"},
                                        m.noise_sigma)
    support = estimated.support
    assert 0.2 < float(support.float().mean()) < 0.8
    assert not bool(((x.abs() > 0) & ~support).any())
