"""The DDPM U-Net of score_sde (Song et al. 2021), rewritten so that its state dicts load strictly.

Module structure and parameter names follow score_sde's `models/ddpm.py`: a flat `all_modules` ModuleList
(time-embedding MLP, input conv, down path, middle, up path, output GroupNorm and conv, in that order) and a
`sigmas` buffer (SMLD noise levels, unused unless `scale_by_sigma`). Residual blocks hold `GroupNorm_0`,
`Conv_0`, `Dense_0`, `GroupNorm_1`, `Dropout_0`, `Conv_1` and, when channels change, a 1x1 `NIN_0`; attention
blocks hold `GroupNorm_0` and `NIN_0..3`; resamplers hold `Conv_0`. Initialisation follows DDPM's
variance-scaling (fan_avg, uniform), zero biases, near-zero (1e-10) scale on the last conv of each block.

The network is called as `net(x, labels)`: x float [B, C, H, W], labels float [B] (999 * t under the VP-SDE,
see `sde.VPSDE.labels`); the output has the shape of x (the VP-SDE noise prediction, score = -out / std).
It is fully convolutional apart from global attention, so it runs at any H x W: `DDPM.unet` itself needs H and
W to be multiples of `size_multiple` = 2**(len(ch_mult) - 1) (square or not), and `forward` pads other sizes
at the bottom and right to that multiple and crops the output back (`sde.pad_to_multiple`); at multiples it is
exactly score_sde's network. `image_size` only decides, at construction, at which levels attention blocks sit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.sampling.sde import pad_to_multiple
from lfmri_utils.errors import InputError
from lfmri_utils.options import Rule, check_options, number, sequence

_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "swish": nn.SiLU}


def _default_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM's initialiser in place: uniform variance scaling with fan_avg (scale 0 means 1e-10)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, padding: int = 1,
             init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)
    _default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    lin = nn.Linear(in_features, out_features)
    _default_init_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def timestep_embedding(labels: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding [B, dim] of float labels [B] (sin half then cos half, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=labels.device)
                      * -(math.log(max_positions) / (half - 1)))
    args = labels.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class NIN(nn.Module):
    """Per-pixel linear map over channels (a 1x1 conv stored as W [in, out], b [out])."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(_default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (`init_scale`: of the output
    projection NIN_3)."""

    def __init__(self, channels: int, num_groups: int = 32, init_scale: float = 0.0) -> None:
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.GroupNorm_0(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2)
                   for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, 1, HW, C]
        return x + self.NIN_3(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = False) -> None:
        super().__init__()
        if with_conv:
            self.Conv_0 = _conv3x3(channels, channels)
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv with TF 'SAME' padding (pad right/bottom), or 2x2 average pool."""

    def __init__(self, channels: int, with_conv: bool = False) -> None:
        super().__init__()
        if with_conv:
            self.Conv_0 = _conv3x3(channels, channels, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, NIN shortcut if needed."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 dropout: float = 0.1, num_groups: int = 32) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = nn.GroupNorm(num_groups=num_groups, num_channels=in_ch, eps=1e-6)
        self.act = act
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = nn.GroupNorm(num_groups=num_groups, num_channels=out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=0.0)
        if in_ch != out_ch:
            self.NIN_0 = NIN(in_ch, out_ch)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        return (self.NIN_0(x) if hasattr(self, "NIN_0") else x) + h


#: the `DDPMConfig` fields that score_sde's nested config keeps in `data` (the others sit in `model`)
DATA_FIELDS: tuple[str, ...] = ("image_size", "num_channels", "centered")


@dataclass(frozen=True)
class DDPMConfig:
    """The DDPM U-Net's configuration: score_sde's config fields (`config.model.*` unless noted), checked when
    made (InputError naming the first bad field). Defaults: score_sde's 34.4M DDPM at 256 px, 2 channels.

    Fields:
        nf: base channel count. ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level (down path; the up path has one more).
        attn_resolutions: attention blocks are inserted at the levels whose width (px) is one of these for an
            image_size x image_size input (the training crop); the levels stay fixed whatever size the network
            later runs at (the middle block always has one). dropout: dropout rate in the residual blocks.
            resamp_with_conv: conv in up/downsampling.
        conditional: condition on the time label (score_sde requires True; False drops the embedding MLP).
        scale_by_sigma: divide the output by `sigmas[labels]` (integer labels; NCSN style, off for VP).
        nonlinearity: 'swish' | 'elu' | 'relu' | 'lrelu'.
        image_size, num_channels, centered: `config.data.*` (DATA_FIELDS); centered=False maps inputs
            [0, 1] -> [-1, 1]. image_size (px) places the attention levels; inputs may have any size (module
            docstring).
        sigma_min, sigma_max, num_scales: define the `sigmas` buffer (geometric, descending), which score_sde
            always stores in the state dict.
        num_groups: GroupNorm groups (not a score_sde field: score_sde fixes 32; smaller allows tiny nets); it
            must divide every channel count nf * ch_mult.
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    scale_by_sigma: bool = False
    nonlinearity: str = "swish"
    image_size: int = 256
    num_channels: int = 2
    centered: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    num_groups: int = 32

    #: ranges of the fields (their types are the annotations), checked in `__post_init__`
    RULES: ClassVar[dict[str, Rule]] = {
        "nf": number(1, integer=True),
        "ch_mult": sequence(number(1, integer=True), min_len=1),
        "num_res_blocks": number(1, integer=True),
        "attn_resolutions": sequence(number(1, integer=True)),
        "dropout": number(0, 1, high_open=True),
        "nonlinearity": Rule(lambda v: isinstance(v, str) and v.lower() in _ACTIVATIONS,
                             f"one of {', '.join(_ACTIVATIONS)}"),
        "image_size": number(1, integer=True),
        "num_channels": number(1, integer=True),
        "sigma_min": number(0, low_open=True),
        "sigma_max": number(0, low_open=True),
        "num_scales": number(1, integer=True),
        "num_groups": number(1, integer=True),
    }

    def __post_init__(self) -> None:
        check_options(vars(self), self.RULES)
        for name in ("ch_mult", "attn_resolutions"):  # lists from YAML / JSON: hashable, comparable tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        channels = [self.nf * m for m in self.ch_mult]
        if any(c % self.num_groups for c in [self.nf, *channels]):
            raise InputError(f"num_groups must divide the channel counts nf * ch_mult = {channels}, "
                             f"got {self.num_groups}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (sequences as lists): YAML, JSON and checkpoint hyper-parameters."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def score_sde_config(self) -> dict:
        """score_sde's nested layout ({'model': {...}, 'data': {...}}) of this configuration."""
        c = self.to_dict()
        data = {k: c.pop(k) for k in DATA_FIELDS}
        return {"model": {"name": "ddpm", "normalization": "GroupNorm", **c}, "data": data}

    @classmethod
    def from_score_sde(cls, config: Mapping[str, Any]) -> DDPMConfig:
        """The configuration a score_sde config in the nested layout describes (the inverse of
        `score_sde_config`): every field its sections name (`score_sde_key`), the others at their defaults.
        The caller checks the layout and the `REQUIRED_FIELDS`; a bad value raises InputError."""
        sections = {name: config.get(name) or {} for name in ("model", "data")}
        where = {k: score_sde_key(k).split(".") for k in CONFIG_FIELDS}  # field -> (section, name)
        return cls(**{k: sections[s][name] for k, (s, name) in where.items() if name in sections[s]})


#: the DDPM's configuration fields (`DDPMConfig`'s), the one list of them
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DDPMConfig))
#: the fields a score_sde config must name (the architecture and data layout; the others have defaults)
REQUIRED_FIELDS: tuple[str, ...] = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "image_size",
                                    "num_channels", "centered")


