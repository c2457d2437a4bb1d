"""Samplers with an analytic score: data N(mu, s^2) per pixel, so the VP-SDE marginal score is closed-form.

p_t = N(alpha(t) mu, P(t)) with P(t) = alpha(t)^2 s^2 + std(t)^2, score(x, t) = -(x - alpha(t) mu) / P(t).
Statistical tolerances: B = 512 samples of 128 pixels; the standard error of a per-pixel mean is
s / sqrt(B) = 0.022 (we allow 5 of them, over 128 pixels), of the pixel-averaged variance ratio
sqrt(2 / (B * 128)) = 0.4 % (we allow 5 %, which leaves room for the samplers' discretisation bias: PC at
N = 200 measured +1 %, first-order DDIM at 200 steps -3 %).
"""

from __future__ import annotations

import pytest
import torch

from degradations import ForwardOperator, complex_to_channels, fft2c
from diffusion.sampling.data_consistency import GradientDC, ProximalDC
from diffusion.sampling.samplers import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    NFECounter,
    Schedule,
    build_sampler,
    ddim_sampler,
    magnitude,
    noise_aware_time,
    pc_sampler,
    posterior_samples,
)
from diffusion.sampling.sde import VPSDE

SDE = VPSDE()
S = 0.5
MU = torch.linspace(-1, 1, 128, dtype=torch.float64).reshape(1, 2, 8, 8)
B = 512


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, sd = SDE.alpha(t)[:, None, None, None], SDE.std(t)[:, None, None, None]
    return -(x - a * MU) / (a**2 * S**2 + sd**2)


def _x_init(value: float = 0.0, batch: int = B) -> torch.Tensor:
    return torch.full((batch, 2, 8, 8), value, dtype=torch.float64)


