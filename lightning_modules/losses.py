"""Training losses: continuous-time denoising score matching and the supervised one-step reconstruction loss.

Both take the network (called as `net(x, labels)`) and the VP-SDE, images float [B, C, H, W], and an optional
`torch.Generator` for every random draw (on the images' device), so validation losses can be deterministic.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.sde import VPSDE, get_score_fn

DSM_EPS = 1e-5


def _bc(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=like.device) * (high - low) + low


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def dsm_loss(net: nn.Module, sde: VPSDE, x: Tensor, *, likelihood_weighting: bool = False,
             reduce_mean: bool = True, eps: float = DSM_EPS,
             generator: torch.Generator | None = None) -> Tensor:
    """score_sde's continuous-time DSM loss (`get_sde_loss_fn`), a scalar.

    t ~ U(eps, T) [B], z ~ N(0, I) (drawn in that order), x_t = alpha(t) x + std(t) z, s = score(x_t, t).
    Per sample: reduce(|s std(t) + z|^2) (the score_sde weighting lambda(t) = std(t)^2), or with
    `likelihood_weighting` reduce(|s + z / std(t)|^2) beta(t). `reduce` is the mean over pixels
    (`reduce_mean`) or half the sum. Returns the batch mean.
    """
    t = _uniform(x.shape[0], eps, sde.T, x, generator)
    z = _normal(x, generator)
    mean, std = sde.marginal_prob(x, t)
    score = get_score_fn(net, sde)(mean + _bc(std) * z, t)
    if likelihood_weighting:
        losses = torch.square(score + z / _bc(std)).flatten(1)
    else:
        losses = torch.square(score * _bc(std) + z).flatten(1)
    losses = losses.mean(dim=1) if reduce_mean else 0.5 * losses.sum(dim=1)
    if likelihood_weighting:
        losses = losses * sde.sde(torch.zeros_like(x), t)[1] ** 2
    return losses.mean()


def tweedie_x0(sde: VPSDE, x_t: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """One-step Tweedie estimate of x_0: (x_t + std(t)^2 s) / alpha(t), [B, C, H, W]."""
    return (x_t + _bc(sde.std(t) ** 2) * score) / _bc(sde.alpha(t))


def supervised_loss(net: nn.Module, sde: VPSDE, degraded: Tensor, clean: Tensor, *,
                    t0_range: tuple[float, float] = (0.05, 0.3), loss: Literal["l1", "l2"] = "l1",
                    generator: torch.Generator | None = None) -> Tensor:
    """Supervised reconstruction loss of a warm-started sampler's first step, a scalar.

    t0 ~ U(t0_range) [B], z ~ N(0, I) (drawn in that order); the degraded slice is diffused to t0,
    x_t0 = alpha(t0) degraded + std(t0) z, denoised in one Tweedie step
    x0_hat = (x_t0 + std(t0)^2 s(x_t0, t0)) / alpha(t0), and compared to the clean slice:
    mean |x0_hat - clean| (l1) or mean (x0_hat - clean)^2 (l2) over all pixels and the batch.
    """
    low, high = t0_range
    if not 0.0 <= low <= high <= sde.T:
        raise ValueError(f"t0_range must satisfy 0 <= low <= high <= {sde.T}, got {t0_range}")
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
    t0 = _uniform(degraded.shape[0], low, high, degraded, generator)
    z = _normal(degraded, generator)
    mean, std = sde.marginal_prob(degraded, t0)
    x_t0 = mean + _bc(std) * z
    # std^2 s = -std out (s = -out / std): the same estimate, finite at t0 = 0
    x0_hat = (x_t0 - _bc(std) * net(x_t0, sde.labels(t0))) / _bc(sde.alpha(t0))
    diff = x0_hat - clean
    return diff.abs().mean() if loss == "l1" else diff.square().mean()