def score_sde_key(field: str) -> str:
    """Where a `DDPMConfig` field sits in score_sde's nested config: 'data.<field>' for DATA_FIELDS, else
    'model.<field>'."""
    return f"{'data' if field in DATA_FIELDS else 'model'}.{field}"


class DDPM(nn.Module):
    """score_sde's DDPM U-Net built from a `DDPMConfig` (`self.config`); `grad_checkpointing` recomputes
    residual / attention activations in the backward pass (saves memory; a runtime choice, not part of the
    configuration)."""

    def __init__(self, config: DDPMConfig | None = None, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config = DDPMConfig() if config is None else config
        nf, ch_mult, num_res_blocks = config.nf, config.ch_mult, config.num_res_blocks
        num_channels, conditional, centered = config.num_channels, config.conditional, config.centered
        resamp_with_conv, num_groups = config.resamp_with_conv, config.num_groups
        sigma_min, sigma_max, num_scales = config.sigma_min, config.sigma_max, config.num_scales
        self.act = act = _ACTIVATIONS[config.nonlinearity.lower()]()
        sigmas = torch.from_numpy(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)))
        self.register_buffer("sigmas", sigmas)  # float64, as score_sde stores it
        self.nf, self.conditional, self.centered = nf, conditional, centered
        self.scale_by_sigma, self.grad_checkpointing = config.scale_by_sigma, grad_checkpointing
        self.num_channels = num_channels
        resolutions = [config.image_size // 2**i for i in range(len(ch_mult))]
        attn = set(config.attn_resolutions)
        block = {"act": act, "temb_dim": 4 * nf, "dropout": config.dropout, "num_groups": num_groups}

        modules: list[nn.Module] = []
        if conditional:
            modules += [_linear(nf, 4 * nf), _linear(4 * nf, 4 * nf)]
        modules.append(_conv3x3(num_channels, nf))
        # self.plan: the role of each module after the input conv, in call order
        plan: list[str] = []
        skips, in_ch = [nf], nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                modules.append(ResnetBlockDDPM(in_ch=in_ch, out_ch=nf * mult, **block))
                in_ch = nf * mult
                plan.append("down_res")
                if resolutions[level] in attn:
                    modules.append(AttnBlock(in_ch, num_groups))
                    plan.append("attn")
                plan.append("push")
                skips.append(in_ch)
            if level != len(ch_mult) - 1:
                modules.append(Downsample(in_ch, with_conv=resamp_with_conv))
                plan.append("down")
                skips.append(in_ch)
        modules += [ResnetBlockDDPM(in_ch=in_ch, **block), AttnBlock(in_ch, num_groups),
                    ResnetBlockDDPM(in_ch=in_ch, **block)]
        plan += ["mid_res", "attn", "mid_res"]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[level]
                modules.append(ResnetBlockDDPM(in_ch=in_ch + skips.pop(), out_ch=out_ch, **block))
                in_ch = nf * ch_mult[level]
                plan.append("up_res")
            if resolutions[level] in attn:
                modules.append(AttnBlock(in_ch, num_groups))
                plan.append("attn")
            if level != 0:
                modules.append(Upsample(in_ch, with_conv=resamp_with_conv))
                plan.append("up")
        modules.append(nn.GroupNorm(num_groups=num_groups, num_channels=in_ch, eps=1e-6))
        modules.append(_conv3x3(in_ch, num_channels, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)
        self._plan = plan

    @property
    def size_multiple(self) -> int:
        """H and W of `unet` inputs must be multiples of this: 2**(number of downsamplings)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def _call(self, module: nn.Module, *args: Tensor | None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """Output [B, C, H, W] for inputs x [B, C, H, W] of any H x W and time labels [B] (999 * t under the
        VP-SDE): `unet` on x padded to multiples of `size_multiple` (bottom / right), cropped back."""
        return pad_to_multiple(self.unet, self.size_multiple)(x, labels)

    def unet(self, x: Tensor, labels: Tensor) -> Tensor:
        """score_sde's DDPM forward pass: output [B, C, H, W] for x [B, C, H, W] with H and W multiples of
        `size_multiple` (ValueError otherwise) and labels [B]."""
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"DDPM.unet needs H and W that are multiples of {m}, got {tuple(x.shape[-2:])} "
                             "(call the network itself, which pads)")
        mods = iter(self.all_modules)
        temb = None
        if self.conditional:
            temb = next(mods)(timestep_embedding(labels, self.nf))
            temb = next(mods)(self.act(temb))
        h = x if self.centered else 2 * x - 1.0
        hs = [next(mods)(h)]
        for role in self._plan:
            if role == "push":
                hs.append(h)
                continue
            module = next(mods)
            if role == "down_res":
                h = self._call(module, hs[-1], temb)
            elif role == "mid_res":
                h = self._call(module, h, temb)
            elif role == "up_res":
                h = self._call(module, torch.cat([h, hs.pop()], dim=1), temb)
            elif role == "attn":
                h = self._call(module, h)
            elif role == "down":
                hs.append(module(hs[-1]))
                h = hs[-1]
            else:  # "up"
                h = module(h)
        h = next(mods)(h)
        h = next(mods)(self.act(h))
        if self.scale_by_sigma:
            h = h / self.sigmas[labels.long()].to(h.dtype)[:, None, None, None]
        return h
