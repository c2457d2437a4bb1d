"""The one inference path (`diffusion.inference.Reconstructor`): batching, seeds, shapes, data scale
(the measurement it takes, its operator and noise level: tests/degradations/test_measurement.py)."""

from __future__ import annotations

import pytest
import torch

from degradations import Measurement, complex_to_channels, ifft2c, make_regime
from diffusion.inference import Reconstructor
from diffusion.sampling.samplers import build_sampler
from diffusion.sampling.sde import VPSDE

pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(n: int = 3, h: int = 24, w: int = 40) -> torch.Tensor:
    """Smooth complex test images [n,1,h,w] (ellipses of different sizes)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = [((xx / (0.5 + 0.1 * i)) ** 2 + (yy / 0.7) ** 2 < 1).float() * (1 + 0.3 * xx) for i in range(n)]
    return torch.stack(imgs)[:, None].to(torch.complex64)


def _measure(regime: str, snr_db: float = 10.0, seed: int = 0) -> tuple[Measurement, dict[str, torch.Tensor]]:
    """The simulated measurement of the phantom (recorded noise level) and its full parameters."""
    degradation = make_regime(regime, snr_db=snr_db)
    y, params = degradation(_phantom(), torch.Generator().manual_seed(seed))
    return Measurement.simulated(y, params, degradation), params


def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in prior: the score of N(0, I) data under the VP-SDE is -x."""
    return -x


@pytest.mark.parametrize(("regime", "tol"), [
    ("noise", 1e-5), pytest.param("noise_blur_t2star_b0", 5e-4, marks=pytest.mark.slow)])
def test_a_slice_does_not_depend_on_the_batch_size(regime: str, tol: float) -> None:
    """Same seed and slice index, same output whatever the batch (up to float32 rounding, which the B0
    regime's conjugate-gradient DC amplifies to ~1e-4)."""
    m, _ = _measure(regime)
    sampler = build_sampler("ddim", steps=6, eta=1.0)
    run = {bs: Reconstructor(score, sampler, batch_size=bs)(m, complex_to_channels(ifft2c(m.y)), [5, 6, 7],
                                                              seed=3, samples=2)
           for bs in (1, 3)}
    torch.testing.assert_close(run[1].mean, run[3].mean, atol=tol, rtol=tol)
    torch.testing.assert_close(run[1].std, run[3].std, atol=tol, rtol=tol)
    assert run[1].mean.shape == (3, 1, 24, 40) and (run[1].std > 0).any()
    other_seed = Reconstructor(score, sampler)(m, complex_to_channels(ifft2c(m.y)), [5, 6, 7], seed=4,
                                               samples=2)
    assert not torch.allclose(other_seed.mean, run[1].mean)
    assert run[1].nfe == 12


def test_bad_shapes_are_refused() -> None:
    m, _ = _measure("noise")
    x = complex_to_channels(ifft2c(m.y))
    rec = Reconstructor(score, build_sampler())
    with pytest.raises(ValueError, match="x_init must be"):
        rec(m, x[..., :-1], [0, 1, 2])
    with pytest.raises(ValueError, match="slice ids"):
        rec(m, x, [0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        Reconstructor(score, build_sampler(), batch_size=0)


def test_a_prior_data_scale_runs_the_sampler_in_the_priors_units_and_returns_the_slices() -> None:
    """With `data_scale` c per slice (a family's normalisation), the reconstruction is the one of the slices
    multiplied by c (x_init, y and the noise std), divided by c: the sampler sees the prior's data range, the
    caller gets its own units back; the factor is computed from y and the noise std."""
    m, params = _measure("noise_blur")
    y, sigma = m.y, params["noise_sigma"]
    x_init = complex_to_channels(ifft2c(y))
    c = torch.tensor([0.5, 2.0, 4.0])
    seen = []

    def data_scale(k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        seen.append((k, noise))
        return c

    sde = VPSDE()

    def gaussian(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # not scale-free: N(0.5, 0.3^2) data
        a, s = sde.alpha(t)[:, None, None, None], sde.std(t)[:, None, None, None]
        return -(x - a * 0.5) / (a**2 * 0.09 + s**2)

    sampler = build_sampler("warm_ddim", steps=4, sde=sde)
    scaled = Reconstructor(gaussian, sampler, data_scale=data_scale)(m, x_init, [0, 1, 2], seed=1, samples=2)
    torch.testing.assert_close(seen[0][0], y)
    torch.testing.assert_close(seen[0][1], sigma.float())
    cc = c[:, None, None, None]
    in_prior_units = Measurement.from_kspace(y * cc, m.params, sigma * c, "recorded")
    direct = Reconstructor(gaussian, sampler)(in_prior_units, x_init * cc, [0, 1, 2], seed=1, samples=2)
    torch.testing.assert_close(scaled.mean, direct.mean / cc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.std, direct.std / cc, rtol=1e-5, atol=1e-6)
    plain = Reconstructor(gaussian, sampler)(m, x_init, [0, 1, 2], seed=1, samples=2)
    assert not torch.allclose(plain.mean, scaled.mean, atol=1e-3)  # the scale matters to this prior
    with pytest.raises(ValueError, match="data_scale must give 3 finite factors > 0"):
        Reconstructor(gaussian, sampler, data_scale=lambda k, s: torch.tensor([1.0, 0.0, 1.0]))(
            m, x_init, [0, 1, 2])
