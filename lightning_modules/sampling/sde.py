"""The variance-preserving SDE (score_sde's VPSDE) and the score function of a DDPM network under it.

dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  beta(t) = beta_min + t (beta_max - beta_min),  t in [0, T=1].
Marginal: x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I) with
alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min) and std(t) = sqrt(1 - alpha(t)^2).
Times t are float tensors [B]; images are [B, C, H, W].
`VESDE` (score_sde's variance-exploding SDE, the score-MRI prior) and `DiscreteVPSDE` (a discrete DDPM
schedule, the DDS prior; t maps to the step round(t (N - 1))) share that interface (`alpha`, `std`,
`marginal_prob`, `sde`, `discretize`, `grid`, `prior_sampling`); `SDE` names any of them.

`pad_to_multiple` runs a score function (or a network called as `net(x, labels)`) at any H x W: a U-Net with
k resolution levels needs H and W to be multiples of 2**(k - 1), and slices are reconstructed at their native
matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _bc(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] for broadcasting over images."""
    return v[:, None, None, None]


class VPSDE:
    """score_sde's VP-SDE with a linear beta schedule and its DDPM discretisation (N steps)."""

    T: float = 1.0

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

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean [B, C, H, W], std [B]) of p_t(x_t | x_0 = x)."""
        return _bc(self.alpha(t)) * x, self.std(t)

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

    def prior_sampling(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of the prior N(0, I) of the given shape (on the generator's device unless given)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=device)

    def labels(self, t: Tensor) -> Tensor:
        """The DDPM network's time label for continuous t: 999 t (score_sde's continuous VP convention)."""
        return 999.0 * t

    def score_from_output(self, out: Tensor, t: Tensor) -> Tensor:
        """Score -out / std(t) from the network output (a noise prediction) [B, C, H, W]."""
        return -out / _bc(self.std(t))


class VESDE:
    """score_sde's variance-exploding SDE (SMLD / NCSN++ priors, e.g. score-MRI).

    dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw,  sigma(t) = sigma_min (sigma_max / sigma_min)^t,
    t in [0, T=1]. Marginal: x_t | x_0 ~ N(x_0, sigma(t)^2 I) (score_sde's convention: std sigma(t), not
    sqrt(sigma(t)^2 - sigma_min^2)); the prior is N(0, sigma_max^2 I). Same interface as `VPSDE` (alpha = 1).
    """

    T: float = 1.0

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

    def prior_sampling(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of the prior N(0, sigma_max^2 I) of the given shape."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=device) * self.sigma_max


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

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM ancestral step at i = round(t (N - 1)): f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i)."""
        beta = self.discrete_betas.to(x.device)[self.index(t)]
        return _bc(torch.sqrt(1.0 - beta)) * x - x, torch.sqrt(beta)

    def labels(self, t: Tensor) -> Tensor:
        """The discrete-time network label: the step index round(t (N - 1)) as float32, [B]."""
        return self.index(t).float()


#: any of the SDEs above (a `DiscreteVPSDE` is a `VPSDE`)
SDE = VPSDE | VESDE


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
