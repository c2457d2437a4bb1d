"""The MMSE estimators of the sampler registry on a Gaussian prior, where the posterior mean is closed-form.

Data x ~ N(MU, S^2) per pixel, measured as x_init = x + SIGMA n (white, per real channel; the complex k-space
noise std is SIGMA sqrt(2)). The posterior mean is MU + S^2 / (S^2 + SIGMA^2) (x_init - MU), and the marginal
score of any SDE is -(x - alpha MU) / (alpha^2 S^2 + std^2).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling.samplers import (
    SAMPLERS,
    NFECounter,
    Schedule,
    build_sampler,
    noise_aware_time,
    pc_sampler,
    pnp_sampler,
)
from diffusion.sampling.sde import VESDE, VPSDE, DiscreteVPSDE

S, SIGMA = 0.5, 0.3
MU = torch.linspace(-1, 1, 128, dtype=torch.float64).reshape(1, 2, 8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")


def _score(sde):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sd = sde.alpha(t).double()[:, None, None, None], sde.std(t).double()[:, None, None, None]
        return -(x - a * MU) / (a**2 * S**2 + sd**2)
    return score


def _measured(batch: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = MU + S * torch.randn(batch, 2, 8, 8, dtype=torch.float64, generator=g)
    return truth, truth + SIGMA * torch.randn(truth.shape, dtype=torch.float64, generator=g)


def _sigma_y(batch: int) -> torch.Tensor:
    return torch.full((batch,), SIGMA * math.sqrt(2))


@pytest.mark.parametrize("sde", [VPSDE(), DiscreteVPSDE(), VESDE(0.01, 50.0)], ids=lambda s: type(s).__name__)
def test_one_step_tweedie_is_the_posterior_mean(sde) -> None:
    truth, measured = _measured()
    sampler = build_sampler("tweedie", sde=sde)
    counter = NFECounter(_score(sde))
    out = sampler(counter, measured, noise_sigma=_sigma_y(64), generator=torch.Generator().manual_seed(1))
    mmse = MU + S**2 / (S**2 + SIGMA**2) * (measured - MU)
    assert counter.nfe == sampler.last_nfe == 1
    posterior_var = S**2 * SIGMA**2 / (S**2 + SIGMA**2)
    assert abs(float((out - truth).square().mean()) / posterior_var - 1) < 0.05  # the posterior mean's error
    if isinstance(sde, DiscreteVPSDE):
        # its noise levels are those of 1000 integer steps: the start is the step just above the measurement's
        # level, and the warm start tops the measurement's noise up to it (a small draw), so MMSE up to that
        assert float((out - mmse).square().mean()) < 0.01 * posterior_var
        return
    torch.testing.assert_close(out, mmse, atol=1e-5, rtol=0)
    # a point estimate: no random draw
    again = sampler(_score(sde), measured, noise_sigma=_sigma_y(64),
                    generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and sampler.deterministic


def test_a_point_estimate_refuses_k_samples_and_a_diffusion_sampler_takes_them() -> None:
    with pytest.raises(ValueError, match="deterministic point estimate.*warm_ddim"):
        build_sampler("tweedie").check_samples(2)
    build_sampler("tweedie").check_samples(1)
    build_sampler("warm_ddim").check_samples(8)
    # PnP from above the measurement's own noise level draws noise: it is not called deterministic
    assert build_sampler("pnp", t0_ratio=1.0).deterministic
    assert not build_sampler("pnp", t0_ratio=2.0).deterministic


def test_pnp_without_data_step_from_the_measurement_level_is_tweedie_at_its_first_step() -> None:
    """PnP's first step from t0_ratio 1 is the one-step MMSE; later steps denoise the re-noised estimate."""
    _, measured = _measured(batch=4)
    seen: list[dict] = []
    sampler = build_sampler("pnp", steps=3, t0_ratio=1.0, stop_ratio=0.25, dc="none")
    sampler(_score(VPSDE()), measured, noise_sigma=_sigma_y(4), callback=seen.append)
    mmse = MU + S**2 / (S**2 + SIGMA**2) * (measured - MU)
    torch.testing.assert_close(seen[0]["denoised"], mmse, atol=1e-5, rtol=0)
    assert len(seen) == 3 == sampler.last_nfe


