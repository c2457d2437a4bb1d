"""Undersampled data in the one inference path (issue 24): the noise-aware start at noise and aliasing
together, the registry's undersampled defaults, the TV start image, and zero outside the maps' support."""

from __future__ import annotations

import math

import pytest
import torch

from degradations import Measurement, complex_to_channels, make_regime
from diffusion import inference
from diffusion.inference import Reconstructor, tv_start
from diffusion.sampling.samplers import UNDERSAMPLED_PNP, Sampler, build_sampler, noise_aware_time

pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(n: int = 2, h: int = 32, w: int = 28) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = [((xx / (0.6 + 0.1 * i)) ** 2 + (yy / 0.7) ** 2 < 1).float() * (1 + 0.4 * yy) for i in range(n)]
    return torch.stack(imgs)[:, None].to(torch.complex64)


def _measure(acceleration: float | None = 3, estimate_maps: bool = True, snr_db: float = 30.0) -> Measurement:
    """2 slices, 4 birdcage coils; the maps estimated by ESPIRiT (0 outside the object) unless not."""
    mask = {} if acceleration is None else {"acceleration": acceleration, "center_fraction": 0.3,
                                            "mask": "equispaced"}
    degradation = make_regime("noise", snr_db=snr_db, coils=4, **mask)
    y, params = degradation(_phantom(), torch.Generator().manual_seed(0))
    sigma = params.pop("noise_sigma")
    if estimate_maps:
        params.pop("sensitivities")
    return Measurement.from_kspace(y, params, sigma, "recorded")


def test_the_start_follows_noise_and_aliasing_and_the_stop_the_noise_alone() -> None:
    sampler = build_sampler("pnp", steps=3, t0=1.0, t0_ratio=2.0, stop_ratio=1.0)
    x = torch.zeros(2, 2, 8, 8)
    noise, alias = torch.tensor([0.02, 0.05]), torch.tensor([0.1, 0.0])
    schedule = sampler.schedule_for(x, noise, alias)
    held = torch.hypot(noise, alias).double() / math.sqrt(2)
    eps = sampler.schedule.eps
    torch.testing.assert_close(schedule.timesteps[0], noise_aware_time(sampler.schedule, 2 * held, low=eps))
    torch.testing.assert_close(schedule.timesteps[-1],
                               noise_aware_time(sampler.schedule, noise.double() / math.sqrt(2), low=eps))
    torch.testing.assert_close(schedule.init_noise, held)
    assert float(schedule.timesteps[0, 0]) > float(sampler.schedule_for(x, noise).timesteps[0, 0])
    plain = sampler.schedule_for(x, noise)
    assert torch.equal(sampler.schedule_for(x, noise, torch.zeros(2)).timesteps, plain.timesteps)