def _check_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, var_tol: float = 0.05) -> None:
    sem = torch.sqrt(var / x.shape[0])
    assert ((x.mean(0) - mean).abs() < 5 * sem).all(), float((x.mean(0) - mean).abs().max())
    ratio = float(x.var(0).mean() / var.mean())
    assert abs(ratio - 1) < var_tol, ratio


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FourierOp:
    """A = fft2c (full Cartesian sampling), a stand-in for any operator with .forward / .adjoint."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fft2c(x)

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        from degradations import ifft2c

        return ifft2c(k)


def test_pc_sampler_recovers_the_gaussian_prior() -> None:
    sampler = build_sampler("pc", steps=200)
    x = sampler(gaussian_score, _x_init(), generator=_gen())
    _check_moments(x, MU.expand_as(x[:1])[0], torch.full_like(MU[0], S**2))
    assert sampler.last_nfe == 400


@pytest.mark.parametrize(("eta", "steps"), [(0.0, 200), pytest.param(1.0, 1000, marks=pytest.mark.slow)])
def test_ddim_recovers_the_gaussian_prior(eta: float, steps: int) -> None:
    """DDIM is first order and contracts: -3 % variance at 200 steps (eta 0), -2 % at 1000 (eta 1)."""
    x = build_sampler("ddim", steps=steps, eta=eta)(gaussian_score, _x_init(), generator=_gen(1))
    _check_moments(x, MU[0], torch.full_like(MU[0], S**2))


@pytest.mark.parametrize("name", ["warm_pc", "warm_ddim"])
def test_warm_start_samples_from_the_diffused_input(name: str) -> None:
    """From x_t0 = a x_init + sd z the reverse SDE samples p(x0 | x_t0) and the ODE maps x_t0 to
    mu + s (x_t0 - a mu) / sqrt(P); averaged over z these are Gaussians with closed-form moments.
    (The Langevin corrector pulls a warm start towards the t0 marginal: this checks the predictor alone.)"""
    c = 0.3
    sampler = build_sampler(name, steps=200, t0=0.4, n_corrector=0)
    x = sampler(gaussian_score, _x_init(c), generator=_gen(2))
    t0 = torch.tensor([sampler.schedule.t_start], dtype=torch.float64)
    a, sd = float(SDE.alpha(t0)), float(SDE.std(t0))
    P = a**2 * S**2 + sd**2
    if name == "warm_pc":
        mean, var = MU + a**2 * S**2 / P * (c - MU), (S**2 * a / P) ** 2 * sd**2 + S**2 * sd**2 / P
    else:
        mean, var = MU + S * a * (c - MU) / P**0.5, S**2 * sd**2 / P
    _check_moments(x, mean[0], torch.full_like(MU[0], var))


def _truth_and_y(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    truth = torch.randn(batch, 2, 8, 8, generator=_gen(3))
    return truth, fft2c(torch.complex(truth[:, :1], truth[:, 1:]))


@pytest.mark.parametrize("op", [FourierOp(), ForwardOperator()])
def test_dc_weight_one_with_full_noiseless_sampling_returns_the_truth(op: object) -> None:
    truth, y = _truth_and_y()
    dc = GradientDC(op, y, weight=1.0)
    x = torch.randn(truth.shape, generator=_gen(4))
    torch.testing.assert_close(dc(x), truth, atol=1e-5, rtol=0)
    # and so does every sampler whose last step is a full DC step, whatever the score
    for name in SAMPLERS:
        sampler = build_sampler(name, steps=25, dc="gradient", dc_weight=1.0)
        out = sampler(lambda x, t: -x, torch.zeros_like(truth), A=op, y=y, generator=_gen(5))
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=0)


def test_proximal_dc_with_noiseless_data_returns_the_truth_and_with_useless_data_the_prior() -> None:
    """sigma_y = 0: every sampler's proximal step is the hard projection, so the output is the measured
    image; sigma_y = inf: the data are ignored and the output is the prior's (the same as without DC)."""
    truth, y = _truth_and_y()
    op = ForwardOperator()
    for name in SAMPLERS:
        sampler = build_sampler(name, steps=25, dc="proximal")
        out = sampler(lambda x, t: -x, torch.zeros_like(truth), A=op, y=y, generator=_gen(5),
                      noise_sigma=torch.zeros(3))
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=0)
        free = sampler(gaussian_score, _x_init(batch=3), generator=_gen(6))
        ignored = sampler(gaussian_score, _x_init(batch=3), A=op, y=y.to(torch.complex128), generator=_gen(6),
                          noise_sigma=torch.full((3,), float("inf")))
        torch.testing.assert_close(ignored, free, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise_sigma"):
        build_sampler("ddim", dc="proximal")(lambda x, t: -x, torch.zeros_like(truth), A=op, y=y)


def test_per_slice_generators_make_a_slice_independent_of_its_batch() -> None:
    """With one generator per slice, a slice's output does not depend on the other slices of its batch."""
    sampler = build_sampler("ddim", steps=10, eta=1.0)
    x_init = _x_init(0.1, batch=3)
    together = sampler(gaussian_score, x_init, generator=[_gen(s) for s in (1, 2, 3)])
    alone = sampler(gaussian_score, x_init[1:2], generator=[_gen(2)])
    torch.testing.assert_close(together[1:2], alone, atol=1e-12, rtol=0)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="generators"):
        sampler(gaussian_score, x_init, generator=[_gen(1)])


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_dc_reduces_the_k_space_residual_of_a_blurring_operator(weight: float) -> None:
    """A = W * F with 0 < W <= 1 (a Gaussian MTF): a gradient step with weight <= 1 / ||A||^2 descends."""
    ky, kx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    op = ForwardOperator(weights=torch.exp(-(kx**2 + ky**2))[None, None].expand(3, 1, 8, 8))
    truth = torch.randn(3, 1, 8, 8, dtype=torch.complex64, generator=_gen(6))
    noise = 0.1 * torch.randn(3, 1, 8, 8, dtype=torch.complex64, generator=_gen(7))
    dc = GradientDC(op, op.forward(truth) + noise, weight=weight)
    x = torch.randn(3, 2, 8, 8, generator=_gen(8))
    before, after = (torch.linalg.vector_norm(dc.residual(v).flatten(1), dim=1) for v in (x, dc(x)))
    assert (after < before).all()
    assert dc(x).dtype == x.dtype and dc(x).shape == x.shape
    with pytest.raises(ValueError, match="complex"):
        GradientDC(op, torch.zeros(3, 1, 8, 8))


