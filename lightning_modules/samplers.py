"""Reconstruction samplers for the VP-SDE with k-space data consistency (plain torch, no Lightning).

Every sampler has one signature, k-diffusion style::

    sample_x(score_fn, x_init, schedule, dc=None, generator=None, callback=None) -> x

- `score_fn(x, t)`: any callable, x float `[B,2,H,W]` (real, imag), t float `[B]` -> score `[B,2,H,W]`
  (e.g. `sde.get_score_fn(net, sde)`; wrap it with `compile_score_fn` for `torch.compile`).
- `x_init`: float `[B,2,H,W]`, the starting image (the degraded image). Every sampler starts from
  `x = alpha(t_start) x_init + std(t_start) z`; with `t_start = 1` that is (up to alpha(1) ~ 0.006) the prior.
  A batch holds any number of slices (or K copies of one slice); they are sampled in parallel.
- `schedule`: a `Schedule` (the discretisation SDE, the descending time grid and the sampler's options).
- `dc`: a callable `dc(x [B,2,H,W]) -> [B,2,H,W]`, usually `KSpaceDataConsistency(A, y, weight)`.
- `generator`: a `torch.Generator` on x's device for every random draw (same seed -> same output).
- `callback`: called after every step with a dict `{"i", "t", "x", "denoised", "nfe"}` (`nfe`: network
  evaluations so far). To count evaluations outside a sampler wrap the score function in `NFECounter`;
  `Sampler.last_nfe` records the count of its last call.

NFE counts calls of `score_fn`, each on the whole batch: `pc_sampler` makes `n_steps * (1 + n_corrector)`,
`ddim_sampler` makes `n_steps`.

Samplers:
- `pc_sampler`: score-MRI's predictor-corrector for the VP-SDE (score_sde's Langevin corrector then its
  reverse-diffusion predictor at each time of the grid, DC after each corrector and each predictor step; the
  result is the noise-free mean of the last predictor step). With `t_start < 1` it is the warm start.
- `ddim_sampler`: DDIM on the VP-SDE (deterministic for `eta = 0`); DC is applied to the Tweedie estimate
  of the clean image at each step, which is then re-noised to the next time.

`SAMPLERS` names the four configurations ("pc", "warm_pc", "ddim", "warm_ddim") and `build_sampler` turns a
name and options into a `Sampler` (sample function + schedule + DC weight), the entry point of the CLI and
the validation callback.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from degradations import channels_to_complex, complex_to_channels
from lightning_modules.sde import VPSDE

ScoreFn = Callable[[Tensor, Tensor], Tensor]
DCFn = Callable[[Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]

__all__ = [
    "SAMPLERS",
    "KSpaceDataConsistency",
    "NFECounter",
    "Sampler",
    "SamplerSpec",
    "Schedule",
    "build_sampler",
    "compile_score_fn",
    "ddim_sampler",
    "magnitude",
    "pc_sampler",
    "posterior_samples",
]


class LinearOperator(Protocol):
    """What data consistency needs of a forward operator (e.g. `degradations.ForwardOperator`)."""

    def forward(self, x: Tensor) -> Tensor: ...  # complex image [B,1,H,W] -> k-space [B,1,H,W]

    def adjoint(self, k: Tensor) -> Tensor: ...  # k-space [B,1,H,W] -> complex image [B,1,H,W]


class KSpaceDataConsistency:
    """Gradient step on `1/2 ||A x - y||^2`: `x <- x - weight * A^H (A x - y)` on the complex image.

    `A` has `.forward` / `.adjoint` on complex `[B,1,H,W]`; `y` is the measured k-space, complex `[B,1,H,W]`.
    Called on float `[B,2,H,W]` (real, imag) and returns the same layout and dtype. With `A = fft2c` (unitary)
    and `weight = 1` it replaces the k-space of x by y.
    """

    def __init__(self, A: LinearOperator, y: Tensor, weight: float = 0.3) -> None:
        if not y.is_complex():
            raise ValueError(f"y must be complex k-space [B,1,H,W], got dtype {y.dtype}")
        self.A, self.y, self.weight = A, y, float(weight)

    def residual(self, x: Tensor) -> Tensor:
        """`A x - y`, complex `[B,1,H,W]`, for x float `[B,2,H,W]`."""
        return self.A.forward(channels_to_complex(x)) - self.y

    def residual_norm(self, x: Tensor) -> Tensor:
        """`||A x - y||` per slice, `[B]`."""
        return torch.linalg.vector_norm(self.residual(x).flatten(1), dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        step = complex_to_channels(self.A.adjoint(self.residual(x)))
        return x - self.weight * step.to(x.dtype)


@dataclass(frozen=True)
class Schedule:
    """The time grid and options of a sampler.

    - `sde`: the VP-SDE used for the discretisation. Its `N` is the number of points of the FULL grid
      `linspace(T, eps, N)` whose spacing the steps have (score_sde's predictor and Langevin corrector use
      the discrete betas `sde.discretize` gives at that resolution); `Schedule.make` sets it.
    - `timesteps`: float64 `[n_steps]`, descending from `t_start` to `eps`; one (predictor or DDIM) step each.
    - `snr`, `n_corrector`: the Langevin corrector's target signal-to-noise ratio and steps per time (PC).
    - `eta`: DDIM's stochasticity (0 = deterministic, 1 = DDPM-like ancestral noise).
    - `denoise`: PC returns the mean of its last predictor step (score_sde's `noise_removal`), not the sample.
    - `autocast`: run `score_fn` under bf16 autocast (x's device type); the score is cast back to x's dtype.
    """

    sde: VPSDE
    timesteps: Tensor
    snr: float = 0.16
    n_corrector: int = 1
    eta: float = 0.0
    denoise: bool = True
    autocast: bool = False

    @classmethod
    def make(cls, n_steps: int, t_start: float = 1.0, eps: float = 1e-3, beta_min: float = 0.1,
             beta_max: float = 20.0, **options: Any) -> Schedule:
        """`n_steps` times `linspace(t_start, eps, n_steps)`; the SDE's `N` matches that grid's spacing.

        For `t_start = 1` this is score_sde's grid `linspace(1, eps, N)` with `N = n_steps`; for a warm start
        `t_start < 1` it is the tail of a full grid with the same spacing (N ~ n_steps / t_start).
        `options` are the other fields (`snr`, `n_corrector`, `eta`, `denoise`, `autocast`).
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not 0.0 < eps < t_start <= VPSDE.T:
            raise ValueError(f"need 0 < eps < t_start <= 1, got eps={eps}, t_start={t_start}")
        dt = (t_start - eps) / (n_steps - 1) if n_steps > 1 else t_start - eps
        n_full = max(n_steps, round((VPSDE.T - eps) / dt) + 1)
        timesteps = torch.linspace(t_start, eps, n_steps, dtype=torch.float64)
        return cls(sde=VPSDE(beta_min, beta_max, N=n_full), timesteps=timesteps, **options)

    @property
    def n_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def t_start(self) -> float:
        return float(self.timesteps[0])

    @property
    def eps(self) -> float:
        return float(self.timesteps[-1])


class NFECounter:
    """Wraps a score function and counts its calls in `.nfe` (one call = one batched network evaluation)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


def compile_score_fn(score_fn: ScoreFn, mode: str | None = None, dynamic: bool = False) -> ScoreFn:
    """`torch.compile` a score function (the network inside it is traced on the first call).

    The first call compiles (tens of seconds for the 34.4M U-Net); keep the batch shape fixed
    (`dynamic=False`) or every new shape recompiles. t is a tensor, so changing times do not recompile.
    `mode` as in `torch.compile` (e.g. "max-autotune" on a GPU). Use `Schedule(autocast=True)` for bf16.
    """
    return torch.compile(score_fn, mode=mode, dynamic=dynamic)


def _bc(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _score(score_fn: ScoreFn, x: Tensor, t: Tensor, autocast: bool) -> Tensor:
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        s = score_fn(x, t)
    return s.to(x.dtype)


def _identity(x: Tensor) -> Tensor:
    return x


def _warm_start(x_init: Tensor, schedule: Schedule, generator: torch.Generator | None) -> Tensor:
    """`alpha(t_start) x_init + std(t_start) z`."""
    t = torch.full((x_init.shape[0],), schedule.t_start, device=x_init.device, dtype=x_init.dtype)
    mean, std = schedule.sde.marginal_prob(x_init, t)
    return mean + _bc(std) * _randn(x_init, generator)


@torch.no_grad()
def pc_sampler(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DCFn | None = None,
               generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """score-MRI's predictor-corrector sampler on the VP-SDE with data consistency; float `[B,2,H,W]`.

    At each time t of `schedule.timesteps`: `n_corrector` Langevin steps (step size
    `2 alpha_i (snr ||z|| / ||score||)^2`, alpha_i = 1 - beta_i, norms averaged over the batch as in
    score_sde), each followed by `dc`; then one reverse-diffusion predictor step
    `x <- x - f + G^2 score + G z` (f, G from `sde.discretize`), followed by `dc`. Returns `dc` of the last
    predictor mean (`denoise`, score-MRI's output) or the last sample.
    NFE = `n_steps * (1 + n_corrector)`. score_sde's discretisation needs `beta_max / N < 1` (N: the full
    grid, ~ n_steps / t_start), i.e. more than 20 steps from t = 1; fewer raise ValueError.
    """
    sde, dc = schedule.sde, dc or _identity
    if sde.beta_max / sde.N >= 1:
        raise ValueError(f"the PC sampler's discretisation needs a full grid of more than beta_max = "
                         f"{sde.beta_max:g} steps (N = {sde.N}): use more steps or a smaller t_start")
    x = dc(_warm_start(x_init, schedule, generator))
    x_mean, nfe = x, 0
    # G_i = sqrt(beta_i) of all steps at once (sde.discretize; f = (sqrt(1 - beta_i) - 1) x): one
    # host-to-device copy instead of one per step
    _, g_all = sde.discretize(torch.zeros(schedule.n_steps, 1, 1, 1), schedule.timesteps)
    g_all = g_all.to(device=x.device, dtype=x.dtype)
    for i, t_i in enumerate(schedule.timesteps.tolist()):
        t = torch.full((x.shape[0],), t_i, device=x.device, dtype=x.dtype)
        G = g_all[i].expand(x.shape[0])
        for _ in range(schedule.n_corrector):  # Langevin corrector (score_sde, VP-SDE: alpha_i = 1 - beta_i)
            grad = _score(score_fn, x, t, schedule.autocast)
            noise = _randn(x, generator)
            grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
            noise_norm = torch.linalg.vector_norm(noise.flatten(1), dim=1).mean()
            step = 2 * (1 - G**2) * (schedule.snr * noise_norm / grad_norm) ** 2
            x = dc(x + _bc(step) * grad + _bc(torch.sqrt(2 * step)) * noise)
        # reverse-diffusion predictor (score_sde's VP discretisation): x - f + G^2 score + G z
        f = _bc(torch.sqrt(1 - G**2) - 1) * x
        score = _score(score_fn, x, t, schedule.autocast)
        nfe += 1 + schedule.n_corrector
        x_mean = x - f + _bc(G**2) * score
        x = dc(x_mean + _bc(G) * _randn(x, generator))
        if callback is not None:
            callback({"i": i, "t": t_i, "x": x, "denoised": x_mean, "nfe": nfe})
    return dc(x_mean) if schedule.denoise else x


@torch.no_grad()
def ddim_sampler(score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DCFn | None = None,
                 generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DDIM on the VP-SDE with data consistency on the clean estimate; float `[B,2,H,W]`.

    At each time t (next time s, 0 after the last): Tweedie `x0 = (x + std_t^2 score) / alpha_t`,
    `eps = -std_t score`, `x0 <- dc(x0)`, then
    `x <- alpha_s x0 + sqrt(std_s^2 - sigma^2) eps + sigma z` with
    `sigma = eta * (std_s / std_t) sqrt(1 - alpha_t^2 / alpha_s^2)`. Returns the last `dc(x0)`.
    Deterministic given x's starting noise when `eta = 0`. NFE = `n_steps`.
    """
    sde, dc = schedule.sde, dc or _identity
    x = _warm_start(x_init, schedule, generator)
    times = schedule.timesteps.tolist()
    x0 = x
    for i, t_i in enumerate(times):
        t = torch.full((x.shape[0],), t_i, device=x.device, dtype=x.dtype)
        a_t, sd_t = _bc(sde.alpha(t)), _bc(sde.std(t))
        score = _score(score_fn, x, t, schedule.autocast)
        eps_hat = -sd_t * score
        x0 = dc((x + sd_t**2 * score) / a_t)
        if i + 1 < len(times):
            s = torch.full_like(t, times[i + 1])
            a_s, sd_s = _bc(sde.alpha(s)), _bc(sde.std(s))
            sigma = schedule.eta * sd_s / sd_t * torch.sqrt((1 - a_t**2 / a_s**2).clamp_min(0))
            x = a_s * x0 + torch.sqrt((sd_s**2 - sigma**2).clamp_min(0)) * eps_hat
            if schedule.eta > 0:
                x = x + sigma * _randn(x, generator)
        else:
            x = x0
        if callback is not None:
            callback({"i": i, "t": t_i, "x": x, "denoised": x0, "nfe": i + 1})
    return x0


SampleFn = Callable[..., Tensor]


def magnitude(x: Tensor) -> Tensor:
    """Magnitude image `[B,1,H,W]` of a float `[B,2,H,W]` (real, imag) image."""
    return torch.sqrt(x[:, :1] ** 2 + x[:, 1:2] ** 2)


def posterior_samples(
    sampler: SampleFn, score_fn: ScoreFn, x_init: Tensor, schedule: Schedule, dc: DCFn | None, k: int,
    generator: torch.Generator | None = None,
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
    """A named sampler configuration: the sample function and its default number of steps and start time."""

    sample_fn: SampleFn
    steps: int
    t0: float


#: name -> configuration; "pc" is the reference (score-MRI's N = 2000 steps, NFE 4000 with one corrector step)
SAMPLERS: dict[str, SamplerSpec] = {
    "pc": SamplerSpec(pc_sampler, steps=2000, t0=1.0),
    "warm_pc": SamplerSpec(pc_sampler, steps=100, t0=0.4),
    "ddim": SamplerSpec(ddim_sampler, steps=100, t0=1.0),
    "warm_ddim": SamplerSpec(ddim_sampler, steps=25, t0=0.4),
}


@dataclass
class Sampler:
    """A ready-to-run sampler: sample function + schedule + DC weight (built by `build_sampler`).

    `sampler(score_fn, x_init, A, y, generator)` builds `KSpaceDataConsistency(A, y, dc_weight)` (no DC when A
    or y is None), runs the sample function and records the network evaluations in `last_nfe`.
    """

    name: str
    sample_fn: SampleFn
    schedule: Schedule
    dc_weight: float = 0.3
    last_nfe: int = field(default=0, init=False)

    @property
    def expected_nfe(self) -> int:
        """NFE of one call (each evaluation covers the whole batch)."""
        per_step = 1 + self.schedule.n_corrector if self.sample_fn is pc_sampler else 1
        return self.schedule.n_steps * per_step

    def make_dc(self, A: LinearOperator | None, y: Tensor | None) -> KSpaceDataConsistency | None:
        """The DC step for operator A and k-space y, or None when either is None or the weight is 0."""
        if A is None or y is None or self.dc_weight == 0:
            return None
        return KSpaceDataConsistency(A, y, self.dc_weight)

    def __call__(self, score_fn: ScoreFn, x_init: Tensor, A: LinearOperator | None = None,
                 y: Tensor | None = None, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> Tensor:
        """Reconstruct float `[B,2,H,W]` from `x_init` `[B,2,H,W]` (and the measurement A, y)."""
        counter = NFECounter(score_fn)
        x = self.sample_fn(counter, x_init, self.schedule, self.make_dc(A, y), generator, callback)
        self.last_nfe = counter.nfe
        return x

    def posterior(self, score_fn: ScoreFn, x_init: Tensor, A: LinearOperator | None = None,
                  y: Tensor | None = None, k: int = 1,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`posterior_samples` with this sampler: magnitude (mean, std) `[B,1,H,W]`; `last_nfe`: total NFE."""
        counter = NFECounter(score_fn)
        dc = self.make_dc(A, y)
        out = posterior_samples(self.sample_fn, counter, x_init, self.schedule, dc, k, generator)
        self.last_nfe = counter.nfe
        return out


def build_sampler(name: str, steps: int | None = None, t0: float | None = None, snr: float = 0.16,
                  dc_weight: float = 0.3, n_corrector: int = 1, eta: float = 0.0, eps: float = 1e-3,
                  autocast: bool = False, sde: VPSDE | None = None) -> Sampler:
    """A `Sampler` from a `SAMPLERS` name; None for `steps` / `t0` takes the name's default.

    `sde` gives beta_min / beta_max (the score model's SDE; default VPSDE()). Unknown name -> ValueError.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    sde = sde or VPSDE()
    schedule = Schedule.make(
        spec.steps if steps is None else int(steps), spec.t0 if t0 is None else float(t0), eps=eps,
        beta_min=sde.beta_min, beta_max=sde.beta_max, snr=snr, n_corrector=n_corrector, eta=eta,
        autocast=autocast,
    )
    if spec.sample_fn is pc_sampler and schedule.sde.beta_max / schedule.sde.N >= 1:
        raise ValueError(f"sampler {name!r} with {schedule.n_steps} steps from t0 = {schedule.t_start:g} has "
                         f"a full grid of N = {schedule.sde.N} <= beta_max = {schedule.sde.beta_max:g} "
                         "steps, which score_sde's discretisation cannot take: more steps or a smaller t0")
    if not math.isfinite(dc_weight) or dc_weight < 0:
        raise ValueError(f"dc_weight must be finite and >= 0, got {dc_weight}")
    return Sampler(name=name, sample_fn=spec.sample_fn, schedule=schedule, dc_weight=dc_weight)

