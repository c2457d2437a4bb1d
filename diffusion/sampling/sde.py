"""The SDEs of the score priors behind one interface (`SDE`), the `Denoiser` the samplers see, and the score
function of a DDPM network under the VP-SDE.

`VPSDE`, the variance-preserving SDE (score_sde's):
dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  beta(t) = beta_min + t (beta_max - beta_min),  t in [0, T=1].
Marginal: x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I) with
alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min) and std(t) = sqrt(1 - alpha(t)^2).
Times t are float tensors [B]; images are [B, C, H, W].
`VESDE` (score_sde's variance-exploding SDE, the score-MRI prior) and `DiscreteVPSDE` (a discrete DDPM
schedule, the DDS prior; t maps to the step round(t (N - 1))) are the other kinds. The abstract base `SDE`
holds what every sampler (and the training losses) asks of any of them, one signature each: the marginal
(`alpha`, `std`, `marginal_prob`, `scaled_std`), the Tweedie denoiser (`denoise`), the noise of an iterate
(`eps_from_score`, `eps_from_x0`), DDIM's re-noising (`renoise`), the discretisation (`sde`, `discretize`,
`grid`, `grid_problem`, `prior_sampling`), the kind-specific pieces of score_sde's predictor-corrector
(`reverse_diffusion_mean`, `langevin_alpha`) and the times denoising score matching trains at
(`sample_training_times`). `Denoiser` turns a score function and its SDE into the one
denoiser interface of the samplers, `(x, t) -> (x0_hat, score)`; a sampler never asks which kind it has.

`pad_to_multiple` runs a score function (or a network called as `net(x, labels)`) at any H x W: a U-Net with
k resolution levels needs H and W to be multiples of 2**(k - 1), and slices are reconstructed at their native
matrix.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _bc(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] for broadcasting over images."""
    return v[:, None, None, None]