def test_posterior_std_is_zero_for_a_deterministic_sampler_and_positive_for_pc() -> None:
    x_init = _x_init(0.2, batch=4)
    sched = Schedule.make(20, t_start=0.5)

    def fixed_start_ddim(score_fn, x, schedule, dc, generator):  # eta = 0 and the same start noise each time
        return ddim_sampler(score_fn, x, schedule, dc, _gen(9))

    mean, std = posterior_samples(fixed_start_ddim, gaussian_score, x_init, sched, None, 3, _gen())
    assert mean.shape == std.shape == (4, 1, 8, 8)
    assert torch.equal(std, torch.zeros_like(std))
    torch.testing.assert_close(mean, magnitude(fixed_start_ddim(gaussian_score, x_init, sched, None, None)))
    _, std_pc = posterior_samples(pc_sampler, gaussian_score, x_init, sched, None, k=3, generator=_gen())
    assert (std_pc > 0).all()
    _, std_one = posterior_samples(pc_sampler, gaussian_score, x_init, sched, None, k=1, generator=_gen())
    assert torch.equal(std_one, torch.zeros_like(std_one))


def test_sampler_posterior_counts_k_runs() -> None:
    sampler = build_sampler("warm_ddim", steps=5)
    mean, std = sampler.posterior(gaussian_score, _x_init(batch=2), k=4, generator=_gen())
    assert sampler.last_nfe == 20 and (std > 0).all() and mean.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_output_and_nfe_formula(name: str) -> None:
    sampler = build_sampler(name, steps=25, n_corrector=2, eta=0.5)
    nfes: list[int] = []
    x_init = _x_init(batch=4)
    out1 = sampler(gaussian_score, x_init, generator=_gen(11), callback=lambda d: nfes.append(d["nfe"]))
    out2 = sampler(gaussian_score, _x_init(batch=4), generator=_gen(11))
    out3 = sampler(gaussian_score, _x_init(batch=4), generator=_gen(12))
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    per_step = 3 if SAMPLERS[name].sample_fn is pc_sampler else 1
    assert sampler.last_nfe == sampler.expected_nfe == 25 * per_step == nfes[-1]
    assert len(nfes) == 25


def test_nfe_counter_and_reference_default_is_score_mri() -> None:
    counter = NFECounter(gaussian_score)
    pc_sampler(counter, _x_init(batch=2), Schedule.make(30), generator=_gen())
    assert counter.nfe == 60
    ref = build_sampler("pc")
    assert ref.schedule.n_steps == 2000 and ref.expected_nfe == 4000 and ref.schedule.snr == 0.16
    assert ref.dc == "gradient" and ref.dc_weight == 0.3
    # every other sampler defaults to the noise-aware proximal DC (the one-step Tweedie estimate takes none);
    # the default sampler is a fast one
    assert all(build_sampler(name).dc == "proximal" for name in SAMPLERS if name not in ("pc", "tweedie"))
    assert build_sampler().name == DEFAULT_SAMPLER and build_sampler().expected_nfe <= 50


def test_schedule_grids() -> None:
    full = Schedule.make(100)
    assert full.sde.N == 100 and full.t_start == 1.0 and full.eps == pytest.approx(1e-3)
    torch.testing.assert_close(full.timesteps, torch.linspace(1, 1e-3, 100, dtype=torch.float64))
    warm = Schedule.make(40, t_start=0.4)
    assert warm.n_steps == 40 and warm.t_start == pytest.approx(0.4)
    assert (warm.timesteps.diff() < 0).all()
    spacing = (0.4 - 1e-3) / 39
    assert (1 - 1e-3) / (warm.sde.N - 1) == pytest.approx(spacing, rel=0.02)  # same step as the full grid
    for bad in [dict(n_steps=0), dict(n_steps=5, t_start=1.5), dict(n_steps=5, t_start=1e-4)]:
        with pytest.raises(ValueError):
            Schedule.make(**bad)
    with pytest.raises(ValueError, match="discretisation cannot take"):  # refused when built, not mid-run
        build_sampler("warm_pc", steps=5, t0=0.4)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        build_sampler("euler")
    with pytest.raises(ValueError, match="dc_weight"):
        build_sampler("pc", dc_weight=-1.0)
    with pytest.raises(ValueError, match="dc_lambda"):
        build_sampler("ddim", dc_lambda=0.0)
    with pytest.raises(ValueError, match="dc_floor"):
        build_sampler("ddim", dc_floor=-0.1)
    with pytest.raises(ValueError, match="data consistency"):
        build_sampler("ddim", dc="hard")


