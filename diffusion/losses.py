"""Training losses: continuous-time denoising score matching and the supervised one-step reconstruction loss.

Both take the network (called as `net(x, labels)`) and the model's SDE, images float [B, C, H, W], and an
optional `torch.Generator` for every random draw (on the images' device), so validation losses can be
deterministic. With `score_fn` (x [B, C, H, W], t [B]) -> score, e.g. a checkpoint family's
`Pretrained.score`, they train through that score function instead of score_sde's DDPM convention, for any
SDE of `sde`:
- `VPSDE` (continuous VP, score_sde / HFS-SDE) and `VESDE` (score-MRI: x_t = x + sigma(t) z, alpha = 1): DSM
  |std(t) s(x_t, t) + z|^2 at t ~ U(eps, 1);
- `DiscreteVPSDE` (DDS): the same expression at integer steps i ~ U{0, ..., N - 1}, t = i / (N - 1); with
  s = -eps_hat / std(t) it is the DDPM noise-prediction loss |eps_hat - z|^2.

The supervised loss may condition its network call apart from the score (`label_offset`, with `net` only):
the network then sees labels `sde.labels(t0) + label_offset`, which the score (DSM, the samplers) never
uses, so the one-step restorer of degraded slices and the score of clean anatomy are different network inputs
(`SUPERVISED_LABEL_OFFSET`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from diffusion.sampling.sde import SDE, ScoreFn, get_score_fn

DSM_EPS = 1e-5
#: the label offset of the supervised term's own conditioning (`supervised_loss(label_offset=...)`,
#: the model's `loss.supervised_conditioning: separate`): the score's labels are `sde.labels(t)` in [0, 999]
#: (999 t under the VP-SDE, t in [0, 1]), the supervised call's `sde.labels(t0) + 1000` in [1000, 1999]
#: (1049.95 to 1299.7 for t0 in [0.05, 0.3]); the DDPM's sinusoidal time embedding takes any real label
SUPERVISED_LABEL_OFFSET = 1000.0


def _bc(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=like.device) * (high - low) + low


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def dsm_loss(net: nn.Module | None, sde: SDE, x: Tensor, *, likelihood_weighting: bool = False,
             reduce_mean: bool = True, eps: float = DSM_EPS, generator: torch.Generator | None = None,
             score_fn: ScoreFn | None = None) -> Tensor:
    """score_sde's continuous-time DSM loss (`get_sde_loss_fn`), a scalar.

    t [B] from `sde.sample_training_times` (U(eps, T); a `DiscreteVPSDE`: uniform integer steps, see the
    module docstring), z ~ N(0, I) (drawn in that order), x_t = alpha(t) x + std(t) z, s = score(x_t, t)
    (`score_fn`, or `get_score_fn(net, sde)` when it is None).
    Per sample: reduce(|s std(t) + z|^2) (the score_sde weighting lambda(t) = std(t)^2), or with
    `likelihood_weighting` reduce(|s + z / std(t)|^2) g(t)^2 (g the SDE's diffusion; `DiscreteVPSDE`: its
    continuous limit). `reduce` is the mean over pixels (`reduce_mean`) or half the sum. Returns the batch
    mean.
    """
    score_fn = get_score_fn(net, sde) if score_fn is None else score_fn
    t = sde.sample_training_times(x.shape[0], eps, device=x.device, generator=generator)
    z = _normal(x, generator)
    mean, std = sde.marginal_prob(x, t)
    score = score_fn(mean + _bc(std) * z, t)
    if likelihood_weighting:
        losses = torch.square(score + z / _bc(std)).flatten(1)
    else:
        losses = torch.square(score * _bc(std) + z).flatten(1)
    losses = losses.mean(dim=1) if reduce_mean else 0.5 * losses.sum(dim=1)
    if likelihood_weighting:
        losses = losses * sde.sde(torch.zeros_like(x), t)[1] ** 2
    return losses.mean()


def supervised_loss(net: nn.Module | None, sde: SDE, degraded: Tensor, clean: Tensor, *,
                    t0_range: tuple[float, float] = (0.05, 0.3), loss: Literal["l1", "l2"] = "l1",
                    generator: torch.Generator | None = None, score_fn: ScoreFn | None = None,
                    label_offset: float = 0.0) -> Tensor:
    """Supervised reconstruction loss of a warm-started sampler's first step, a scalar.

    t0 ~ U(t0_range) [B], z ~ N(0, I) (drawn in that order); the degraded slice is diffused to t0,
    x_t0 = alpha(t0) degraded + std(t0) z, denoised in one Tweedie step (`sde.denoise`)
    x0_hat = (x_t0 + std(t0)^2 s(x_t0, t0)) / alpha(t0), and compared to the clean slice:
    mean |x0_hat - clean| (l1) or mean (x0_hat - clean)^2 (l2) over all pixels and the batch.
    With `net` (a noise prediction, score_sde's DDPM) std^2 s = -std net(x_t0, labels), finite at t0 = 0; with
    `score_fn` (any family) the score itself, at t0 >= `DSM_EPS` (where an eps-network's std(t0) > 0).
    `label_offset` (only with `net`; ValueError with `score_fn`): the network is called with labels
    `sde.labels(t0) + label_offset` (`SUPERVISED_LABEL_OFFSET`: a conditioning the score never uses); x_t0,
    std(t0), alpha(t0) and the Tweedie formula are those of t0 as before. 0 (the default): the score's own
    labels, bit-identical to no offset.
    """
    low, high = t0_range
    if not 0.0 <= low <= high <= sde.T:
        raise ValueError(f"t0_range must satisfy 0 <= low <= high <= {sde.T}, got {t0_range}")
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
    if label_offset != 0.0 and score_fn is not None:
        raise ValueError("label_offset needs `net` (score_sde's DDPM labels); a score_fn has no labels, got "
                         f"label_offset={label_offset!r} with score_fn")
    t0 = _uniform(degraded.shape[0], low, high, degraded, generator)
    z = _normal(degraded, generator)
    if score_fn is not None:
        t0 = t0.clamp_min(DSM_EPS)
    mean, std = sde.marginal_prob(degraded, t0)
    x_t0 = mean + _bc(std) * z
    if score_fn is not None:
        x0_hat = sde.denoise(x_t0, t0, score_fn(x_t0, t0))
    else:  # std^2 s = -std out (s = -out / std): the same estimate, finite at t0 = 0
        labels = sde.labels(t0)
        if label_offset != 0.0:  # (0: exactly the score's labels, no extra operation)
            labels = labels + label_offset
        x0_hat = (x_t0 - _bc(std) * net(x_t0, labels)) / _bc(sde.alpha(t0))
    diff = x0_hat - clean
    return diff.abs().mean() if loss == "l1" else diff.square().mean()