class SDE(ABC):
    """What the samplers ask of a score prior's SDE, one signature for every kind (`VPSDE`, `DiscreteVPSDE`,
    `VESDE`): abstract where the kinds differ, concrete where it follows from the marginal alone.

    The marginal is x_t = alpha(t) x_0 + std(t) z, z ~ N(0, I); times t are float tensors [B] in [0, T],
    images [B, C, H, W]. `N` is the number of points of the discretisation (`discretize`, `grid`).
    """

    T: float = 1.0
    N: int

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Marginal mean coefficient alpha(t) [B] (x_t = alpha x_0 + std z), dimensionless, > 0."""

    @abstractmethod
    def std(self, t: Tensor) -> Tensor:
        """Marginal standard deviation std(t) [B] (image units)."""

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean alpha(t) x [B, C, H, W], std [B]) of p_t(x_t | x_0 = x)."""
        return _bc(self.alpha(t)) * x, self.std(t)

    def scaled_std(self, t: Tensor) -> Tensor:
        """std(t) / alpha(t) [B]: the diffusion noise of x_t / alpha(t) = x_0 + (std / alpha) z in image units
        (the error std of a denoised estimate that data consistency is told)."""
        return self.std(t) / self.alpha(t)

    def denoise(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Tweedie's estimate E[x_0 | x_t = x] = (x + std(t)^2 score) / alpha(t), [B, C, H, W], from the score
        [B, C, H, W] of p_t at x."""
        return (x + _bc(self.std(t) ** 2) * score) / _bc(self.alpha(t))

    def sample_training_times(self, n: int, eps: float, device: torch.device | str | None = None,
                              generator: torch.Generator | None = None) -> Tensor:
        """Denoising score matching's times t [n] (float32): U(eps, T), drawn with `generator` on `device`."""
        return torch.rand(n, generator=generator, device=device) * (self.T - eps) + eps

    def eps_from_score(self, t: Tensor, score: Tensor) -> Tensor:
        """The noise the score predicts, -std(t) score, [B, C, H, W] (unit variance)."""
        return -_bc(self.std(t)) * score

    def eps_from_x0(self, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise x holds over alpha(t) x0, (x - alpha(t) x0) / std(t), [B, C, H, W] (unit variance)."""
        return (x - _bc(self.alpha(t)) * x0) / _bc(self.std(t))

    def renoise(self, x0: Tensor, eps: Tensor, t: Tensor, s: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """DDIM's step from time t to s [B]: (alpha_s x0 + sqrt(std_s^2 - sigma^2) eps [B, C, H, W], sigma
        [B, 1, 1, 1]) for x0 and its noise eps [B, C, H, W], with the posterior std
        sigma = eta (std_s / std_t) sqrt(std_t^2 - (alpha_t / alpha_s)^2 std_s^2) (VP:
        sqrt(1 - alpha_t^2 / alpha_s^2)); the caller adds sigma z where eta > 0."""
        a_t, sd_t = _bc(self.alpha(t)), _bc(self.std(t))
        a_s, sd_s = _bc(self.alpha(s)), _bc(self.std(s))
        posterior_var = (sd_t**2 - (a_t / a_s) ** 2 * sd_s**2).clamp_min(0)
        sigma = eta * sd_s / sd_t * torch.sqrt(posterior_var)
        return a_s * x0 + torch.sqrt((sd_s**2 - sigma**2).clamp_min(0)) * eps, sigma

    @abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift f(x, t) [B, C, H, W], diffusion g(t) [B]) of dx = f dt + g dw."""

    @abstractmethod
    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """score_sde's discretisation on `N` steps at t [B]: (f [B, C, H, W], G [B]) of the forward step
        x_{i+1} = x_i + f + G z."""

    @abstractmethod
    def grid(self, N: int) -> SDE:
        """This SDE discretised on N time points (a sampler's grid)."""

    @abstractmethod
    def grid_problem(self) -> str | None:
        """Why score_sde's discretisation cannot take this SDE's `N` (a phrase for an error message), or
        None where it can."""

    @abstractmethod
    def prior_sampling(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of the prior p_T of the given shape (on the generator's device unless given)."""

    @abstractmethod
    def reverse_diffusion_mean(self, x: Tensor, score: Tensor, g: Tensor) -> Tensor:
        """score_sde's reverse-diffusion predictor without its noise, x - f + G^2 score [B, C, H, W], at the
        step whose discretisation (`discretize`) has diffusion G = `g` [B] (f follows from G)."""

    @abstractmethod
    def langevin_alpha(self, g: Tensor) -> Tensor:
        """score_sde's Langevin corrector's alpha_i [B] (its step size is 2 alpha_i (snr ||z|| / ||score||)^2)
        at the step whose discretisation has diffusion G = `g` [B]."""


class VPSDE(SDE):
    """score_sde's VP-SDE with a linear beta schedule and its DDPM discretisation (N steps)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) [B], the instantaneous noise rate."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log of the marginal mean coefficient, [B]."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        """Marginal mean coefficient alpha(t) [B] (x_t = alpha x_0 + std z)."""
        return torch.exp(self.log_alpha(t))

    def std(self, t: Tensor) -> Tensor:
        """Marginal standard deviation std(t) = sqrt(1 - alpha(t)^2), [B]."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift -1/2 beta(t) x [B, C, H, W], diffusion sqrt(beta(t)) [B])."""
        beta = self.beta(t)
        return -0.5 * _bc(beta) * x, torch.sqrt(beta)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM discretisation, i = floor(t (N - 1) / T): f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i)."""
        i = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_betas.to(x.device)[i]
        f = _bc(torch.sqrt(1.0 - beta)) * x - x
        return f, torch.sqrt(beta)

    def grid(self, N: int) -> VPSDE:
        """This SDE discretised on N time points (a sampler's grid): a `VPSDE` with the same beta_min,
        beta_max (for a `DiscreteVPSDE`: its continuous limit) and `N`."""
        return VPSDE(self.beta_min, self.beta_max, N=N)

    def grid_problem(self) -> str | None:
        """The DDPM discretisation needs beta_i = beta_max / N < 1: a phrase where N <= beta_max, else
        None."""
        if self.beta_max / self.N >= 1:
            return f"a full grid of N = {self.N} <= beta_max = {self.beta_max:g} steps"
        return None

    def prior_sampling(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of the prior N(0, I) of the given shape (on the generator's device unless given)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=device)

    def reverse_diffusion_mean(self, x: Tensor, score: Tensor, g: Tensor) -> Tensor:
        """x - f + G^2 score with the DDPM step's f = (sqrt(1 - G^2) - 1) x (G = sqrt(beta_i))."""
        return x - _bc(torch.sqrt(1 - g**2) - 1) * x + _bc(g**2) * score

    def langevin_alpha(self, g: Tensor) -> Tensor:
        """alpha_i = 1 - beta_i = 1 - G^2."""
        return 1 - g**2

    def labels(self, t: Tensor) -> Tensor:
        """The DDPM network's time label for continuous t: 999 t (score_sde's continuous VP convention)."""
        return 999.0 * t

    def score_from_output(self, out: Tensor, t: Tensor) -> Tensor:
        """Score -out / std(t) from the network output (a noise prediction) [B, C, H, W]."""
        return -out / _bc(self.std(t))


class VESDE(SDE):
    """score_sde's variance-exploding SDE (SMLD / NCSN++ priors, e.g. score-MRI).

    dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw,  sigma(t) = sigma_min (sigma_max / sigma_min)^t,
    t in [0, T=1]. Marginal: x_t | x_0 ~ N(x_0, sigma(t)^2 I) (score_sde's convention: std sigma(t), not
    sqrt(sigma(t)^2 - sigma_min^2)); the prior is N(0, sigma_max^2 I). alpha = 1.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        self.sigma_min, self.sigma_max, self.N = float(sigma_min), float(sigma_max), int(N)
        #: SMLD noise levels, ascending: exp(linspace(log sigma_min, log sigma_max, N)) (float32)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N))

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t, [B] (as score_sde computes it, in t's dtype)."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def alpha(self, t: Tensor) -> Tensor:
        """Marginal mean coefficient: 1, [B]."""
        return torch.ones_like(t)

    def std(self, t: Tensor) -> Tensor:
        """Marginal standard deviation sigma(t), [B]."""
        return self.sigma(t)

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean x [B, C, H, W], std sigma(t) [B]) of p_t(x_t | x_0 = x)."""
        return x, self.sigma(t)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift 0 [B, C, H, W], diffusion sigma(t) sqrt(2 log(sigma_max / sigma_min)) [B])."""
        rate = math.sqrt(2.0 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return torch.zeros_like(x), self.sigma(t) * rate

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD discretisation, i = floor(t (N - 1) / T): f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2), with
        sigma_{-1} = 0."""
        i = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_sigmas.to(t.device)
        sigma = sigmas[i]
        previous = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp_min(0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - previous**2)

    def grid(self, N: int) -> VESDE:
        """This SDE discretised on N time points (a sampler's grid): the same sigma_min, sigma_max; `N`."""
        return VESDE(self.sigma_min, self.sigma_max, N=N)

    def grid_problem(self) -> str | None:
        """None: the SMLD discretisation takes any N."""
        return None

    def prior_sampling(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of the prior N(0, sigma_max^2 I) of the given shape."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=device) * self.sigma_max

    def reverse_diffusion_mean(self, x: Tensor, score: Tensor, g: Tensor) -> Tensor:
        """x + G^2 score (f = 0; G = sqrt(sigma_i^2 - sigma_{i-1}^2))."""
        return x + _bc(g**2) * score

    def langevin_alpha(self, g: Tensor) -> Tensor:
        """alpha_i = 1."""
        return torch.ones_like(g)


class DiscreteVPSDE(VPSDE):
    """A discrete-time DDPM schedule (guided-diffusion / DDS): beta_i linear from beta_start to beta_end over
    N steps (float64, then float32, as DDS's `get_beta_schedule`), alpha_bar_i = prod_{s <= i} (1 - beta_s)
    (float32 cumprod, as DDS's `compute_alpha`).

    Continuous t in [0, 1] maps to the step index i = round(t (N - 1)); the marginal is
    x_t = sqrt(alpha_bar_i) x_0 + sqrt(1 - alpha_bar_i) z. As a `VPSDE` its continuous limit has
    beta_min = N beta_start and beta_max = N beta_end (DDS: 0.1 and 20), which `sde` uses; `alpha`, `std`,
    `marginal_prob`, `discretize` and `labels` use the discrete schedule.
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, N: int = 1000) -> None:
        super().__init__(beta_min=beta_start * N, beta_max=beta_end * N, N=N)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.discrete_betas = torch.linspace(beta_start, beta_end, N, dtype=torch.float64).float()
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def index(self, t: Tensor) -> Tensor:
        """Step index round(t (N - 1)) [B] (int64) of continuous times t [B]."""
        return torch.round(t * (self.N - 1)).long().clamp(0, self.N - 1)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at the step index of t, [B] (float32)."""
        return self.alphas_cumprod.to(t.device)[self.index(t)]

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(self.alpha_bar(t))

    def alpha(self, t: Tensor) -> Tensor:
        """sqrt(alpha_bar_i), [B]."""
        return torch.sqrt(self.alpha_bar(t))

    def std(self, t: Tensor) -> Tensor:
        """sqrt(1 - alpha_bar_i), [B] (as DDS computes it)."""
        return torch.sqrt(1.0 - self.alpha_bar(t))

    def sample_training_times(self, n: int, eps: float, device: torch.device | str | None = None,
                              generator: torch.Generator | None = None) -> Tensor:
        """DSM times t = i / (N - 1) [n] (float32) at uniform integer steps i ~ U{0, ..., N - 1} (the DDPM
        noise-prediction loss's draw; `eps` is not used: step 0 has std > 0)."""
        i = torch.randint(0, self.N, (n,), generator=generator, device=device)
        return i.to(torch.float32) / (self.N - 1)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM ancestral step at i = round(t (N - 1)): f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i)."""
        beta = self.discrete_betas.to(x.device)[self.index(t)]
        return _bc(torch.sqrt(1.0 - beta)) * x - x, torch.sqrt(beta)

    def labels(self, t: Tensor) -> Tensor:
        """The discrete-time network label: the step index round(t (N - 1)) as float32, [B]."""
        return self.index(t).float()


def default_sde() -> SDE:
    """The SDE of a score model that names none: score_sde's `VPSDE()` (beta from 0.1 to 20, N = 1000)."""
    return VPSDE()


class Denoiser:
    """A score function under its SDE as one denoiser, the samplers' only view of a prior (k-diffusion style:
    whatever the SDE's kind, a sampler asks the same questions).

    `denoiser(x, t)` -> (x0_hat, score) [B, C, H, W] each, from x [B, C, H, W] and t [B]: one evaluation of
    `score_fn` and Tweedie's estimate x0_hat = (x + std(t)^2 score) / alpha(t) = E[x_0 | x_t = x] under
    `sde`'s marginals (`SDE.denoise`). `score(x, t)` is the evaluation alone. With `autocast` the score
    function runs under bf16 autocast (x's device type); the score is cast back to x's dtype either way.
    """

    def __init__(self, score_fn: ScoreFn, sde: SDE, autocast: bool = False) -> None:
        self.score_fn, self.sde, self.autocast = score_fn, sde, bool(autocast)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """The score [B, C, H, W] in x's dtype: one evaluation of the score function."""
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            s = self.score_fn(x, t)
        return s.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, score) [B, C, H, W] at x [B, C, H, W], t [B]: one evaluation of the score function."""
        score = self.score(x, t)
        return self.sde.denoise(x, t, score), score


def _pad_bottom_right(x: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """x [..., H, W] -> [..., H + pad_h, W + pad_w]: per axis reflect padding at the end where the pad is
    smaller than that axis's size, else replicate padding."""
    h, w = x.shape[-2:]
    if pad_w:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < w else "replicate")
    if pad_h:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < h else "replicate")
    return x


