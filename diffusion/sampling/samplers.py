"""Reconstruction samplers for a score prior's SDE with k-space data consistency (plain torch, no Lightning).

Every sampler has one signature, k-diffusion style::

    sample_x(score_fn, x_init, schedule, dc=None, generator=None, callback=None) -> x

- `score_fn(x, t)`: any callable, x float `[B,2,H,W]` (real, imag), t float `[B]` -> score `[B,2,H,W]`
  (e.g. `sde.get_score_fn(net, sde)`).
- `x_init`: float `[B,2,H,W]`, the starting image (the degraded image). Every sampler starts from
  `x = alpha(t_start) x_init + std(t_start) z`; with `t_start = 1` that is (up to alpha(1) ~ 0.006) the prior.
  A batch holds any number of slices (or K copies of one slice); they are sampled in parallel.
- `schedule`: a `Schedule` (the model's SDE, its discretisation, the descending time grid and the sampler's
  options). Any SDE of `sde` works: `VPSDE` (continuous VP), `DiscreteVPSDE` (a DDPM chain, DDS) and `VESDE`
  (variance exploding, score-MRI). The samplers see only the `sde.SDE` interface (its marginal `alpha(t)`,
  `std(t)`, its Tweedie step, DDIM's re-noising and the pieces of score_sde's predictor and corrector) and
  the score function through a `sde.Denoiser` (x, t -> the Tweedie estimate x0_hat and the score); they
  never ask which kind of SDE they have.
- `dc`: a data-consistency step (`data_consistency.GradientDC` or `ProximalDC`, see `DataConsistency`):
  DDIM applies `dc(x0, sigma_t)` to its denoised (Tweedie) estimate, PC `dc.on_iterate(x, alpha_t, std_t)` to
  its noisy iterate.
- `generator`: a `torch.Generator` on x's device for every random draw (same seed -> same output), or a
  sequence of them, one per batch element (each slice's noise then depends on its own generator only, not on
  which other slices share its batch).
- `callback`: called after every step with a dict `{"i", "t", "x", "denoised", "nfe"}` (`t`: the step's
  time per slice `[B]`; `nfe`: network evaluations so far). To count evaluations outside a sampler wrap the
  score function in `NFECounter`; `Sampler.last_nfe` records the count of its last call.

NFE counts calls of `score_fn`, each on the whole batch: `pc_sampler` makes `n_steps * (1 + n_corrector)`
(fewer with a stop), `ddim_sampler` and `pnp_sampler` make `n_steps`.

Samplers:
- `pc_sampler`: score-MRI's predictor-corrector (score_sde's Langevin corrector then its
  reverse-diffusion predictor at each time of the grid, DC after each corrector and each predictor step; the
  result is the noise-free mean of the last predictor step). With `t_start < 1` it is the warm start.
- `ddim_sampler`: DDIM (deterministic for `eta = 0`); DC is applied to the Tweedie estimate
  of the clean image at each step, which is then re-noised to the next time.
- `pnp_sampler`: plug-and-play without fresh noise (DiffPIR with zeta = 0): the prior as an MMSE denoiser,
  the data by the proximal step, the noise re-estimated from the corrected estimate; a point estimate (an
  approximation of the posterior mean), not a sample. One step from the measurement's own noise level without
  DC is the prior's one-step Tweedie (MMSE) estimate of an image measured with white noise.

Estimator, not sample: for a sample x_s of p(x | y), E|x_s - x|^2 = 2 E|E[x | y] - x|^2, and PSNR / SSIM
reward the posterior mean. Hence the noise-aware *stop* (`stop_ratio`, every sampler; `Sampler.schedule_for`):
a slice ends where the diffusion noise std(t)/alpha(t) reaches `stop_ratio` times the measurement's and
returns its (DC'd) Tweedie estimate there, and the noise-aware *start* (`t0_ratio`) with a warm start that
tops up only the noise the measured image lacks (`Schedule.init_noise`). The mean of K samples
(`posterior_samples`, `--samples K --std-out`) remains the way to an uncertainty map.

`SAMPLERS` names the configurations ("pc", "warm_pc", "ddim", "warm_ddim", "pnp", "tweedie") with ALL their
defaults (steps, t0, DC kind and strength, start and stop): the one place they are set. `build_sampler`
turns a name and options (None: the registry's) into a `Sampler`, the entry point of every caller
(reconstruct, evaluate, predict, the validation callback, benchmarks); `DEFAULT_SAMPLER` is the name callers
use when the user names none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from diffusion.sampling.data_consistency import GradientDC, ProximalDC
from diffusion.sampling.options import DCKind, SamplerOptionFields, StartKind
from diffusion.sampling.sde import SDE, Denoiser, default_sde

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Generators = torch.Generator | Sequence[torch.Generator] | None

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "DataConsistency",
    "NFECounter",
    "Sampler",
    "SamplerSpec",
    "Schedule",
    "build_sampler",
    "ddim_sampler",
    "magnitude",
    "noise_aware_time",
    "pc_sampler",
    "pnp_sampler",
    "posterior_samples",
]


class LinearOperator(Protocol):
    """What data consistency needs of a forward operator (e.g. `degradations.ForwardOperator`)."""

    def forward(self, x: Tensor) -> Tensor: ...  # complex image [B,1,H,W] -> k-space [B,1,H,W]

    def adjoint(self, k: Tensor) -> Tensor: ...  # k-space [B,1,H,W] -> complex image [B,1,H,W]


class DataConsistency(Protocol):
    """A data-consistency step on float `[B,2,H,W]` images (`data_consistency.GradientDC`, `ProximalDC`)."""

    def __call__(self, x0: Tensor, sigma_t: Tensor) -> Tensor:
        """On a denoised estimate x0 whose error std is `sigma_t` `[B]` (image units)."""
        ...

    def on_iterate(self, x: Tensor, alpha: Tensor, std: Tensor) -> Tensor:
        """On a noisy iterate `x = alpha x0 + std z` (`alpha`, `std` `[B]`)."""
        ...


@dataclass(frozen=True)
class Schedule:
    """The time grid and options of a sampler.

    - `sde`: the SDE used for the PC discretisation (any `SDE`). Its `N` is the number of points of
      the FULL grid `linspace(T, eps, N)` whose spacing the steps have (score_sde's predictor and Langevin
      corrector use the discrete betas / sigmas `sde.discretize` gives at that resolution); `Schedule.make`
      sets it (`model_sde.grid(N)`).
    - `model_sde`: the model's SDE, whose marginal `alpha(t)`, `std(t)` the samplers use (warm start, the
      denoiser, DDIM, DC); None: `sde` (the same marginals where the grid is the model's SDE at another `N`,
      not for a discrete DDPM chain, whose grid is its continuous limit). See `marginals`.
    - `timesteps`: float64 `[n_steps]`, descending from `t_start` to `eps`; one (predictor or DDIM) step each.
      DDIM also takes one grid per slice, `[n_steps, B]` (`starting_at`: the noise-aware warm start).
    - `snr`, `n_corrector`: the Langevin corrector's target signal-to-noise ratio and steps per time (PC).
    - `eta`: DDIM's stochasticity (0 = deterministic, 1 = DDPM-like ancestral noise).
    - `denoise`: PC returns the mean of its last predictor step (score_sde's `noise_removal`), not the sample.
    - `autocast`: run `score_fn` under bf16 autocast (x's device type); the score is cast back to x's dtype.
    - `init_noise`: float64 `[B]` or None, the std per real channel of the white noise x_init already holds
      (image units; the measurement's, `sigma_y / sqrt(2)`): the warm start adds only the noise that brings
      it to the diffusion's `std(t)/alpha(t)` (`_warm_start`); None: x_init taken as noise-free.
    - `eps`: the earliest time of the full grid (`make`'s `eps`); the noise-aware times are clamped above it.
    - `t_stop`: float64 `[B]` or None, the noise-aware stop of a sampler on ONE grid (PC): each slice's output
      is its (DC'd) Tweedie estimate at the first grid time `<= t_stop`, not the end of the chain (`readout`).
      DDIM and PnP take their stop as the end of a per-slice grid instead (`spanning`).
    """

    sde: SDE
    timesteps: Tensor
    snr: float = 0.16
    n_corrector: int = 1
    eta: float = 0.0
    denoise: bool = True
    autocast: bool = False
    model_sde: SDE | None = None
    t_stop: Tensor | None = None
    eps: float = 1e-3
    init_noise: Tensor | None = None

    @classmethod
    def make(cls, n_steps: int, t_start: float = 1.0, eps: float = 1e-3, sde: SDE | None = None,
             **options: Any) -> Schedule:
        """`n_steps` times `linspace(t_start, eps, n_steps)`; the SDE's `N` matches that grid's spacing.

        For `t_start = 1` this is score_sde's grid `linspace(1, eps, N)` with `N = n_steps`; for a warm start
        `t_start < 1` it is the tail of a full grid with the same spacing (N ~ n_steps / t_start).
        `sde` is the model's SDE (any `SDE`; None: `sde.default_sde()`, score_sde's VP-SDE). `options` are
        the other fields (`snr`, `n_corrector`, `eta`, `denoise`, `autocast`).
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not 0.0 < eps < t_start <= SDE.T:
            raise ValueError(f"need 0 < eps < t_start <= 1, got eps={eps}, t_start={t_start}")
        dt = (t_start - eps) / (n_steps - 1) if n_steps > 1 else t_start - eps
        n_full = max(n_steps, round((SDE.T - eps) / dt) + 1)
        timesteps = torch.linspace(t_start, eps, n_steps, dtype=torch.float64)
        model_sde = default_sde() if sde is None else sde
        return cls(sde=model_sde.grid(n_full), timesteps=timesteps, model_sde=model_sde, eps=eps, **options)

    def spanning(self, t_start: Tensor, t_stop: Tensor | None = None) -> Schedule:
        """This schedule with one grid per slice, `[n_steps, B]`: `n_steps` evenly spaced times from each
        slice's `t_start` `[B]` down to its `t_stop` `[B]` (None: the schedule's `eps`), `t_stop <= t_start`
        (DDIM and PnP only; with one step the grid is `t_start`)."""
        t_start = t_start.detach().to("cpu", torch.float64).reshape(1, -1)
        end = torch.full_like(t_start, self.eps) if t_stop is None else \
            t_stop.detach().to("cpu", torch.float64).reshape(1, -1)
        if end.shape != t_start.shape or bool((end > t_start).any()):
            raise ValueError(f"t_stop {end.tolist()} must be <= t_start {t_start.tolist()}, one per slice")
        frac = torch.linspace(1.0, 0.0, self.n_steps, dtype=torch.float64)[:, None]  # one step: [1.0]
        return dataclasses.replace(self, timesteps=end + (t_start - end) * frac)

    @property
    def marginals(self) -> SDE:
        """The SDE of the model's marginals alpha(t), std(t): `model_sde`, or `sde` when that is None."""
        return self.sde if self.model_sde is None else self.model_sde

    @property
    def n_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def t_start(self) -> float:
        """The start time (the latest over the slices for a per-slice grid)."""
        return float(self.timesteps[0].max())

    def times(self, i: int, x: Tensor) -> Tensor:
        """The `i`-th time of every slice of x, `[B]` in x's dtype and device (one grid or one per slice)."""
        return self.timesteps[i].to(device=x.device, dtype=x.dtype).expand(x.shape[0])


class NFECounter:
    """Wraps a score function and counts its calls in `.nfe` (one call = one batched network evaluation)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


def _bc(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _randn(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x; one generator per batch element when a sequence is given."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                        for g in generator])


#: a warm start's top-up noise below this fraction of the start's std is not drawn (0.005 % of the variance)
_TOP_UP_TOL = 1e-2


def _warm_start(x_init: Tensor, schedule: Schedule, generator: Generators) -> Tensor:
    """`alpha x_init + s z` at each slice's start time (VE: alpha = 1), with `s = std(t_start)`, or where
    x_init holds white noise of std `init_noise` per channel, `s = sqrt(std^2 - alpha^2 init_noise^2)` (0 when
    the noise it holds is already at or above the start's, or within `_TOP_UP_TOL` of it, a bisection's
    error): the start then has the diffusion's noise level, not more. No random draw where every `s` is 0."""
    t = schedule.times(0, x_init)
    mean, std = schedule.marginals.marginal_prob(x_init, t)
    if schedule.init_noise is not None:
        held = schedule.marginals.alpha(t) * schedule.init_noise.to(device=x_init.device, dtype=x_init.dtype)
        top_up = (std**2 - held**2).clamp_min(0)
        std = torch.where(top_up > _TOP_UP_TOL**2 * std**2, top_up.sqrt(), torch.zeros_like(std))
        if not bool((std > 0).any()):
            return mean
    return mean + _bc(std) * _randn(x_init, generator)


@torch.no_grad()
def check_pc_grid(schedule: Schedule, what: str) -> None:
    """ValueError (naming `what`) when score_sde's discretisation cannot take the schedule's grid
    (`SDE.grid_problem` of its full grid N ~ n_steps / t_start; the VP-SDE's needs N > beta_max, so that
    beta_i = beta_max / N < 1)."""
    problem = schedule.sde.grid_problem()
    if problem is not None:
        raise ValueError(f"{what} with {schedule.n_steps} steps from t0 = {schedule.t_start:g} has "
                         f"{problem}, which score_sde's discretisation cannot take: more steps or a smaller "
                         "t0")


def pc_sampler(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DataConsistency | None = None,
               generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """score-MRI's predictor-corrector sampler with data consistency; float `[B,2,H,W]`.

    At each time t of `schedule.timesteps`: `n_corrector` Langevin steps (step size
    `2 alpha_i (snr ||z|| / ||score||)^2`, alpha_i the SDE's `langevin_alpha` (VP: 1 - beta_i, VE: 1), norms
    averaged over the batch as in score_sde), each followed by DC; then one reverse-diffusion predictor step
    `x <- x - f + G^2 score + G z` (G from `schedule.sde.discretize`, the mean `x - f + G^2 score` the SDE's
    `reverse_diffusion_mean`: VP f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i); VE f = 0,
    G = sqrt(sigma_i^2 - sigma_{i-1}^2)), followed by DC. DC acts on the noisy
    iterate (`dc.on_iterate(x, alpha(t), std(t))` of the model's marginals; the gradient step is
    score-MRI's). Returns the DC'd mean of the last predictor step (`denoise`, score-MRI's output, treated as
    noise-free) or the last sample. NFE = `n_steps * (1 + n_corrector)`. score_sde's VP discretisation needs
    `beta_max / N < 1` (N: the full grid, ~ n_steps / t_start), i.e. more than 20 steps from t = 1; fewer
    raise ValueError.
    """
    sde, denoiser = schedule.sde, Denoiser(score_fn, schedule.marginals, schedule.autocast)
    marginals = denoiser.sde
    check_pc_grid(schedule, "the PC sampler")

    def consistent(x: Tensor, t: Tensor) -> Tensor:
        return x if dc is None else dc.on_iterate(x, marginals.alpha(t), marginals.std(t))

    t_first = torch.full((x_init.shape[0],), schedule.t_start, device=x_init.device, dtype=x_init.dtype)
    x = consistent(_warm_start(x_init, schedule, generator), t_first)
    x_mean, nfe = x, 0
    readout = _Readout(schedule.t_stop, x)
    # G_i of all steps at once (sde.discretize; VP: G_i = sqrt(beta_i), VE: sqrt(sigma_i^2 - sigma_{i-1}^2)):
    # one host-to-device copy instead of one per step
    _, g_all = sde.discretize(torch.zeros(schedule.n_steps, 1, 1, 1), schedule.timesteps)
    g_all = g_all.to(device=x.device, dtype=x.dtype)
    times = schedule.timesteps.tolist()
    for i, t_i in enumerate(times):
        t = torch.full((x.shape[0],), t_i, device=x.device, dtype=x.dtype)
        G = g_all[i].expand(x.shape[0])
        for _ in range(schedule.n_corrector):  # Langevin corrector (score_sde's)
            grad = denoiser.score(x, t)
            noise = _randn(x, generator)
            grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
            noise_norm = torch.linalg.vector_norm(noise.flatten(1), dim=1).mean()
            ratio = (schedule.snr * noise_norm / grad_norm) ** 2
            step = 2 * sde.langevin_alpha(G) * ratio
            x = consistent(x + _bc(step) * grad + _bc(torch.sqrt(2 * step)) * noise, t)
        # reverse-diffusion predictor (score_sde's discretisation): x - f + G^2 score + G z
        score = denoiser.score(x, t)
        nfe += 1 + schedule.n_corrector
        if readout.due(t):  # the noise-aware stop: the Tweedie estimate at this time, for the slices due
            x0 = marginals.denoise(x, t, score)
            readout.take(t, x0 if dc is None else dc(x0, marginals.scaled_std(t)))
            if readout.done:
                if callback is not None:
                    callback({"i": i, "t": t, "x": x, "denoised": readout.out, "nfe": nfe})
                return readout.out
        x_mean = sde.reverse_diffusion_mean(x, score, G)
        t_next = torch.full_like(t, times[i + 1] if i + 1 < len(times) else 0.0)
        x = consistent(x_mean + _bc(G) * _randn(x, generator), t_next)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x_mean, "nfe": nfe})
    last = x if not schedule.denoise else consistent(x_mean, torch.zeros_like(x_mean[:, 0, 0, 0]))
    return readout.finish(last)


class _Readout:
    """The noise-aware stop of a sampler on one grid: each slice's output is the estimate given at the first
    step whose time is `<= t_stop` of that slice (`t_stop` `[B]`; None: the end of the chain)."""

    def __init__(self, t_stop: Tensor | None, like: Tensor) -> None:
        self.t_stop = None if t_stop is None else t_stop.to(device=like.device, dtype=like.dtype).reshape(-1)
        self.out = torch.zeros_like(like)
        self.taken = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)

    def _now(self, t: Tensor) -> Tensor:
        return (t <= self.t_stop) & ~self.taken

    def due(self, t: Tensor) -> bool:
        """Whether some slice stops at time `t` `[B]`."""
        return self.t_stop is not None and bool(self._now(t).any())

    def take(self, t: Tensor, estimate: Tensor) -> None:
        """Record `estimate` `[B,...]` for the slices that stop at `t`."""
        now = self._now(t)
        self.out[now] = estimate[now]
        self.taken |= now

    @property
    def done(self) -> bool:
        return self.t_stop is not None and bool(self.taken.all())

    def finish(self, last: Tensor) -> Tensor:
        """The recorded estimates, `last` for the slices that never reached their stop."""
        return last if self.t_stop is None else torch.where(self.taken[:, None, None, None], self.out, last)


@torch.no_grad()
def ddim_sampler(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule,
                 dc: DataConsistency | None = None,
                 generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """DDIM with data consistency on the clean estimate; float `[B,2,H,W]`.

    With the model's marginals (`schedule.marginals`; VE: alpha = 1, std = sigma(t)), at each time t (next
    time s, 0 after the last): the denoiser's Tweedie `x0 = (x + std_t^2 score) / alpha_t`,
    `eps = -std_t score` (`SDE.eps_from_score`), `x0 <- dc(x0, std_t / alpha_t)` (the estimate's noise level
    in image units), then (`SDE.renoise`) `x <- alpha_s x0 + sqrt(std_s^2 - sigma^2) eps + sigma z` with the
    posterior std `sigma = eta * (std_s / std_t) sqrt(std_t^2 - (alpha_t / alpha_s)^2 std_s^2)` (VP:
    `sqrt(1 - alpha_t^2 / alpha_s^2)`). Returns the last `dc(x0)`.
    Deterministic given x's starting noise when `eta = 0`. NFE = `n_steps`.
    """
    return _denoising_loop(score_fn, x_init, schedule, dc, generator, callback, schedule.eta, False)


def _denoising_loop(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DataConsistency | None,
                    generator: Generators, callback: Callback | None, eta: float,
                    noise_from_estimate: bool) -> Tensor:
    """DDIM's loop (`ddim_sampler`); with `noise_from_estimate` the noise carried to the next time is
    re-estimated from the DC'd estimate, `(x - alpha_t x0) / std_t` (`SDE.eps_from_x0`), not the network's
    (`pnp_sampler`)."""
    denoiser = Denoiser(score_fn, schedule.marginals, schedule.autocast)
    sde = denoiser.sde
    x = _warm_start(x_init, schedule, generator)
    x0 = x
    for i in range(schedule.n_steps):
        t = schedule.times(i, x)
        x0, score = denoiser(x, t)
        if dc is not None:
            x0 = dc(x0, sde.scaled_std(t))
        if i + 1 < schedule.n_steps:
            eps_hat = sde.eps_from_x0(x, t, x0) if noise_from_estimate else sde.eps_from_score(t, score)
            x, sigma = sde.renoise(x0, eps_hat, t, schedule.times(i + 1, x), eta)
            if eta > 0:
                x = x + sigma * _randn(x, generator)
        else:
            x = x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0, "nfe": i + 1})
    return x0


@torch.no_grad()
def pnp_sampler(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DataConsistency | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """Plug-and-play estimate without fresh noise (DiffPIR with zeta = 0); float `[B,2,H,W]`.

    The prior is used as an MMSE denoiser and the data enter by the proximal step; no noise is drawn after the
    start. Start (`_warm_start`): `x = alpha(t_0) x_init`, plus only the noise that brings x_init's own noise
    (`schedule.init_noise`) to the start's level; where the start's level is the measurement's (the
    noise-aware start with `t0_ratio` 1) nothing is drawn and the estimate is deterministic. At each time t
    of the grid (descending, per slice with `Schedule.spanning`; next time s): Tweedie
    `x0 = (x + std_t^2 score) / alpha_t`, `x0 <- dc(x0, std_t / alpha_t)`, the noise re-estimated from the
    corrected estimate `eps = (x - alpha_t x0) / std_t`, `x <- alpha_s x0 + std_s eps`. Returns the last
    (DC'd) x0: with the noise-aware stop, the estimate where the diffusion noise meets the measurement's. One
    step from `t0_ratio` 1 without DC is the prior's one-step MMSE (Tweedie) estimate of an image measured
    with white noise (the noise regime). NFE = `n_steps`. (DDIM's loop with eta 0 and the re-estimated noise.)
    """
    return _denoising_loop(score_fn, x_init, schedule, dc, generator, callback, 0.0, True)


SampleFn = Callable[..., Tensor]


@torch.no_grad()
def noise_aware_time(schedule: Schedule, ratio: Tensor, low: float | None = None, iters: int = 40) -> Tensor:
    """Per-slice times `[B]` (float64, CPU): where the model's marginals have `std(t) / alpha(t)` (the
    diffusion noise in image units) equal to `ratio` `[B]`, found by bisection on [low, t0] (t0 the
    schedule's start; `low` default 10 eps, eps its end); clamped to that interval. The noise-aware start
    (`t0_ratio`) and stop (`stop_ratio`) of `Sampler.schedule_for`."""
    sde = schedule.marginals
    low = min(10 * schedule.eps, schedule.t_start) if low is None else min(low, schedule.t_start)
    lo = torch.full(ratio.shape, low, dtype=torch.float64)
    hi = torch.full(ratio.shape, schedule.t_start, dtype=torch.float64)
    target = ratio.detach().to("cpu", torch.float64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = sde.scaled_std(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


def magnitude(x: Tensor) -> Tensor:
    """Magnitude image `[B,1,H,W]` of a float `[B,2,H,W]` (real, imag) image."""
    return torch.sqrt(x[:, :1] ** 2 + x[:, 1:2] ** 2)


def posterior_samples(
    sampler: SampleFn, score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DataConsistency | None,
    k: int, generator: Generators = None,
) -> tuple[Tensor, Tensor]:
    """K posterior samples per slice -> per-pixel (mean, std) of the MAGNITUDE images, each `[B,1,H,W]`.

    The mean of the K magnitude images is the reconstruction, their sample standard deviation (ddof = 1; zeros
    for K = 1) the uncertainty map. The K samples run one after the other on the whole batch (memory as for
    one reconstruction; each draws new noise from `generator`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mags = torch.stack([magnitude(sampler(score_fn, x_init, schedule, dc, generator)) for _ in range(k)])
    std = mags.std(dim=0) if k > 1 else torch.zeros_like(mags[0])
    return mags.mean(dim=0), std


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler configuration and its defaults: the sample function, number of steps, start time, the
    data-consistency kind and its strength (`dc_weight` of the gradient step; `dc_lambda` and `dc_floor` of
    the proximal step's coupling rho_t = 1 / (sigma_t^2 / dc_lambda + dc_floor^2)), (DDIM, PnP) `t0_ratio`,
    the noise-aware start, and `stop_ratio`, the noise-aware stop (`Sampler.schedule_for`; 0: every slice
    starts at t0, runs to eps). Undersampled data (a measurement with a mask, `diffusion.inference`): `start`
    the image the sampler starts from ("degraded": the zero-filled image; "tv": a TV compressed-sensing
    reconstruction with `lam = start_lam * sigma_img`; "auto": per slice the TV image where the zero-filled
    image's aliasing std exceeds the noise std, the zero-filled image elsewhere), `start_error` the TV
    image's error std as a fraction of the zero-filled image's aliasing (`Measurement.alias_sigma`; the
    zero-filled image's is 1 by definition), and `undersampled` the options that replace these defaults there
    (None: the same defaults)."""

    sample_fn: SampleFn
    steps: int
    t0: float
    dc: DCKind
    dc_weight: float = 0.3
    dc_lambda: float = 1.0
    dc_floor: float = 0.0
    t0_ratio: float = 0.0
    stop_ratio: float = 0.0
    start: StartKind = "degraded"
    start_lam: float = 0.125
    start_error: float = 1.0
    undersampled: Mapping[str, Any] | None = None


#: name -> configuration and defaults (the one place they are set). "pc" is the paper's reference: score-MRI's
#: N = 2000 predictor steps with one corrector each (NFE 4000), the gradient DC step of weight 0.3 after each.
#: The others use the noise-aware proximal DC. warm_ddim's t0, steps and dc_lambda were chosen on VALIDATION
#: volumes with `experiments/benchmarks/sampling.py --tune warm_ddim` (experiments/RESULTS.md: the proximal
#: step needs a strong coupling, lambda ~ 32; fewer steps from a lower t0 beat more steps), its dc_floor with
#: `--defaults-only --floors` at 30 dB and at the regimes' 2-7 dB (0.02: keeps precise data, neutral at low
#: SNR; 0.05 and more amplify noise where blur attenuates k-space); the other samplers share them, untuned.
#: warm_ddim's t0_ratio (the noise-aware start: each slice starts where the diffusion noise std(t)/alpha(t) is
#: 12 times the measurement noise per channel, sigma_y / sqrt(2), at most at t0) and its dc_floor 0 were
#: chosen together with `--defaults-only --t0-ratios --floors` at 30 dB, 15 dB and 2-7 dB: at 2-7 dB every
#: slice starts at t0, at 30 dB around t ~ 0.05; with the late start the floor that kept precise data at a
#: fixed t0 is no longer needed (floor 0: validation SSIM 0.832 at 30 dB against 0.616 with 0.02, and
#: +0.008 at 2-7 dB; experiments/RESULTS.md). ddim keeps its cold start (t0 1, t0_ratio 0); the fixed starts
#: keep floor 0.02.
#: The default is an MMSE estimate, not a sample (issue 21): "pnp" (DiffPIR without fresh noise) from the
#: measurement's own noise level (t0_ratio 1: nothing drawn; PnP may start as late as eps) to eps, 2 NFE,
#: dc_lambda 2048, chosen on VALIDATION at 2-7 dB and 30 dB with `sampling.py --grid`
#: (experiments/RESULTS.md, "The estimate: the posterior mean"): with the shipped prior mean SSIM 0.829 /
#: 0.949 (2-7 dB / 30 dB); 1 or 3 steps score lower, dc_lambda 32 loses 2-7 dB by 0.025 (equal at 30 dB), any
#: floor costs SSIM; the noise-aware stop (stop_ratio 0.05, 0.1) costs 0.013-0.055 at 2-7 dB for this
#: deterministic estimate (it helps the samplers: warm_ddim with stop_ratio 1, +0.10 with the first prior); a
#: start clamped at 10 eps, as DDIM's, cost 0.039 SSIM and 2.3 dB at 30 dB. "tweedie" is its one-step form
#: without DC (the exact MMSE estimate of an image measured with white noise).
#: pnp's defaults on undersampled data (`SamplerSpec.undersampled`), chosen on VALIDATION slices (Colin27
#: axial 65, 90, 115, never the benchmark's test slices; 8 coils, ESPIRiT maps, equispaced, 4x / 8x at 30 dB
#: and 2x at 2-7 dB; experiments/RESULTS.md, "Undersampled multi-coil"): 20 PnP steps from the start image's
#: own error level (t0_ratio 1; 10 and 40 steps score the same), the proximal step's lambda 0.25 (1 and 1/16
#: lower), the start "auto": TV (lam 0.125 sigma_img, tv_cs's best on the same slices) where the aliasing
#: exceeds the noise (4x / 8x at 30 dB: aliasing / noise 5.6-6.9), the zero-filled image where it does not
#: (2x at 2-7 dB: 0.25-0.29; a TV start there lost 1.0-1.4 dB in the noise regime, 0.1-0.2 dB with blur,
#: T2* and B0), the TV image taken to
#: hold 3 times the zero-filled aliasing (start_error 0.25 / 1 / 2 / 3 / 4: 4x 31.22 / 31.81 / 31.99 / 31.98 /
#: 31.93 dB, 8x 23.85 / 24.19 / 24.39 / 24.48 / 24.51 dB; TV-CS 30.53 and 23.70 dB)
UNDERSAMPLED_PNP: dict[str, Any] = {"steps": 20, "t0": 1.0, "t0_ratio": 1.0, "dc_lambda": 0.25,
                                    "start": "auto", "start_lam": 0.125, "start_error": 3.0}
SAMPLERS: dict[str, SamplerSpec] = {
    "pc": SamplerSpec(pc_sampler, steps=2000, t0=1.0, dc="gradient", dc_weight=0.3),
    "warm_pc": SamplerSpec(pc_sampler, steps=30, t0=0.4, dc="proximal", dc_lambda=32.0, dc_floor=0.02),
    "ddim": SamplerSpec(ddim_sampler, steps=50, t0=1.0, dc="proximal", dc_lambda=32.0, dc_floor=0.02),
    "warm_ddim": SamplerSpec(ddim_sampler, steps=10, t0=0.25, dc="proximal", dc_lambda=32.0, dc_floor=0.0,
                             t0_ratio=12.0),
    "pnp": SamplerSpec(pnp_sampler, steps=2, t0=0.5, dc="proximal", dc_lambda=2048.0, t0_ratio=1.0,
                       undersampled=UNDERSAMPLED_PNP),
    "tweedie": SamplerSpec(pnp_sampler, steps=1, t0=0.5, dc="none", t0_ratio=1.0),
}
#: upper bounds of a request (so a typo cannot start days of work): steps per sample (the paper's PC uses
#: 2000) and posterior samples per slice
MAX_STEPS = 10_000
MAX_SAMPLES = 1_000
#: the sampler every command uses when the user names none
DEFAULT_SAMPLER = "pnp"


@dataclass
class Sampler:
    """A ready-to-run sampler: sample function + schedule + data consistency (built by `build_sampler`).

    `sampler(score_fn, x_init, A, y, generator, noise_sigma=...)` builds the DC step (`make_dc`), runs the
    sample function and records the network evaluations in `last_nfe`. With `t0_ratio > 0` (DDIM) and the
    noise std known, each slice gets its own start time (`schedule_for`): a warm start that adds as much
    diffusion noise as the measurement needs, so precise data are not drowned at a fixed t0.
    """

    name: str
    sample_fn: SampleFn
    schedule: Schedule
    dc: DCKind = "proximal"
    dc_weight: float = 0.3
    dc_lambda: float = 1.0
    dc_floor: float = 0.0
    t0_ratio: float = 0.0
    stop_ratio: float = 0.0
    start: StartKind = "degraded"
    start_lam: float = 0.125
    start_error: float = 1.0
    undersampled: Sampler | None = field(default=None, repr=False)
    last_nfe: int = field(default=0, init=False)

    def for_measurement(self, undersampled: bool) -> Sampler:
        """The sampler for a measurement with a sampling mask (`undersampled`: the registry's undersampled
        defaults, `SamplerSpec.undersampled`, under the options the user set) or without (this one)."""
        return self.undersampled if undersampled and self.undersampled is not None else self

    @property
    def deterministic(self) -> bool:
        """True for a point estimate that draws no noise (PnP from the measurement's own noise level,
        `0 < t0_ratio <= 1`; the one-step Tweedie estimate): K samples would be equal."""
        return self.sample_fn is pnp_sampler and 0 < self.t0_ratio <= 1

    def check_samples(self, k: int) -> None:
        """ValueError unless `k` samples per slice make sense for this sampler (`k >= 1`; 1 for a point
        estimate, whose K outputs would be identical and whose std map would be zero)."""
        if not 1 <= k <= MAX_SAMPLES:
            raise ValueError(f"samples must be from 1 to {MAX_SAMPLES}, got {k}")
        if k > 1 and self.deterministic:
            raise ValueError(f"sampler {self.name!r} is a deterministic point estimate (the posterior mean's "
                             f"approximation): {k} samples would be identical; for posterior samples and a "
                             "std map use a diffusion sampler, e.g. --sampling.sampler warm_ddim")

    @property
    def expected_nfe(self) -> int:
        """NFE of one call (each evaluation covers the whole batch)."""
        per_step = 1 + self.schedule.n_corrector if self.sample_fn is pc_sampler else 1
        return self.schedule.n_steps * per_step

    def settings(self) -> dict[str, Any]:
        """The settings that define this sampler's output (for result files and logs)."""
        out: dict[str, Any] = {"sampler": self.name, "steps": self.schedule.n_steps,
                               "t0": self.schedule.t_start, "t0_ratio": self.t0_ratio,
                               "stop_ratio": self.stop_ratio, "dc": self.dc, "nfe": self.expected_nfe}
        if self.dc == "gradient":
            out["dc_weight"] = self.dc_weight
        elif self.dc == "proximal":
            out["dc_lambda"] = self.dc_lambda
            out["dc_floor"] = self.dc_floor
        if self.undersampled is None:  # this sampler is the one undersampled data get
            out.update(start=self.start, start_lam=self.start_lam, start_error=self.start_error)
        return out

    def schedule_for(self, x_init: Tensor, noise_sigma: Tensor | None,
                     alias_sigma: Tensor | None = None) -> Schedule:
        """The schedule for these slices, with the noise std per complex k-space sample known
        (`noise_sigma` `[B]`; None: the schedule as it is). Noise-aware start (`t0_ratio > 0`): each slice
        starts where the diffusion noise `std(t)/alpha(t)` is `t0_ratio` times the measurement's per
        real channel, `sigma_y / sqrt(2)`, at most at the schedule's t0. Undersampled data
        (`alias_sigma` `[B]`, the complex std per pixel of the zero-filled image's aliasing,
        `Measurement.alias_sigma`; None or 0: none): x_init's error is noise and aliasing, so the start
        follows `sqrt(sigma_y^2 + alias_sigma^2) / sqrt(2)` and the warm start tops up only what that level
        lacks (the stop and the data consistency keep `sigma_y`). Noise-aware stop (`stop_ratio > 0`):
        each slice ends where it is `stop_ratio` times that (at least eps, at most its start), and its
        output is the (DC'd) Tweedie estimate there: the posterior mean's approximation instead of a
        sample run to t ~ 0, whose last steps add detail the data cannot veto. DDIM and PnP take one grid per
        slice from start to stop (`Schedule.spanning`), PC its grid with a readout at the stop."""
        if noise_sigma is None:
            return self.schedule
        per_channel = noise_sigma.detach().cpu().double().reshape(-1) / math.sqrt(2)  # complex std -> channel
        known = torch.isfinite(per_channel)  # inf: y says nothing; such a slice runs the plain schedule
        noise = torch.where(known, per_channel, 0.0)
        alias = None if alias_sigma is None else \
            alias_sigma.detach().cpu().double().reshape(-1) / math.sqrt(2)
        held = noise if alias is None else torch.where(known, torch.hypot(per_channel, alias), 0.0)
        if self.t0_ratio == 0 and self.stop_ratio == 0:
            return dataclasses.replace(self.schedule, init_noise=held)
        start = torch.full_like(per_channel, self.schedule.t_start)
        if self.t0_ratio > 0:  # PnP may start as late as eps (precise data), DDIM at 10 eps
            low = self.schedule.eps if self.sample_fn is pnp_sampler else None
            start = torch.where(known, noise_aware_time(self.schedule, self.t0_ratio * held, low), start)
        stop = None if self.stop_ratio == 0 else torch.minimum(torch.where(
            known, noise_aware_time(self.schedule, self.stop_ratio * noise, low=self.schedule.eps),
            self.schedule.eps), start)
        if self.sample_fn is pc_sampler:
            return dataclasses.replace(self.schedule, t_stop=stop, init_noise=held)
        return dataclasses.replace(self.schedule.spanning(start, stop), init_noise=held)

    def make_dc(self, A: LinearOperator | None, y: Tensor | None,
                noise_sigma: Tensor | None = None) -> DataConsistency | None:
        """The DC step for operator A, k-space y and (proximal DC) the noise std per complex k-space sample
        `noise_sigma` `[B]`; None when A or y is None or the DC is off."""
        if A is None or y is None or self.dc == "none" or (self.dc == "gradient" and self.dc_weight == 0):
            return None
        if self.dc == "gradient":
            return GradientDC(A, y, self.dc_weight)
        if noise_sigma is None:
            raise ValueError("the proximal data consistency needs the k-space noise std (noise_sigma)")
        return ProximalDC(A, y, noise_sigma, self.dc_lambda, self.dc_floor)

    def __call__(self, score_fn: ScoreFn, x_init: Tensor, A: LinearOperator | None = None,
                 y: Tensor | None = None, generator: Generators = None, callback: Callback | None = None,
                 noise_sigma: Tensor | None = None, alias_sigma: Tensor | None = None) -> Tensor:
        """Reconstruct float `[B,2,H,W]` from `x_init` `[B,2,H,W]` (and the measurement A, y, noise_sigma;
        `alias_sigma`: undersampled data's aliasing, `schedule_for`)."""
        counter = NFECounter(score_fn)
        dc = self.make_dc(A, y, noise_sigma)
        schedule = self.schedule_for(x_init, noise_sigma, alias_sigma)
        x = self.sample_fn(counter, x_init, schedule, dc, generator, callback)
        self.last_nfe = counter.nfe
        return x

    def posterior(self, score_fn: ScoreFn, x_init: Tensor, A: LinearOperator | None = None,
                  y: Tensor | None = None, k: int = 1, generator: Generators = None,
                  noise_sigma: Tensor | None = None,
                  alias_sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`posterior_samples` with this sampler: magnitude (mean, std) `[B,1,H,W]`; `last_nfe`: total NFE."""
        self.check_samples(k)
        counter = NFECounter(score_fn)
        dc = self.make_dc(A, y, noise_sigma)
        schedule = self.schedule_for(x_init, noise_sigma, alias_sigma)
        out = posterior_samples(self.sample_fn, counter, x_init, schedule, dc, k, generator)
        self.last_nfe = counter.nfe
        return out


@dataclass(frozen=True)
class SamplerOptions(SamplerOptionFields):
    """A sampler as a user chooses it (its fields, their help texts: `options.SamplerOptionFields`): a
    `SAMPLERS` name and the options they set, None taking the registry's default. The one type of every entry
    point: `lfmri reconstruct` / `evaluate` / `predict` `--sampling.<field>` and the validation callback's
    `sampling` block; `build` checks it."""

    def build(self, sde: SDE | None = None) -> Sampler:
        """The `Sampler` (`build_sampler`) under the score model's `sde`; ValueError for a bad option."""
        return build_sampler(self.sampler, steps=self.steps, t0=self.t0, dc=self.dc, dc_weight=self.dc_weight,
                             dc_lambda=self.dc_lambda, dc_floor=self.dc_floor, t0_ratio=self.t0_ratio,
                             stop_ratio=self.stop_ratio, start=self.start, start_lam=self.start_lam,
                             start_error=self.start_error, sde=sde)


def build_sampler(name: str | None = None, steps: int | None = None, t0: float | None = None,
                  dc: DCKind | None = None, dc_weight: float | None = None, dc_lambda: float | None = None,
                  dc_floor: float | None = None, t0_ratio: float | None = None,
                  stop_ratio: float | None = None, start: StartKind | None = None,
                  start_lam: float | None = None, start_error: float | None = None, snr: float = 0.16,
                  n_corrector: int = 1, eta: float = 0.0,
                  eps: float = 1e-3, autocast: bool = False, sde: SDE | None = None) -> Sampler:
    """A `Sampler` from a `SAMPLERS` name (None: `DEFAULT_SAMPLER`); None for any option takes the name's
    registry default. `sde`: the score model's SDE (`VPSDE`, `DiscreteVPSDE` or `VESDE`, e.g.
    `ScoreModel.sde`; default VPSDE()). Where the name has undersampled defaults (`SamplerSpec.undersampled`)
    the sampler carries a second one built from them under the same options, `Sampler.undersampled`
    (`Sampler.for_measurement`). Unknown name or an invalid option -> ValueError."""
    name = DEFAULT_SAMPLER if name is None else name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    options = {"steps": steps, "t0": t0, "dc": dc, "dc_weight": dc_weight, "dc_lambda": dc_lambda,
               "dc_floor": dc_floor, "t0_ratio": t0_ratio, "stop_ratio": stop_ratio, "start": start,
               "start_lam": start_lam, "start_error": start_error}
    common = {"snr": snr, "n_corrector": n_corrector, "eta": eta, "eps": eps, "autocast": autocast,
              "sde": sde}
    sampler = _build(name, spec, options, common)
    if spec.undersampled is not None:
        sampler.undersampled = _build(name, dataclasses.replace(spec, **spec.undersampled), options, common)
    return sampler


def _build(name: str, spec: SamplerSpec, options: dict[str, Any], common: dict[str, Any]) -> Sampler:
    """`build_sampler`'s sampler of one spec: the user's `options` (None: the spec's), checked."""
    value = {k: getattr(spec, k) if v is None else v for k, v in options.items()}
    dc = value["dc"]
    dc_weight, dc_lambda, dc_floor = (float(value[k]) for k in ("dc_weight", "dc_lambda", "dc_floor"))
    t0_ratio, stop_ratio = float(value["t0_ratio"]), float(value["stop_ratio"])
    start, start_lam, start_error = value["start"], float(value["start_lam"]), float(value["start_error"])
    if dc not in ("proximal", "gradient", "none"):
        raise ValueError(f"unknown data consistency {dc!r}; choose proximal, gradient or none")
    if not math.isfinite(dc_weight) or dc_weight < 0:
        raise ValueError(f"dc_weight must be finite and >= 0, got {dc_weight}")
    if not math.isfinite(dc_lambda) or dc_lambda <= 0:
        raise ValueError(f"dc_lambda must be finite and > 0, got {dc_lambda}")
    if not math.isfinite(dc_floor) or dc_floor < 0:
        raise ValueError(f"dc_floor must be finite and >= 0, got {dc_floor}")
    if not math.isfinite(t0_ratio) or t0_ratio < 0:
        raise ValueError(f"t0_ratio must be finite and >= 0, got {t0_ratio}")
    if not math.isfinite(stop_ratio) or stop_ratio < 0:
        raise ValueError(f"stop_ratio must be finite and >= 0, got {stop_ratio}")
    if start not in ("degraded", "tv", "auto"):
        raise ValueError(f"unknown start {start!r}; choose degraded, tv or auto")
    if not math.isfinite(start_lam) or start_lam <= 0:
        raise ValueError(f"start_lam must be finite and > 0, got {start_lam}")
    if not math.isfinite(start_error) or start_error < 0:
        raise ValueError(f"start_error must be finite and >= 0, got {start_error}")
    if t0_ratio > 0 and spec.sample_fn is pc_sampler:
        raise ValueError(f"t0_ratio (a start time per slice) is DDIM's and PnP's; sampler {name!r} takes "
                         "t0_ratio 0")
    n_steps = int(value["steps"])
    if not 1 <= n_steps <= MAX_STEPS:
        raise ValueError(f"steps must be from 1 to {MAX_STEPS}, got {n_steps}")
    schedule = Schedule.make(
        n_steps, float(value["t0"]), eps=common["eps"], sde=common["sde"], snr=common["snr"],
        n_corrector=common["n_corrector"], eta=common["eta"], autocast=common["autocast"],
    )
    if spec.sample_fn is pc_sampler:
        check_pc_grid(schedule, f"sampler {name!r}")  # when it is built, not when it first samples
    return Sampler(name=name, sample_fn=spec.sample_fn, schedule=schedule, dc=dc, dc_weight=dc_weight,
                   dc_lambda=dc_lambda, dc_floor=dc_floor, t0_ratio=t0_ratio, stop_ratio=stop_ratio,
                   start=start, start_lam=start_lam, start_error=start_error)