def test_autocast_option_runs_the_score_under_bf16() -> None:
    seen: list[bool] = []

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.linear(x, torch.eye(8)) * -1  # a matmul: bf16 under autocast

    x = build_sampler("ddim", steps=3, autocast=True)(score_fn, torch.zeros(2, 2, 8, 8), generator=_gen())
    assert all(seen) and len(seen) == 3 and x.dtype == torch.float32


def test_magnitude_of_channels() -> None:
    x = torch.randn(2, 1, 4, 4, dtype=torch.complex64, generator=_gen())
    torch.testing.assert_close(magnitude(complex_to_channels(x)), x.abs())


def test_the_registry_floor_reaches_the_proximal_step() -> None:
    y = torch.zeros(1, 1, 8, 8, dtype=torch.complex64)
    A = ForwardOperator(None)
    default = build_sampler()
    assert default.dc_floor == SAMPLERS[DEFAULT_SAMPLER].dc_floor
    dc = build_sampler(dc_floor=0.07).make_dc(A, y, torch.ones(1))
    assert isinstance(dc, ProximalDC) and dc.floor == pytest.approx(0.07)
    assert build_sampler(dc_floor=0.07).settings()["dc_floor"] == pytest.approx(0.07)


def test_noise_aware_time_puts_the_diffusion_noise_at_the_asked_ratio() -> None:
    schedule = build_sampler("warm_ddim").schedule  # t0 = 0.25, eps = 1e-3
    ratio = torch.tensor([0.05, 0.3, 50.0, 1e-6])
    t = noise_aware_time(schedule, ratio)
    torch.testing.assert_close(SDE.std(t[:2]) / SDE.alpha(t[:2]), ratio[:2].double(), rtol=1e-6, atol=0)
    assert t[2] == schedule.t_start and t[3] == pytest.approx(10 * schedule.eps)  # clamped to [10 eps, t0]


def test_a_per_slice_grid_runs_each_slice_as_its_own_schedule() -> None:
    # two slices started at different times in one batch == each slice alone with its own fixed grid
    x_init = torch.stack([MU[0] + 0.3, MU[0] - 0.2])
    starts = torch.tensor([0.2, 0.05], dtype=torch.float64)
    batched = Schedule.make(6, 0.25).spanning(starts)
    assert batched.timesteps.shape == (6, 2) and batched.t_start == 0.2
    together = ddim_sampler(gaussian_score, x_init, batched, generator=[_gen(1), _gen(2)])
    for i, t0 in enumerate(starts.tolist()):
        alone = ddim_sampler(gaussian_score, x_init[i:i + 1], Schedule.make(6, t0), generator=[_gen(1 + i)])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-12, atol=1e-12)


def test_the_sampler_starts_each_slice_from_its_noise_level() -> None:
    seen: list[torch.Tensor] = []
    sampler = build_sampler("warm_ddim", t0_ratio=8.0)
    noise_sigma = torch.tensor([0.5, 0.01], dtype=torch.float64)  # ~2 dB and ~35 dB on unit-range images
    sampler(gaussian_score, _x_init(batch=2), generator=_gen(), callback=lambda d: seen.append(d["t"]),
            noise_sigma=noise_sigma)
    first = seen[0].double()
    assert first[0] == pytest.approx(0.25)  # noisy: the registry's t0 (8 x 0.35 is above its noise level)
    ratio = float(SDE.std(first[1:]) / SDE.alpha(first[1:]))
    assert ratio == pytest.approx(8.0 * 0.01 / 2**0.5, rel=1e-5)  # precise data: a late start
    fixed = build_sampler("warm_ddim", t0_ratio=0.0).schedule_for(_x_init(batch=2), noise_sigma)
    assert fixed.timesteps.dim() == 1  # t0_ratio 0: the one fixed grid
    with pytest.raises(ValueError, match="t0_ratio .* is DDIM's"):
        build_sampler("warm_pc", t0_ratio=1.0)
    with pytest.raises(ValueError, match="t0_ratio must be finite and >= 0"):
        build_sampler("warm_ddim", t0_ratio=-1.0)