def pad_to_multiple(score_fn: ScoreFn, multiple: int) -> ScoreFn:
    """`score_fn` at any H x W: fn(x [B, C, H, W], t [B]) -> [B, C', H, W].

    x is padded at the bottom and on the right to the next multiples of `multiple` (`_pad_bottom_right`:
    reflect, or replicate for an axis shorter than its pad), `score_fn` runs on the padded x, and its output
    is cropped back to the top-left H x W. Where H and W are already multiples it is `score_fn(x, t)` itself
    (bit-exact, no copy). `t` (or the network's labels) passes through unchanged.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")

    def padded(x: Tensor, t: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % multiple, -w % multiple
        if not (pad_h or pad_w):
            return score_fn(x, t)
        return score_fn(_pad_bottom_right(x, pad_h, pad_w), t)[..., :h, :w]

    return padded


def get_score_fn(net: nn.Module, sde: VPSDE) -> ScoreFn:
    """score_fn(x [B, C, H, W], t [B] in [eps, 1]) -> score [B, C, H, W] = -net(x, 999 t) / std(t).

    The network's train/eval mode is left as it is (score_sde's `train=False` puts it in eval mode; callers
    choose here).
    """

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        return sde.score_from_output(net(x, sde.labels(t)), t)

    return score_fn