@pytest.mark.parametrize("name", ["warm_ddim", "pnp"])
def test_the_noise_aware_stop_ends_each_slice_where_the_diffusion_noise_meets_the_measurements(name) -> None:
    sampler = build_sampler(name, steps=5, t0_ratio=4.0, stop_ratio=0.5)
    sigma_y = torch.tensor([0.05, 0.2, 0.4])
    times: list[torch.Tensor] = []
    sampler(_score(VPSDE()), MU.expand(3, -1, -1, -1).clone(), noise_sigma=sigma_y,
            generator=torch.Generator().manual_seed(0), callback=lambda d: times.append(d["t"]))
    stop = noise_aware_time(sampler.schedule, 0.5 * sigma_y.double() / math.sqrt(2), low=sampler.schedule.eps)
    start = noise_aware_time(sampler.schedule, 4.0 * sigma_y.double() / math.sqrt(2))
    torch.testing.assert_close(times[-1].double(), stop.to(times[-1]).double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(times[0].double(), start.to(times[0]).double(), atol=1e-6, rtol=0)
    sde = VPSDE()
    ratio = (sde.std(times[-1].double()) / sde.alpha(times[-1].double()))
    torch.testing.assert_close(ratio, 0.5 * sigma_y.double() / math.sqrt(2), rtol=1e-4, atol=0)
    assert len(times) == 5 and bool((times[-1] < times[0]).all())


def test_pc_with_a_stop_returns_each_slices_tweedie_estimate_at_its_stop_and_ends_early() -> None:
    seen: list[dict] = []
    sampler = build_sampler("warm_pc", steps=40, stop_ratio=1.0, dc="none")
    sigma_y = torch.tensor([0.1, 0.4])
    out = sampler(_score(VPSDE()), MU.expand(2, -1, -1, -1).clone(), noise_sigma=sigma_y,
                  generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert sampler.last_nfe < sampler.expected_nfe  # stopped before the end of the grid
    stops = noise_aware_time(sampler.schedule, sigma_y.double() / math.sqrt(2), low=sampler.schedule.eps)
    for b in range(2):  # the first step at or below the slice's stop gave its output
        first = next(d for d in seen if float(d["t"][b]) <= float(stops[b]))
        assert float(first["t"][b]) > float(stops[b]) - 0.4 / 40
    last_t = seen[-1]["t"]
    assert float(last_t[0]) <= float(stops[0]) and out.shape == (2, 2, 8, 8)


def test_spanning_and_options_are_checked() -> None:
    sched = Schedule.make(4, 0.5)
    f64 = torch.float64
    grid = sched.spanning(torch.tensor([0.5, 0.3], dtype=f64), torch.tensor([0.1, 0.3], dtype=f64)).timesteps
    assert grid.shape == (4, 2) and grid[0].tolist() == [0.5, 0.3] and grid[-1].tolist() == [0.1, 0.3]
    assert Schedule.make(1, 0.5).spanning(torch.tensor([0.2], dtype=f64)).timesteps.tolist() == [[0.2]]
    with pytest.raises(ValueError, match="t_stop"):
        sched.spanning(torch.tensor([0.2]), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="stop_ratio must be finite and >= 0"):
        build_sampler("pnp", stop_ratio=-1.0)
    with pytest.raises(ValueError, match="t0_ratio .* DDIM's and PnP's"):
        build_sampler("pc", t0_ratio=2.0)
    assert SAMPLERS["tweedie"].sample_fn is pnp_sampler and SAMPLERS["pc"].sample_fn is pc_sampler
    assert build_sampler("pnp", stop_ratio=0.5).settings()["stop_ratio"] == 0.5