def test_pnp_has_undersampled_defaults_under_the_options_a_user_sets() -> None:
    base = build_sampler("pnp")
    assert base.for_measurement(False) is base
    under = base.for_measurement(True)
    assert under is base.undersampled and under.undersampled is None
    keys = ("steps", "dc_lambda", "t0_ratio", "start", "start_lam", "start_error")
    assert (under.schedule.n_steps, under.dc_lambda, under.t0_ratio, under.start, under.start_lam,
            under.start_error) == tuple(UNDERSAMPLED_PNP[k] for k in keys)
    assert (base.schedule.n_steps, base.start, base.start_error) == (2, "degraded", 1.0)
    assert "start" in under.settings() and "start" not in base.settings()
    mine = build_sampler("pnp", steps=5, start="degraded", dc_lambda=3.0)
    for sampler in (mine, mine.for_measurement(True)):
        assert (sampler.schedule.n_steps, sampler.start, sampler.dc_lambda) == (5, "degraded", 3.0)
    assert mine.for_measurement(True).start_error == UNDERSAMPLED_PNP["start_error"]
    ddim = build_sampler("ddim")
    assert ddim.for_measurement(True) is ddim
    with pytest.raises(ValueError, match="unknown start 'cs'"):
        build_sampler("pnp", start="cs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_error must be finite and >= 0"):
        build_sampler("pnp", start_error=-1.0)
    with pytest.raises(ValueError, match="start_lam must be finite and > 0"):
        build_sampler("pnp", start_lam=0.0)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Record what `Sampler.posterior` is called with; it returns a magnitude of ones."""
    calls: list[dict[str, object]] = []

    def posterior(self: Sampler, score_fn: object, x_init: torch.Tensor, A: object, y: object, k: int,
                  generator: object, noise_sigma: torch.Tensor, alias_sigma: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append({"sampler": self, "x_init": x_init.clone(), "noise": noise_sigma, "alias": alias_sigma})
        self.last_nfe = 1
        ones = torch.ones(x_init.shape[0], 1, *x_init.shape[-2:])
        return ones, ones

    monkeypatch.setattr(Sampler, "posterior", posterior)
    return calls


def test_undersampled_data_start_from_tv_at_its_error_level_and_end_zero_outside_the_maps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """30 dB, 3x: the aliasing exceeds the noise, so the default ("auto") starts every slice from TV."""
    m = _measure()
    assert bool((m.alias_sigma > 2 * m.noise_sigma).all())
    calls = _spy(monkeypatch)
    sampler = build_sampler("pnp")
    out = Reconstructor(lambda v, t: v, sampler, batch_size=1)(m, complex_to_channels(m.degraded), [0, 1])
    assert [c["sampler"] for c in calls] == [sampler.undersampled] * 2
    lam, share = UNDERSAMPLED_PNP["start_lam"], UNDERSAMPLED_PNP["start_error"]
    for i, call in enumerate(calls):
        sl = slice(i, i + 1)
        torch.testing.assert_close(call["x_init"], complex_to_channels(tv_start(m, lam, sl)))
        torch.testing.assert_close(call["alias"], m.alias_sigma[sl] * share)
        torch.testing.assert_close(call["noise"], m.noise_sigma[sl])
    support = m.support.float()
    assert 0.2 < float(support.mean()) < 0.9
    assert torch.equal(out.mean, support) and torch.equal(out.std, support)
    assert out.settings == sampler.undersampled.settings() and out.settings["start"] == "auto"


@pytest.mark.parametrize("start", ["auto", "degraded", "tv"])
def test_where_the_noise_exceeds_the_aliasing_auto_starts_from_the_zero_filled_image(
        monkeypatch: pytest.MonkeyPatch, start: str) -> None:
    """0 dB, 2x: noise above the aliasing: "auto" and "degraded" start from the zero-filled image at its own
    aliasing (no start_error), "tv" from TV at start_error times it."""
    m = _measure(acceleration=2, snr_db=0.0)
    assert bool((m.alias_sigma < m.noise_sigma).all())
    calls = _spy(monkeypatch)
    sampler = build_sampler("pnp", start=start)  # type: ignore[arg-type]
    x_init = complex_to_channels(m.degraded)
    Reconstructor(lambda v, t: v, sampler, batch_size=2)(m, x_init, [0, 1])
    share = UNDERSAMPLED_PNP["start_error"] if start == "tv" else 1.0
    torch.testing.assert_close(calls[0]["alias"], m.alias_sigma * share)
    expected = complex_to_channels(tv_start(m, UNDERSAMPLED_PNP["start_lam"], slice(0, 2))) if start == "tv" \
        else x_init
    torch.testing.assert_close(calls[0]["x_init"], expected)


def test_fully_sampled_data_keep_the_degraded_start_and_no_aliasing(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _measure(acceleration=None, estimate_maps=False)
    assert m.mask is None
    calls = _spy(monkeypatch)
    monkeypatch.setattr(inference, "tv_start", lambda *a: pytest.fail("no TV start without a mask"))
    sampler = build_sampler("pnp")
    x_init = complex_to_channels(m.degraded)
    out = Reconstructor(lambda v, t: v, sampler, batch_size=2)(m, x_init, [0, 1])
    assert len(calls) == 1 and calls[0]["sampler"] is sampler and calls[0]["alias"] is None
    torch.testing.assert_close(calls[0]["x_init"], x_init)
    assert out.settings == sampler.settings()
