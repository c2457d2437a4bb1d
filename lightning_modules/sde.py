"""The variance-preserving SDE (score_sde's VPSDE) and the score function of a DDPM network under it.

dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  beta(t) = beta_min + t (beta_max - beta_min),  t in [0, T=1].
Marginal: x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I) with
alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min) and std(t) = sqrt(1 - alpha(t)^2).
Times t are float tensors [B]; images are [B, C, H, W].

`pad_to_multiple` runs a score function (or a network called as `net(x, labels)`) at any H x W: a U-Net with
k resolution levels needs H and W to be multiples of 2**(k - 1), and slices are reconstructed at their native
matrix.
"""

from __future__ import annotations

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
