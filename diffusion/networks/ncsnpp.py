"""score_sde's NCSN++ (Song et al. 2021) in the configuration of the score-MRI fastMRI prior, written so that
its state dicts load strictly (the key layout of score_sde's `models/ncsnpp.py`, `layerspp.py`,
`up_or_down_sampling.py`).

The configuration (score-MRI `configs/ve/fastmri_knee_320_ncsnpp_continuous.py`; other values are refused by
the importer): Gaussian Fourier embedding of log sigma, BigGAN residual blocks with FIR [1, 3, 3, 1]
up/down-sampling, `progressive='none'`, `progressive_input='residual'` (an input pyramid of FIR-downsampling
3x3 convs added to h after each downsampling), `skip_rescale` ((skip + h) / sqrt 2), DDPM attention,
`scale_by_sigma` (output / sigma).

Layout (a flat `all_modules` ModuleList in call order): 0 `GaussianFourierProjection` (`W` [nf], not
trainable), 1-2 the embedding MLP, 3 the input conv; per level `num_res_blocks` x (`ResnetBlockBigGANpp`,
`AttnBlockpp` where the level's width is in attn_resolutions), then, except at the last level, a down
`ResnetBlockBigGANpp` and the pyramid `FirDownsample` (`Conv2d_0.weight` / `.bias`); the middle (res, attn,
res); per level upwards `num_res_blocks + 1` x `ResnetBlockBigGANpp` on cat([h, skip]), the level's attention,
an up `ResnetBlockBigGANpp` except at level 0; GroupNorm and the output conv. GroupNorm groups =
min(C // 4, 32), eps 1e-6.

The network is called as `net(x, sigmas)`: x float [B, C, H, W], sigmas float [B] (the VE marginal std
sigma(t), the label score-MRI passes); output [B, C, H, W], already the score (divided by sigma).
`data.centered = False` maps x -> 2x - 1 first. Where a level holds attention is decided at construction from
`image_size` (score_sde decides it from the runtime width, which agrees at image_size); `forward` pads H, W to
multiples of 2**(levels - 1) and crops back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.networks.ddpm import _ACTIVATIONS, AttnBlock, _default_init_
from diffusion.sampling.sde import pad_to_multiple

_SQRT2 = math.sqrt(2.0)


def _fir(kernel: Sequence[float], gain: float = 1.0) -> Tensor:
    """Separable FIR taps [k] -> normalised 2-D kernel [k, k] (sum = gain), float32."""
    k = torch.tensor(kernel, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * gain


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample (zero insertion), FIR-filter and downsample each channel of x [B, C, H, W].

    kernel [k, k] (convolution, i.e. flipped before the correlation); pad = (before, after) zeros on both axes
    after the upsampling. Output [B, C, (H*up + pad0 + pad1 - k) // down + 1, (same for W)].
    """
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h, up, w, up)
        z[:, :, :, 0, :, 0] = x
        x = z.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, [0, 1]).to(x)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: Tensor, fir_kernel: Sequence[float], factor: int = 2) -> Tensor:
    """FIR x2 upsampling [B, C, H, W] -> [B, C, 2H, 2W] (constant images keep their value)."""
    k = _fir(fir_kernel, gain=factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, fir_kernel: Sequence[float], factor: int = 2) -> Tensor:
    """FIR x2 downsampling [B, C, H, W] -> [B, C, H/2, W/2]."""
    k = _fir(fir_kernel)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class GaussianFourierProjection(nn.Module):
    """[sin(2 pi log(sigma) W), cos(...)] embedding [B, 2 nf] of noise levels; `W` [nf] ~ N(0, scale^2) is a
    non-trainable parameter (so it is in the state dict but not in the optimizer or the EMA)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, log_sigma: Tensor) -> Tensor:
        proj = log_sigma[:, None] * self.W[None, :] * 2 * np.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class FirDownsample(nn.Module):
    """The input pyramid's FIR-downsampling 3x3 conv (score_sde `layerspp.Downsample(fir=True,
    with_conv=True)`): FIR blur (pad 2) then a stride-2 conv, [B, in, H, W] -> [B, out, H/2, W/2]. Parameters
    `Conv2d_0.weight` [out, in, 3, 3] and `Conv2d_0.bias` [out]."""

    def __init__(self, in_ch: int, out_ch: int, fir_kernel: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.Conv2d_0 = nn.Module()
        self.Conv2d_0.weight = nn.Parameter(_default_init_(torch.empty(out_ch, in_ch, 3, 3)))
        self.Conv2d_0.bias = nn.Parameter(torch.zeros(out_ch))
        self.fir_kernel = tuple(fir_kernel)

    def forward(self, x: Tensor) -> Tensor:
        w = self.Conv2d_0.weight
        k = _fir(self.fir_kernel)
        p = (k.shape[0] - 2) + (w.shape[-1] - 1)
        x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
        return F.conv2d(x, w, stride=2) + self.Conv2d_0.bias[None, :, None, None]


def _conv(in_ch: int, out_ch: int, kernel: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2)
    _default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _groupnorm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(ch // 4, 32), num_channels=ch, eps=1e-6)


class AttnBlockpp(AttnBlock):
    """The DDPM attention block (same weights and keys) with NCSN++'s GroupNorm groups min(C // 4, 32) and
    output (x + h) / sqrt 2 with skip_rescale."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0) -> None:
        super().__init__(channels, num_groups=min(channels // 4, 32), init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out / _SQRT2 if self.skip_rescale else out


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block: GN-act, (FIR up/down on both branches), conv, + Dense(act(temb)),
    GN-act-dropout-conv; 1x1 `Conv_2` skip when channels change or resampling; (skip + h) / sqrt 2 with
    skip_rescale."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.0,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _groupnorm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
            _default_init_(self.Dense_0.weight)
            nn.init.zeros_(self.Dense_0.bias)
        self.GroupNorm_1 = _groupnorm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = _conv(in_ch, out_ch, kernel=1)
        self.act, self.up, self.down = act, up, down
        self.fir_kernel, self.skip_rescale = tuple(fir_kernel), skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h, x = upsample_2d(h, self.fir_kernel), upsample_2d(x, self.fir_kernel)
        elif self.down:
            h, x = downsample_2d(h, self.fir_kernel), downsample_2d(x, self.fir_kernel)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """score_sde's NCSN++ in score-MRI's configuration, with its config fields as constructor arguments.

    Args (score_sde `config.model.*` unless noted):
        nf: base channel count. ch_mult: channel multiplier per level. num_res_blocks: residual blocks per
            level (down path; the up path has one more). attn_resolutions: level widths (px at image_size)
            that get attention blocks (the middle always has one). dropout: residual-block dropout.
        image_size, num_channels, centered: `config.data.*` (centered=False: x -> 2x - 1 first).
        fourier_scale: std of the Fourier `W`. fir_kernel: FIR taps. skip_rescale: divide residual sums
            by sqrt 2.
        init_scale: initial scale of each block's last conv. scale_by_sigma: divide the output by the label.
        sigma_min, sigma_max, num_scales: the `sigmas` buffer (geometric, descending; unused with Fourier
            labels, stored because score_sde stores it). nonlinearity: 'swish' | 'elu' | 'relu' | 'lrelu'.
        grad_checkpointing: recompute residual / attention activations in the backward pass.
    """

    def __init__(self, nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, image_size: int = 320,
                 num_channels: int = 1, centered: bool = False, fourier_scale: float = 16.0,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0, scale_by_sigma: bool = True, sigma_min: float = 0.01,
                 sigma_max: float = 378.0, num_scales: int = 2000, nonlinearity: str = "swish",
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if nonlinearity.lower() not in _ACTIVATIONS:
            raise ValueError(f"nonlinearity {nonlinearity!r} not in {sorted(_ACTIVATIONS)}")
        self.config = dict(nf=nf, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, image_size=image_size,
                           num_channels=num_channels, centered=centered, fourier_scale=fourier_scale,
                           fir_kernel=list(fir_kernel), skip_rescale=skip_rescale, init_scale=init_scale,
                           scale_by_sigma=scale_by_sigma, sigma_min=sigma_min, sigma_max=sigma_max,
                           num_scales=num_scales, nonlinearity=nonlinearity)
        self.act = act = _ACTIVATIONS[nonlinearity.lower()]()
        sigmas = torch.from_numpy(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)))
        self.register_buffer("sigmas", sigmas)  # float64, as score_sde stores it
        self.num_channels, self.centered, self.scale_by_sigma = num_channels, centered, scale_by_sigma
        self.skip_rescale, self.grad_checkpointing = skip_rescale, grad_checkpointing
        self.levels = len(ch_mult)
        resolutions = [image_size // 2**i for i in range(self.levels)]
        attn = set(attn_resolutions)
        block = {"act": act, "temb_dim": 4 * nf, "dropout": dropout, "fir_kernel": fir_kernel,
                 "skip_rescale": skip_rescale, "init_scale": init_scale}

        def attention(ch: int) -> AttnBlockpp:
            return AttnBlockpp(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        embed = nn.Linear(2 * nf, 4 * nf), nn.Linear(4 * nf, 4 * nf)
        for lin in embed:
            _default_init_(lin.weight)
            nn.init.zeros_(lin.bias)
        modules: list[nn.Module] = [GaussianFourierProjection(nf, fourier_scale), *embed,
                                    _conv(num_channels, nf)]
        plan: list[str] = []  # the role of each module after the input conv, in call order
        skips, in_ch, pyramid_ch = [nf], nf, num_channels
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                modules.append(ResnetBlockBigGANpp(in_ch=in_ch, out_ch=nf * mult, **block))
                in_ch = nf * mult
                plan.append("down_res")
                if resolutions[level] in attn:
                    modules.append(attention(in_ch))
                    plan.append("attn")
                plan.append("push")
                skips.append(in_ch)
            if level != self.levels - 1:
                modules.append(ResnetBlockBigGANpp(in_ch=in_ch, down=True, **block))
                modules.append(FirDownsample(pyramid_ch, in_ch, fir_kernel))
                pyramid_ch = in_ch
                plan += ["down", "pyramid", "push"]
                skips.append(in_ch)
        modules += [ResnetBlockBigGANpp(in_ch=in_ch, **block), attention(in_ch),
                    ResnetBlockBigGANpp(in_ch=in_ch, **block)]
        plan += ["mid_res", "attn", "mid_res"]
        for level in reversed(range(self.levels)):
            for _ in range(num_res_blocks + 1):
                modules.append(ResnetBlockBigGANpp(in_ch=in_ch + skips.pop(), out_ch=nf * ch_mult[level],
                                                   **block))
                in_ch = nf * ch_mult[level]
                plan.append("up_res")
            if resolutions[level] in attn:
                modules.append(attention(in_ch))
                plan.append("attn")
            if level != 0:
                modules.append(ResnetBlockBigGANpp(in_ch=in_ch, up=True, **block))
                plan.append("up")
        modules += [_groupnorm(in_ch), _conv(in_ch, num_channels, init_scale=init_scale)]
        self.all_modules = nn.ModuleList(modules)
        self._plan = plan

    @property
    def size_multiple(self) -> int:
        """H and W of `unet` inputs must be multiples of this: 2**(number of downsamplings)."""
        return 2 ** (self.levels - 1)

    def _call(self, module: nn.Module, *args: Tensor | None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: Tensor, sigmas: Tensor) -> Tensor:
        """Score [B, C, H, W] for x [B, C, H, W] of any H x W and noise levels sigmas [B]: `unet` on x padded
        (bottom / right) to multiples of `size_multiple`, cropped back."""
        return pad_to_multiple(self.unet, self.size_multiple)(x, sigmas)

    def unet(self, x: Tensor, sigmas: Tensor) -> Tensor:
        """score_sde's NCSN++ forward pass for x [B, C, H, W] (H, W multiples of `size_multiple`) and
        sigmas [B]."""
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"NCSNpp.unet needs H and W that are multiples of {m}, got "
                             f"{tuple(x.shape[-2:])} "
                             "(call the network itself, which pads)")
        mods = iter(self.all_modules)
        temb = next(mods)(torch.log(sigmas))
        temb = next(mods)(temb)
        temb = next(mods)(self.act(temb))
        h = x if self.centered else 2 * x - 1.0
        pyramid = h
        hs = [next(mods)(h)]
        for role in self._plan:
            if role == "push":
                hs.append(h)
                continue
            module = next(mods)
            if role in ("down_res", "down"):
                h = self._call(module, hs[-1], temb)
            elif role == "pyramid":
                pyramid = module(pyramid)
                pyramid = (pyramid + h) / _SQRT2 if self.skip_rescale else pyramid + h
                h = pyramid
            elif role in ("mid_res", "up"):
                h = self._call(module, h, temb)
            elif role == "up_res":
                h = self._call(module, torch.cat([h, hs.pop()], dim=1), temb)
            else:  # "attn"
                h = self._call(module, h)
        h = self.act(next(mods)(h))
        h = next(mods)(h)
        if self.scale_by_sigma:
            h = h / sigmas.to(h.dtype)[:, None, None, None]
        return h
