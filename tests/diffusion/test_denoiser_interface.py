"""The samplers see one denoiser interface: `sde.SDE` and `sde.Denoiser`, never the kind of SDE.

- Guard: the sampler modules name no SDE class (`VPSDE`, `DiscreteVPSDE`, `VESDE`) in their code (an ast scan
  of names, attributes, imports and string annotations; docstrings may mention them), so a branch on the
  kind cannot come back. The scan is shown to catch a planted `isinstance(sde, VESDE)`.
- Behaviour: for a Gaussian prior x_0 ~ N(MU, S^2) per pixel the marginal score of every SDE is closed-form,
  and each SDE's `Denoiser` returns the posterior mean E[x_0 | x_t] = MU + S^2 alpha / P (x_t - alpha MU),
  P = alpha^2 S^2 + std^2, at any t per slice; the kind-specific predictor-corrector pieces match the SDE's
  own discretisation. (`test_estimators.py` checks the same posterior mean through the one-step "tweedie"
  sampler, from a measured image.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from diffusion.sampling import data_consistency, samplers
from diffusion.sampling.samplers import NFECounter
from diffusion.sampling.sde import SDE, VESDE, VPSDE, Denoiser, DiscreteVPSDE

pytestmark = pytest.mark.usefixtures("one_thread")

#: the SDE classes the samplers must not name
KINDS = {"VPSDE", "DiscreteVPSDE", "VESDE"}
#: the modules that hold the sampler algorithms
SAMPLER_MODULES = [Path(samplers.__file__), Path(data_consistency.__file__)]

S = 0.5
MU = torch.linspace(-1, 1, 2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4)
ALL_SDES = [VPSDE(), DiscreteVPSDE(), VESDE(0.01, 50.0)]


def names_used(source: str) -> set[str]:
    """Every name the code of `source` uses: names, attribute names, imported names (and their aliases) and
    the names in string annotations; not the text of docstrings or other strings."""
    found: set[str] = set()

    def scan(tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                found.add(node.id)
            elif isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.alias):
                found.update(n for n in (node.name.split(".")[-1], node.asname) if n)
            annotations = []
            if isinstance(node, ast.arg | ast.AnnAssign):
                annotations.append(node.annotation)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                annotations.append(node.returns)
            for annotation in annotations:
                if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                    scan(ast.parse(annotation.value, mode="eval"))

    scan(ast.parse(source))
    return found


@pytest.mark.parametrize("path", SAMPLER_MODULES, ids=lambda p: p.name)
def test_the_samplers_name_no_kind_of_sde(path: Path) -> None:
    named = names_used(path.read_text()) & KINDS
    assert not named, (f"{path.name} names {sorted(named)}: a sampler asks the SDE interface (sde.SDE, "
                       "sde.Denoiser), never which kind of SDE it has")


@pytest.mark.parametrize("plant", [
    "def _branch(sde):\n    return isinstance(sde, VESDE)\n",
    "def _branch(sde):\n    return type(sde) is sde_module.DiscreteVPSDE\n",
    "from diffusion.sampling.sde import VPSDE as _Kind\n",
    "def _branch(sde: 'VPSDE | None') -> None:\n    pass\n",
])
def test_the_guard_catches_a_planted_branch_on_the_kind(plant: str) -> None:
    source = Path(samplers.__file__).read_text() + "\n\n" + plant
    assert names_used(source) & KINDS


def _gaussian_score(sde: SDE):
    """The exact marginal score of x_0 ~ N(MU, S^2) under `sde`: -(x - alpha MU) / (alpha^2 S^2 + std^2)."""
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sd = sde.alpha(t).double()[:, None, None, None], sde.std(t).double()[:, None, None, None]
        return -(x - a * MU) / (a**2 * S**2 + sd**2)
    return score


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_each_sdes_denoiser_is_the_gaussian_posterior_mean(sde: SDE) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.1, 0.3, 0.6, 0.95], dtype=torch.float64)  # one time per slice
    a, sd = sde.alpha(t).double()[:, None, None, None], sde.std(t).double()[:, None, None, None]
    x0 = MU + S * torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g)
    x_t = a * x0 + sd * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    counter = NFECounter(_gaussian_score(sde))
    x0_hat, score = Denoiser(counter, sde)(x_t, t)
    posterior_mean = MU + S**2 * a / (a**2 * S**2 + sd**2) * (x_t - a * MU)
    # exact up to the rounding of the SDE's alpha, std (a DiscreteVPSDE's discrete schedule is float32)
    tol = 1e-10 if sde.alpha(t).dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x0_hat, posterior_mean, rtol=tol, atol=tol)
    assert counter.nfe == 1 and torch.equal(score, _gaussian_score(sde)(x_t, t))
    assert x0_hat.dtype == x_t.dtype == score.dtype
    # the noise the score predicts is the noise x_t holds over alpha x0_hat (they differ in rounding only)
    torch.testing.assert_close(sde.eps_from_score(t, score), sde.eps_from_x0(x_t, t, x0_hat))
    torch.testing.assert_close(sde.scaled_std(t), (sd / a).flatten().to(sde.scaled_std(t).dtype))


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_ddim_renoising_with_eta_zero_and_the_same_time_gives_back_the_iterate(sde: SDE) -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    x0, eps = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    x, sigma = sde.renoise(x0, eps.double(), t, t, eta=0.0)
    a, sd = sde.alpha(t).double()[:, None, None, None], sde.std(t).double()[:, None, None, None]
    torch.testing.assert_close(x, a * x0 + sd * eps.double())
    assert not bool(sigma.any())


@pytest.mark.parametrize("sde", [VPSDE().grid(200), VESDE(0.01, 50.0).grid(200)], ids=["VPSDE", "VESDE"])
def test_the_predictor_corrector_pieces_are_the_sdes_own_discretisation(sde: SDE) -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64)
    x, score = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    f, G = sde.discretize(x, t)
    predictor = x - f + G[:, None, None, None] ** 2 * score
    torch.testing.assert_close(sde.reverse_diffusion_mean(x, score, G), predictor)
    # score_sde's Langevin corrector: alpha_i = 1 - beta_i of the VP discretisation, 1 for VE
    expected = sde.alphas[(t * (sde.N - 1)).long()] if isinstance(sde, VPSDE) else torch.ones(3)
    torch.testing.assert_close(sde.langevin_alpha(G), expected)


def test_the_grid_problem_is_the_vp_discretisations_alone() -> None:
    assert VPSDE().grid(20).grid_problem() == "a full grid of N = 20 <= beta_max = 20 steps"
    assert VPSDE().grid(21).grid_problem() is None
    assert DiscreteVPSDE().grid(10).grid_problem() is not None
    assert VESDE().grid(2).grid_problem() is None
