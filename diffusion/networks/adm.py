"""guided-diffusion's ADM U-Net (Dhariwal & Nichol 2021) -- the network of the DDS fastMRI prior -- hosted in
diffusers' `UNet2DModel`, with the state-dict conversion from and to guided-diffusion's layout.

What an ADM is (guided-diffusion `unet.py:UNetModel`, the facts the fixture `dds_adm_tiny` records):
- time embedding: `timestep_embedding(t, C)` = [cos(t f_k), sin(t f_k)], f_k = exp(-ln(10^4) k / (C/2)) (cos
  first, /half), then Linear(C -> 4C), SiLU, Linear(4C -> 4C). diffusers: `Timesteps(C, flip_sin_to_cos=True,
  downscale_freq_shift=0)` and `TimestepEmbedding` -- the same arithmetic.
- ResBlock: GN-SiLU-conv, + Linear(SiLU(emb)) either added or, with `use_scale_shift_norm`, as
  GN(h)(1 + scale) + shift; SiLU-dropout-conv; 1x1 skip conv when channels change. With `resblock_updown` the
  down/up-sampling (2x2 average pool / nearest x2) sits inside a ResBlock, on both branches after GN-SiLU.
  diffusers: `ResnetBlock2D` (`time_embedding_norm='scale_shift'`, `down=True` / `up=True`), same order.
- attention: GN, a 1-D conv `qkv` [3C, C, 1], `QKVAttentionLegacy` (heads split *before* q/k/v: the 3C output
  channels are [q_0 k_0 v_0 q_1 k_1 v_1 ...], each ch = C / heads wide), softmax(q k / sqrt(ch)) v, 1-D conv
  `proj_out`, residual. diffusers: `Attention` with separate `to_q` / `to_k` / `to_v` Linear layers whose
  outputs are [head_0 head_1 ...]: `qkv` is reordered per head (`_split_qkv` / `_join_qkv`).
- GroupNorm32: 32 groups, eps 1e-5.

Only the configurations diffusers reproduces exactly are built (`ADMConfig.check`): resblock up/down, no class
conditioning, the legacy attention order, channel_mult[0] = 1 and one head width for all attention blocks.
The network is called as `net(x, timesteps)`: x float [B, in_channels, H, W], timesteps float [B] (integer
step indices 0..N-1 as floats, as DDS passes them); output [B, out_channels, H, W] (DDS: channels 0..1 are
eps, 2..3 the learned-variance values). H and W need not be multiples of 2**(levels - 1): `forward` pads and
crops back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion.sampling.sde import pad_to_multiple
from lfmri_utils.errors import InputError

#: guided-diffusion ResBlock sub-module -> diffusers ResnetBlock2D sub-module
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@dataclass(frozen=True)
class ADMConfig:
    """An ADM's architecture, in guided-diffusion's `UNetModel` terms.

    attention_ds: the downsampling rates (1, 2, 4, ...) whose levels hold attention blocks (guided-diffusion's
    `attention_resolutions` after `create_model` turned resolutions into rates: image_size // resolution).
    num_head_channels = -1 means `num_heads` heads (`num_heads_upsample` on the up path, -1: num_heads).
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    dropout: float = 0.0
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    class_cond: bool = False
    use_new_attention_order: bool = False
    use_fp16: bool = False

    @classmethod
    def from_guided_diffusion(cls, model: Mapping) -> ADMConfig:
        """The architecture `guided_diffusion/script_util.py:create_model(**model)` builds from a DDS or
        guided-diffusion `model` config section (strings such as attention_resolutions "16" and channel_mult
        "1,2" as there; an empty or absent channel_mult takes create_model's default for the image size)."""
        image_size = int(model["image_size"])
        mult = model.get("channel_mult", "")
        if mult in ("", None):
            defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 320: (1, 1, 2, 2, 4, 4),
                        128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
            if image_size not in defaults:
                raise InputError(f"ADM config: no channel_mult and no default for image_size {image_size}")
            mult = defaults[image_size]
        elif isinstance(mult, str):
            mult = tuple(int(m) for m in mult.split(","))
        res = model.get("attention_resolutions", "16")
        res = res.split(",") if isinstance(res, str) else list(res)
        in_ch = int(model["in_channels"])
        return cls(image_size=image_size, in_channels=in_ch, model_channels=int(model["num_channels"]),
                   out_channels=in_ch * 2 if model.get("learn_sigma", False) else in_ch,
                   num_res_blocks=int(model["num_res_blocks"]),
                   attention_ds=tuple(image_size // int(r) for r in res), channel_mult=tuple(mult),
                   dropout=float(model.get("dropout", 0.0)), num_heads=int(model.get("num_heads", 1)),
                   num_head_channels=int(model.get("num_head_channels", -1)),
                   num_heads_upsample=int(model.get("num_heads_upsample", -1)),
                   use_scale_shift_norm=bool(model.get("use_scale_shift_norm", False)),
                   resblock_updown=bool(model.get("resblock_updown", False)),
                   class_cond=bool(model.get("class_cond", False)),
                   use_new_attention_order=bool(model.get("use_new_attention_order", False)),
                   use_fp16=bool(model.get("use_fp16", False)))

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def attention_at(self, level: int) -> bool:
        """Whether the level (0 = full resolution) holds attention blocks."""
        return 2**level in self.attention_ds

    def head_dim(self) -> int:
        """The one head width of every attention block (diffusers' `attention_head_dim`)."""
        if self.num_head_channels != -1:
            return self.num_head_channels
        up_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        widths = {self.model_channels * self.channel_mult[-1] // self.num_heads}
        for level in range(self.levels):
            if self.attention_at(level):
                ch = self.model_channels * self.channel_mult[level]
                widths |= {ch // self.num_heads, ch // up_heads}
        if len(widths) != 1:
            raise InputError(f"ADM config: attention head widths {sorted(widths)} differ between blocks; "
                             "diffusers' UNet2DModel needs one (set num_head_channels)")
        return int(widths.pop())

    def check(self) -> None:
        """Raise InputError (one line) for an option diffusers' UNet2DModel cannot reproduce exactly."""
        unsupported = [
            ("resblock_updown", not self.resblock_updown, "False (conv resampling)"),
            ("class_cond", self.class_cond, "True"), ("use_fp16", self.use_fp16, "True"),
            ("use_new_attention_order", self.use_new_attention_order, "True"),
            ("channel_mult[0]", self.channel_mult[0] != 1, f"{self.channel_mult[0]} (not 1)"),
        ]
        for name, bad, value in unsupported:
            if bad:
                raise InputError(f"ADM config: {name} = {value} is not supported (lfmri hosts the DDS "
                                 "configuration: resblock up/down, legacy attention, float32, unconditional)")
        if any(int(m) != m for m in self.channel_mult):
            raise InputError(f"ADM config: channel_mult {self.channel_mult} must be integers")
        self.head_dim()


class ADMUNet(nn.Module):
    """guided-diffusion's ADM U-Net as a diffusers `UNet2DModel` (`self.unet`), called as `net(x, timesteps)`.

    Args:
        config: the architecture (`ADMConfig`; `ADMConfig.from_guided_diffusion` reads a DDS config).
        grad_checkpointing: recompute block activations in the backward pass (diffusers').
    State-dict keys are diffusers' under `unet.`; `from_guided_diffusion_state_dict` converts a
    guided-diffusion (DDS) state dict to them and `guided_diffusion_state_dict` back.
    """

    def __init__(self, config: ADMConfig, grad_checkpointing: bool = False) -> None:
        super().__init__()
        config.check()
        from diffusers import UNet2DModel  # heavy import: only when an ADM is built

        self.config = config
        levels = config.levels
        channels = tuple(int(config.model_channels * m) for m in config.channel_mult)
        self.unet = UNet2DModel(
            sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
            center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
            down_block_types=tuple("AttnDownBlock2D" if config.attention_at(i) else "ResnetDownsampleBlock2D"
                                   for i in range(levels)),
            up_block_types=tuple("AttnUpBlock2D" if config.attention_at(i) else "ResnetUpsampleBlock2D"
                                 for i in reversed(range(levels))),
            block_out_channels=channels, layers_per_block=config.num_res_blocks, mid_block_scale_factor=1,
            downsample_type="resnet", upsample_type="resnet", dropout=config.dropout, act_fn="silu",
            attention_head_dim=config.head_dim(), norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
            resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default")
        if grad_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @property
    def size_multiple(self) -> int:
        """H and W of `unet_forward` inputs must be multiples of this: 2**(number of downsamplings)."""
        return 2 ** (self.config.levels - 1)

    def unet_forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """The ADM on x [B, C, H, W] (H, W multiples of `size_multiple`), timesteps [B] -> [B, out, H, W]."""
        return self.unet(x, timesteps.to(x.device), return_dict=False)[0]

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Output [B, out_channels, H, W] for x [B, in_channels, H, W] of any H x W and timesteps [B] (float
        step indices): `unet_forward` on x padded at the bottom / right to `size_multiple`, cropped back."""
        return pad_to_multiple(self.unet_forward, self.size_multiple)(x, timesteps)

    def _pairs(self) -> Iterator[tuple[str, str, str]]:
        """(guided-diffusion prefix, diffusers prefix, kind) of every module, kind in
        {'same', 'resblock', 'attention'}; diffusers prefixes are under `unet.`."""
        c = self.config
        yield "time_embed.0", "unet.time_embedding.linear_1", "same"
        yield "time_embed.2", "unet.time_embedding.linear_2", "same"
        yield "input_blocks.0.0", "unet.conv_in", "same"
        k = 1
        for level in range(c.levels):
            block = f"unet.down_blocks.{level}"
            for j in range(c.num_res_blocks):
                yield f"input_blocks.{k}.0", f"{block}.resnets.{j}", "resblock"
                if c.attention_at(level):
                    yield f"input_blocks.{k}.1", f"{block}.attentions.{j}", "attention"
                k += 1
            if level != c.levels - 1:
                yield f"input_blocks.{k}.0", f"{block}.downsamplers.0", "resblock"
                k += 1
        yield "middle_block.0", "unet.mid_block.resnets.0", "resblock"
        yield "middle_block.1", "unet.mid_block.attentions.0", "attention"
        yield "middle_block.2", "unet.mid_block.resnets.1", "resblock"
        k = 0
        for u, level in enumerate(reversed(range(c.levels))):
            block = f"unet.up_blocks.{u}"
            for i in range(c.num_res_blocks + 1):
                yield f"output_blocks.{k}.0", f"{block}.resnets.{i}", "resblock"
                sub = 1
                if c.attention_at(level):
                    yield f"output_blocks.{k}.1", f"{block}.attentions.{i}", "attention"
                    sub = 2
                if level and i == c.num_res_blocks:
                    yield f"output_blocks.{k}.{sub}", f"{block}.upsamplers.0", "resblock"
                k += 1
        yield "out.0", "unet.conv_norm_out", "same"
        yield "out.2", "unet.conv_out", "same"

    def _heads(self, diffusers_prefix: str) -> int:
        attn = self.get_submodule(diffusers_prefix)
        return int(attn.heads)

    def from_guided_diffusion_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """guided-diffusion `UNetModel.state_dict()` -> this module's state dict (same tensors, renamed; the
        legacy per-head `qkv` split into `to_q` / `to_k` / `to_v`). KeyError names the first key left over or
        missing."""
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for gd, df, kind in self._pairs():
            for key in [k for k in state if k.startswith(gd + ".")]:
                rest = key[len(gd) + 1:]
                used.add(key)
                if kind == "same":
                    out[f"{df}.{rest}"] = state[key]
                elif kind == "resblock":
                    sub, _, param = rest.rpartition(".")
                    if sub not in _RESBLOCK:
                        raise KeyError(f"unexpected ResBlock key {key!r}")
                    out[f"{df}.{_RESBLOCK[sub]}.{param}"] = state[key]
                else:
                    out.update(_attention_from_gd(df, rest, state[key], self._heads(df)))
        left = [k for k in state if k not in used]
        if left:
            raise KeyError(f"{len(left)} guided-diffusion keys fit no ADM module, first {left[0]!r}")
        missing = [k for k in self.state_dict() if k not in out]
        if missing:
            raise KeyError(f"{len(missing)} ADM keys missing, first {missing[0]!r}")
        return out

    def guided_diffusion_state_dict(self) -> dict[str, Tensor]:
        """This network's weights in guided-diffusion's `UNetModel` layout (the inverse of
        `from_guided_diffusion_state_dict`), e.g. to run the file in DDS."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        out: dict[str, Tensor] = {}
        inverse = {v: k for k, v in _RESBLOCK.items()}
        for gd, df, kind in self._pairs():
            keys = [k for k in state if k.startswith(df + ".")]
            if kind == "attention":
                out.update(_attention_to_gd(gd, df, state, self._heads(df)))
                continue
            for key in keys:
                rest = key[len(df) + 1:]
                if kind == "same":
                    out[f"{gd}.{rest}"] = state[key]
                else:
                    sub, _, param = rest.rpartition(".")
                    out[f"{gd}.{inverse[sub]}.{param}"] = state[key]
        return out


def _attention_from_gd(df: str, rest: str, value: Tensor, heads: int) -> dict[str, Tensor]:
    """One guided-diffusion AttentionBlock tensor (`norm.*`, `qkv.*`, `proj_out.*`) -> diffusers keys."""
    sub, _, param = rest.rpartition(".")
    if sub == "norm":
        return {f"{df}.group_norm.{param}": value}
    if sub == "proj_out":
        return {f"{df}.to_out.0.{param}": value.reshape(value.shape[0], -1) if param == "weight" else value}
    if sub == "qkv":
        q, k, v = _split_qkv(value, heads)
        return {f"{df}.to_q.{param}": q, f"{df}.to_k.{param}": k, f"{df}.to_v.{param}": v}
    raise KeyError(f"unexpected attention key {rest!r}")


def _attention_to_gd(gd: str, df: str, state: Mapping[str, Tensor], heads: int) -> dict[str, Tensor]:
    out = {f"{gd}.norm.{p}": state[f"{df}.group_norm.{p}"] for p in ("weight", "bias")}
    out[f"{gd}.proj_out.weight"] = state[f"{df}.to_out.0.weight"][..., None]
    out[f"{gd}.proj_out.bias"] = state[f"{df}.to_out.0.bias"]
    for p in ("weight", "bias"):
        out[f"{gd}.qkv.{p}"] = _join_qkv(*(state[f"{df}.to_{n}.{p}"] for n in "qkv"), heads)
    return out


def _split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Legacy-order `qkv` weight [3C, C, 1] (or bias [3C]), rows [q_0 k_0 v_0 q_1 ...] per head, -> q, k, v
    weights [C, C] (or biases [C]) with rows [head_0 head_1 ...]."""
    c = qkv.shape[0] // 3
    per_head = qkv.reshape(heads, 3, c // heads, *qkv.shape[1:2])  # [heads, (q,k,v), ch, (C)]
    return tuple(per_head[:, i].reshape(c, *qkv.shape[1:2]) for i in range(3))  # type: ignore[return-value]


def _join_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Inverse of `_split_qkv`: q, k, v [C, C] (or [C]) -> legacy `qkv` [3C, C, 1] (or [3C])."""
    c = q.shape[0]
    per_head = torch.stack([t.reshape(heads, c // heads, *t.shape[1:]) for t in (q, k, v)], dim=1)
    joined = per_head.reshape(3 * c, *q.shape[1:])
    return joined[..., None] if q.dim() == 2 else joined
