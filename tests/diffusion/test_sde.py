"""VP-SDE: marginals in closed form and by integrating the SDE, DDPM discretisation, score conventions."""

import math

import pytest
import torch

from diffusion.sampling.sde import VESDE, VPSDE, DiscreteVPSDE, get_score_fn

SDE = VPSDE(beta_min=0.1, beta_max=20.0, N=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_alpha_and_std_closed_form():
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    alpha = torch.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    torch.testing.assert_close(SDE.alpha(t), alpha)
    torch.testing.assert_close(SDE.std(t), torch.sqrt(1 - alpha**2))
    x = torch.randn(101, 2, 4, 4, dtype=torch.float64)
    mean, std = SDE.marginal_prob(x, t)
    torch.testing.assert_close(mean, alpha[:, None, None, None] * x)
    assert SDE.T == 1.0 and SDE.std(torch.zeros(1)).item() == 0.0


def test_marginals_match_integrated_moment_odes():
    """dm/dt = -beta m / 2 and dv/dt = -beta v + beta (the VP-SDE's moment ODEs), RK4 from m=1, v=0."""
    n = 4000
    h = 1.0 / n
    m, v = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)

    def rates(t, m, v):
        b = SDE.beta(torch.tensor([t], dtype=torch.float64))
        return -0.5 * b * m, -b * v + b

    checks = {}
    for i in range(n):
        t = i * h
        k1 = rates(t, m, v)
        k2 = rates(t + h / 2, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = rates(t + h / 2, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = rates(t + h, m + h * k3[0], v + h * k3[1])
        m = m + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v = v + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        if (i + 1) % 1000 == 0:
            checks[(i + 1) * h] = (m.clone(), v.clone())
    for t, (m_t, v_t) in checks.items():
        tt = torch.tensor([t], dtype=torch.float64)
        torch.testing.assert_close(m_t, SDE.alpha(tt), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(v_t, SDE.std(tt) ** 2, rtol=1e-8, atol=1e-10)


def test_euler_maruyama_simulation_matches_marginals():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((10000, 1, 1, 1), 1.5, dtype=torch.float64)
    x, n = x0.clone(), 200
    for i in range(n):
        t = torch.full((x.shape[0],), i / n, dtype=torch.float64)
        drift, diff = SDE.sde(x, t)
        x = x + drift / n + diff[:, None, None, None] * math.sqrt(1 / n) * torch.randn(
            x.shape, generator=g, dtype=torch.float64)
        if i + 1 in (60, 200):  # t = 0.3 and t = 1
            mean, std = SDE.marginal_prob(x0[:1], torch.tensor([(i + 1) / n], dtype=torch.float64))
            assert abs(x.mean().item() - mean.item()) < 0.04  # 4 standard errors
            assert abs(x.std().item() - std.item()) < 0.03


def test_ddpm_discretisation():
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    f, G = SDE.discretize(x, t)
    betas = torch.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    idx = (t * 999).long()
    torch.testing.assert_close(G, betas[idx].sqrt())
    torch.testing.assert_close(f, (torch.sqrt(1 - betas[idx])[:, None, None, None] - 1) * x)
    # the discrete chain's cumulative mean coefficient approximates the continuous alpha(t)
    log_cum = 0.5 * torch.cumsum(torch.log1p(-betas.double()), 0)
    i = torch.tensor([99, 499, 999])
    torch.testing.assert_close(log_cum[i], SDE.log_alpha((i + 1).double() / 1000), rtol=0, atol=0.05)


def test_labels_score_and_prior():
    t = torch.tensor([1e-5, 0.3, 1.0])
    torch.testing.assert_close(SDE.labels(t), 999 * t)
    out = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(SDE.score_from_output(out, t), -out / SDE.std(t)[:, None, None, None])
    seen = {}

    def net(x, labels):
        seen["labels"] = labels
        return out

    score = get_score_fn(net, SDE)(torch.zeros(3, 2, 4, 4), t)
    torch.testing.assert_close(seen["labels"], 999 * t)
    torch.testing.assert_close(score, -out / SDE.std(t)[:, None, None, None])
    a = SDE.prior_sampling((2, 2, 4, 4), torch.Generator().manual_seed(3))
    b = SDE.prior_sampling((2, 2, 4, 4), torch.Generator().manual_seed(3))
    assert a.shape == (2, 2, 4, 4) and torch.equal(a, b)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_continuous_sdes_draw_training_times_uniformly_in_eps_to_T(sde) -> None:
    g = torch.Generator().manual_seed(0)
    t = sde.sample_training_times(20000, 1e-3, generator=g)
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert float(t.min()) >= 1e-3 and float(t.max()) <= sde.T
    assert abs(float(t.mean()) - (sde.T + 1e-3) / 2) < 0.01  # uniform: the mean is the midpoint
    again = sde.sample_training_times(20000, 1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_the_discrete_sde_draws_training_times_on_its_integer_steps() -> None:
    sde = DiscreteVPSDE(N=10)
    t = sde.sample_training_times(5000, 0.5, generator=torch.Generator().manual_seed(1))
    steps = t * (sde.N - 1)
    assert torch.allclose(steps, steps.round(), atol=1e-5)  # on the grid i / (N - 1)
    assert set(steps.round().long().tolist()) == set(range(sde.N))  # every step, eps not applied (0 drawn)
