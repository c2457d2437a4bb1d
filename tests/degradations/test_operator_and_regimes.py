"""The forward operator A of every regime, the regimes' parameters and their reproducibility."""

import math

import pytest
import torch

from degradations import (
    PARAM_KEYS,
    REGIMES,
    ComplexGaussianNoise,
    ForwardOperator,
    OffResonanceEncoding,
    fft2c,
    gaussian_mtf,
    ifft2c,
    make_regime,
    neutral_params,
    params_to_jsonable,
    t2star_weights,
)

H, W = 20, 28


def image(batch=2, dtype=torch.complex64, seed=0):
    return torch.randn(batch, 1, H, W, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def inner(a, b):
    return (a.conj() * b).sum()


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("b0_method", ["segmented", "exact"])
@pytest.mark.parametrize("t2star_mode", ["spin_echo", "gradient_echo"])
def test_adjoint_is_exact_for_every_regime(regime, b0_method, t2star_mode):
    degradation = make_regime(regime, b0_method=b0_method, t2star_mode=t2star_mode)
    params = degradation.sample_params(image(), torch.Generator().manual_seed(3))
    op = ForwardOperator.from_params(params, b0_method=b0_method)
    for dtype, tol in ((torch.complex128, 1e-10), (torch.complex64, 1e-5)):
        x, y = image(dtype=dtype, seed=4), image(dtype=dtype, seed=5)
        ax = op.forward(x)
        assert ax.dtype == dtype
        lhs, rhs = inner(ax, y), inner(x, op.adjoint(y))
        assert abs(lhs - rhs).item() <= tol * abs(lhs).item()


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("b0_method", ["segmented", "exact"])
@pytest.mark.parametrize("t2star_mode", ["spin_echo", "gradient_echo"])
def test_operator_is_exactly_mtf_times_t2star_weights_times_the_encoding(regime, b0_method, t2star_mode):
    """``A x = MTF * T2*-weights * E(x)`` and ``A^H k = E^H(MTF * T2*-weights * k)``, bit for bit (a neutral
    factor is exactly 1, so the formula needs no case for absent steps)."""
    params = make_regime(regime, b0_method=b0_method, t2star_mode=t2star_mode).sample_params(
        image(), torch.Generator().manual_seed(3))
    op = ForwardOperator.from_params(params, b0_method=b0_method, n_segments=5)
    weights = gaussian_mtf(params["fwhm_px"], H, W) * t2star_weights(
        params["t2star_ms"], params["readout_ms"], params["te_ms"], W, params["t2star_gre"])
    encoding = OffResonanceEncoding(params["b0_map_hz"], params["readout_ms"], params["te_ms"], b0_method, 5)
    for dtype in (torch.complex64, torch.complex128):
        x, k = image(dtype=dtype, seed=4), image(dtype=dtype, seed=5)
        w = weights.to(x.real.dtype)
        assert torch.equal(op.forward(x), encoding.forward(x) * w)
        assert torch.equal(op.adjoint(k), encoding.adjoint(k * w))
    assert op.is_fourier == (regime == "noise")


def test_neutral_params_give_the_plain_fourier_transform():
    x = image()
    op = ForwardOperator.from_params(neutral_params(2, H, W))
    assert op.is_fourier
    torch.testing.assert_close(op.forward(x), fft2c(x))
    torch.testing.assert_close(op.adjoint(fft2c(x)), x)


@pytest.mark.parametrize("regime", REGIMES)
def test_apply_is_the_operator_plus_noise(regime):
    degradation = make_regime(regime)
    x = image()
    params = degradation.sample_params(x, torch.Generator().manual_seed(0))
    y = degradation.apply(x, params, torch.Generator().manual_seed(9))
    expected = ForwardOperator.from_params(params).forward(x) + ComplexGaussianNoise.draw(
        x, params["noise_sigma"], torch.Generator().manual_seed(9))
    torch.testing.assert_close(y, expected)
    assert y.dtype == torch.complex64


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_returns_the_full_key_set_with_neutral_values_for_absent_steps(regime):
    params = make_regime(regime).sample_params(image(3), torch.Generator().manual_seed(0))
    assert tuple(params) == PARAM_KEYS
    assert params["b0_map_hz"].shape == (3, 1, H, W)
    assert all(params[k].shape == (3,) for k in PARAM_KEYS if k != "b0_map_hz")
    has = {"blur": "blur" in regime, "t2star": "t2star" in regime, "b0": regime.endswith("b0")}
    assert bool((params["fwhm_px"] > 0).all()) == has["blur"]
    assert bool(torch.isfinite(params["t2star_ms"]).all()) == has["t2star"]
    assert bool((params["b0_map_hz"] != 0).any()) == has["b0"]
    assert bool((params["b0_max_hz"] > 0).all()) == has["b0"]
    assert torch.all((params["snr_db"] >= 2.0) & (params["snr_db"] <= 7.0))
    assert torch.all(params["noise_sigma"] > 0)


def test_samples_of_different_regimes_collate_into_one_operator():
    x = image(1)
    per_regime = [make_regime(r).sample_params(x, torch.Generator().manual_seed(i))
                  for i, r in enumerate(REGIMES)]
    batch = {k: torch.cat([p[k] for p in per_regime]) for k in PARAM_KEYS}
    xs = image(len(REGIMES), seed=7)
    together = ForwardOperator.from_params(batch).forward(xs)
    for i, p in enumerate(per_regime):
        alone = ForwardOperator.from_params(p).forward(xs[i:i + 1])
        # equal up to the time segmentation (a batch uses the segment count of its strongest field map)
        assert ((together[i:i + 1] - alone).norm() / alone.norm()).item() < 2e-3


@pytest.mark.parametrize("regime", REGIMES)
def test_same_seed_same_output_other_seed_other_output(regime):
    degradation = make_regime(regime)
    x = image()
    y1, p1 = degradation(x, torch.Generator().manual_seed(42))
    y2, p2 = degradation(x, torch.Generator().manual_seed(42))
    y3, _ = degradation(x, torch.Generator().manual_seed(43))
    assert torch.equal(y1, y2)
    assert all(torch.equal(p1[k], p2[k]) for k in PARAM_KEYS)
    assert not torch.allclose(y1, y3)


def test_unknown_regime_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown regime 'noise_motion'.*noise_blur_t2star_b0"):
        make_regime("noise_motion")
    with pytest.raises(ValueError, match="snr"):
        make_regime("noise", snr=5.0)


def test_overrides_fix_a_value_or_a_range():
    x = image(64)
    degradation = make_regime("noise_blur", snr_db=5.0, fwhm_px=1.5)
    fixed = degradation.sample_params(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fixed["snr_db"], torch.full((64,), 5.0))
    torch.testing.assert_close(fixed["fwhm_px"], torch.full((64,), 1.5))
    ranged = make_regime("noise_blur_t2star", t2star_ms_range=[40, 41], b0_max_hz=10.0)  # b0 absent: ignored
    params = ranged.sample_params(x, torch.Generator().manual_seed(0))
    assert torch.all((params["t2star_ms"] >= 40) & (params["t2star_ms"] <= 41))
    assert params["t2star_ms"].std() > 0
    assert torch.all(params["b0_max_hz"] == 0)


def test_params_to_jsonable_gives_python_scalars_without_maps():
    params = make_regime("noise_blur").sample_params(image(2), torch.Generator().manual_seed(0))
    rows = params_to_jsonable(params)
    assert len(rows) == 2 and "b0_map_hz" not in rows[0]
    assert rows[0]["t2star_ms"] is None  # inf -> None
    assert isinstance(rows[1]["fwhm_px"], float) and math.isfinite(rows[1]["fwhm_px"])


@pytest.mark.parametrize("bad", [(-math.inf, 5.0), (2.0, math.inf), (7.0, 2.0), (math.nan, 5.0)])
def test_a_range_that_is_not_finite_and_ordered_is_refused(bad):
    with pytest.raises(ValueError, match="snr_db"):
        make_regime("noise", snr_db_range=bad)


def test_demodulate_removes_the_echo_phase_of_the_field_map():
    x = image(dtype=torch.complex128)
    params = neutral_params(2, H, W)
    params["b0_map_hz"] = torch.linspace(-40.0, 60.0, H * W).reshape(1, 1, H, W).repeat(2, 1, 1, 1)
    params["te_ms"] = torch.tensor([10.0, 20.0])
    params["readout_ms"] = torch.zeros(2)  # every sample at the echo: the B0 effect is the echo phase alone
    A = ForwardOperator.from_params(params, "exact")
    measured = ifft2c(A.forward(x))
    assert (measured - x).abs().max() > 0.1  # the phase is there ...
    torch.testing.assert_close(A.demodulate(measured), x, rtol=1e-10, atol=1e-10)  # ... and removed
    plain = ForwardOperator.from_params(neutral_params(2, H, W))
    assert plain.demodulate(x) is x  # no field map: nothing to remove
