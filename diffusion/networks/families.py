"""Public diffusion-prior checkpoint families, their conventions as data, and the one import API.

A checkpoint file alone does not say how to use it: the label its network takes, what its output means, its
SDE, whether inputs are shifted, which weights sample. Each *family* (the code that wrote the file) declares
these once, as a frozen `Family`; the importer combines it with the checkpoint's own config file and refuses
(one line, `InputError`) a file or config whose conventions it cannot establish, or that contradicts the
family.

| family | network | SDE | label | output | weights | complex |
|---|---|---|---|---|---|---|
| `score_sde` | DDPM (`ddpm.DDPM`) | VP | 999 t | eps: score = -out / std(t) | EMA | channels |
| `hfs_sde` | DDPM | VP | VP std(t) | the score | `model` | channels |
| `score_mri` | NCSN++ (`ncsnpp.NCSNpp`) | VE | sigma(t) | score (/ sigma inside) | EMA + `W` | Re, Im apart |
| `dds` | ADM (`adm.ADMUNet`) | discrete VP | step index | eps in channels 0..C-1 | the file's | channels |
(weights: what the original code samples with, score_mri: EMA with `W` from `model`; complex: how a complex
image meets the prior.)

Files and configs (facts recorded by each original code, `tests/fixtures/*/README.md`):
- score_sde format (score_sde, HFS-SDE, score-MRI): `{'model', 'ema', 'optimizer', 'step'}`, `model` keys
  under DataParallel's `module.`, `ema['shadow_params']` a list over the *trainable* parameters in
  `parameters()` order (NCSN++'s Fourier `W` is not trainable: it comes from `model`). Config: score_sde's
  `ml_collections` `.py` (read statically, `pyconfig`), or its JSON / YAML dump, nested `{'model', 'data',
  'training'}`.
- DDS: a bare guided-diffusion `UNetModel.state_dict()`; config: DDS's YAML (`model`, `diffusion` sections).

`family_prior(family, config)` builds a family's network (its own initialisation) and SDE from a config alone.
`load_pretrained(path, config=None, family=None, weights="ema")` returns a `Pretrained`: `.network` (takes the
family's labels), `.labels(t)`, `.score(x, t)` (the score of the family's SDE at continuous t in (0, 1];
discrete families use step round(t (N - 1))) and `.sde` (`VPSDE`, `DiscreteVPSDE` or `VESDE`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from diffusion.networks.adm import ADMConfig, ADMUNet
from diffusion.networks.ddpm import DDPM, REQUIRED_FIELDS, DDPMConfig, score_sde_key
from diffusion.networks.ncsnpp import NCSNpp
from diffusion.networks.pyconfig import read_py_config
from diffusion.sampling.sde import VESDE, VPSDE, DiscreteVPSDE
from diffusion.torch_files import load_torch_file
from lfmri_utils.errors import InputError

Weights = Literal["ema", "model", "family"]
_PREFIX = "module."
_MISSING = object()


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Family:
    """The conventions of one checkpoint family, as data.

    Attributes:
        name: the family's name (`load_pretrained(family=...)`).
        summary: one line: who wrote such files and where the code is.
        architecture: 'ddpm' (score_sde's DDPM U-Net), 'ncsnpp' (score_sde's NCSN++), 'adm'
            (guided-diffusion).
        file_format: 'score_sde' (`{'model', 'ema', ...}` with `module.` keys) or 'bare' (a state dict).
        sde: 'vp' (continuous VP-SDE, beta_min / beta_max), 've' (VE-SDE, sigma_min / sigma_max),
            'vp_discrete' (discrete linear-beta DDPM schedule, beta_start / beta_end / N steps).
        label: what the network takes for time t: '999t' (999 t), 'vp_std' (the VP marginal std, in the
            original's float32 arithmetic sqrt(1 - exp(2 log alpha))), 've_sigma' (sigma(t)), 'index' (the
            step round(t (N - 1)) as a float).
        output: 'eps' (a noise prediction: score = -eps / std(t)) or 'score' (the network output is the score;
            score_mri's network divides by sigma inside, `scale_by_sigma`).
        eps_channels: 'all', or 'input_channels' (eps is the output's first C channels, C = the input's: an
            ADM with learned variances outputs 2C).
        input_shift: how inputs reach the first conv: '2x-1 unless centered' (the network maps x to 2x - 1
            when the config's data.centered is False, whatever the data range) or 'none'.
        normalisation: the data normalisation the prior was trained with, in words.
        data_scale: how lfmri reproduces it per slice (`Pretrained.data_scale`): 'none' (lfmri's images,
            magnitude scaled to 1 at the volume's 99.5th percentile, are taken as the family's range) or
            'kspace_std' (the slice is multiplied by 1 / (data.normalize_coeff x the std of its k-space), as
            HFS-SDE's data set does).
        ema: 'shadow_trainable' (EMA shadows replace the trainable parameters in `parameters()` order; buffers
            and non-trainable parameters come from `model`) or 'none' (the file holds one set of weights).
        default_weights: the weights the original code samples with: 'ema' or 'model'.
        complex_rule: 'channels' (a complex image is 2 channels, real and imaginary, of one network call) or
            'real_imag_separately' (a 1-channel prior applied to the real and the imaginary part apart).
        config_defaults: dotted config keys the importer may take from the original's default config when a
            config lacks them.
        config_required: dotted config keys that must be present (after defaults).
        config_expect: dotted config key -> allowed values; another value is a mismatch, refused.
        markers: dotted config keys only this family's configs have (used to tell families apart).
    """

    name: str
    summary: str
    architecture: Literal["ddpm", "ncsnpp", "adm"]
    file_format: Literal["score_sde", "bare"]
    sde: Literal["vp", "ve", "vp_discrete"]
    label: Literal["999t", "vp_std", "ve_sigma", "index"]
    output: Literal["eps", "score"]
    eps_channels: Literal["all", "input_channels"]
    input_shift: Literal["2x-1 unless centered", "none"]
    normalisation: str
    data_scale: Literal["none", "kspace_std"]
    ema: Literal["shadow_trainable", "none"]
    default_weights: Literal["ema", "model"]
    complex_rule: Literal["channels", "real_imag_separately"]
    config_defaults: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    config_required: tuple[str, ...] = ()
    config_expect: Mapping[str, tuple] = field(default_factory=lambda: _frozen({}))
    markers: tuple[str, ...] = ()


_DDPM_REQUIRED = tuple(score_sde_key(f) for f in REQUIRED_FIELDS)

FAMILIES: Mapping[str, Family] = _frozen({f.name: f for f in (
    Family(
        name="score_sde",
        summary="score_sde_pytorch (Song et al. 2021, github.com/yang-song/score_sde_pytorch) DDPM, "
                "continuous VP",
        architecture="ddpm", file_format="score_sde", sde="vp", label="999t", output="eps",
        eps_channels="all",
        input_shift="2x-1 unless centered",
        normalisation="images in [0, 1] (data.centered: the data scaler maps them to [-1, 1])",
        data_scale="none", ema="shadow_trainable", default_weights="ema", complex_rule="channels",
        config_defaults=_frozen({"model.name": "ddpm", "training.sde": "vpsde", "training.continuous": True,
                                 "model.beta_min": 0.1, "model.beta_max": 20.0,
                                 "model.scale_by_sigma": False}),
        config_required=_DDPM_REQUIRED,
        config_expect=_frozen({"model.name": ("ddpm",), "training.sde": ("vpsde",),
                               "training.continuous": (True,), "model.scale_by_sigma": (False,),
                               "model.conditional": (True,)}),
    ),
    Family(
        name="hfs_sde",
        summary="HFS-SDE (Cao et al., TMI 2024, github.com/Aboriginer/HFS-SDE) DDPM, continuous VP, "
                "fastMRI knee complex 2-channel",
        architecture="ddpm", file_format="score_sde", sde="vp", label="vp_std", output="score",
        eps_channels="all", input_shift="2x-1 unless centered",
        normalisation="complex coil-combined images whose multi-coil k-space was divided by "
                      "data.normalize_coeff (1.5) x its std (data.normalize_type 'std')",
        data_scale="kspace_std", ema="shadow_trainable", default_weights="model", complex_rule="channels",
        config_defaults=_frozen({"data.normalize_coeff": 1.5, "data.normalize_type": "std"}),
        config_required=(*_DDPM_REQUIRED, "model.beta_min", "model.beta_max", "training.sde",
                         "training.continuous"),
        config_expect=_frozen({"model.name": ("ddpm",), "training.sde": ("vpsde",),
                               "training.continuous": (True,), "model.scale_by_sigma": (False,),
                               "model.conditional": (True,), "data.normalize_type": ("std",)}),
        markers=("data.normalize_type", "data.normalize_coeff"),
    ),
    Family(
        name="score_mri",
        summary="score-MRI (Chung & Ye 2022, github.com/HJ-harry/score-MRI) NCSN++, continuous VE, "
                "fastMRI knee magnitude 1-channel",
        architecture="ncsnpp", file_format="score_sde", sde="ve", label="ve_sigma", output="score",
        eps_channels="all", input_shift="2x-1 unless centered",
        normalisation="magnitude images in [0, 1] (multi-coil scripts: magnitude min-max normalised)",
        data_scale="none", ema="shadow_trainable", default_weights="ema", complex_rule="real_imag_separately",
        config_defaults=_frozen({"model.dropout": 0.0, "model.nonlinearity": "swish",
                                 "model.init_scale": 0.0}),
        config_required=(*_DDPM_REQUIRED, "model.sigma_min", "model.sigma_max", "model.num_scales",
                         "model.fourier_scale", "model.fir_kernel", "model.skip_rescale", "training.sde",
                         "training.continuous", "model.scale_by_sigma", "model.embedding_type",
                         "model.resblock_type", "model.progressive", "model.progressive_input", "model.fir"),
        config_expect=_frozen({"model.name": ("ncsnpp",), "training.sde": ("vesde",),
                               "training.continuous": (True,), "model.scale_by_sigma": (True,),
                               "model.embedding_type": ("fourier",), "model.resblock_type": ("biggan",),
                               "model.progressive": ("none",), "model.progressive_input": ("residual",),
                               "model.progressive_combine": ("sum",), "model.attention_type": ("ddpm",),
                               "model.fir": (True,), "model.conditional": (True,),
                               "model.resamp_with_conv": (True,), "model.conv_size": (3,)}),
    ),
    Family(
        name="dds",
        summary="DDS (Chung et al., ICLR 2024, github.com/HJ-harry/DDS) guided-diffusion ADM, discrete VP, "
                "fastMRI knee complex 2-channel",
        architecture="adm", file_format="bare", sde="vp_discrete", label="index", output="eps",
        eps_channels="input_channels", input_shift="none",
        normalisation="complex images as stored (.npy), no scaling or shift; x_T ~ N(0, I)",
        data_scale="none", ema="none", default_weights="model", complex_rule="channels",
        config_defaults=_frozen({"model.learn_sigma": False}),
        config_required=("model.image_size", "model.in_channels", "model.num_channels",
                         "model.num_res_blocks",
                         "diffusion.beta_schedule", "diffusion.beta_start", "diffusion.beta_end",
                         "diffusion.num_diffusion_timesteps"),
        config_expect=_frozen({"diffusion.beta_schedule": ("linear",), "model.class_cond": (False,),
                               "model.type": ("openai",)}),
    ),
)})


# ------------------------------------------------------------------------------------------------ configs
def get(config: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """config['a']['b'] for dotted = 'a.b'; `default` (or KeyError) when absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


def has(config: Mapping[str, Any], dotted: str) -> bool:
    """Whether the dotted key is present in config."""
    try:
        get(config, dotted)
    except KeyError:
        return False
    return True


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def read_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config as nested dicts, from a mapping, a JSON / YAML file, or a score_sde-style `.py`
    `ml_collections` config (read without running it, `pyconfig.read_py_config`). InputError if unreadable."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config, default=list))  # a deep, plain copy
    path = Path(config)
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    if path.suffix == ".py":
        return read_py_config(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot read the config ({reason})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config is a {type(data).__name__}, not a mapping of sections")
    return data


def _norm(value: Any) -> Any:
    """Config values compared loosely: strings case-insensitively, lists as tuples."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, list):
        return tuple(value)
    return value


def resolve_config(family: Family, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`config` with the family's defaults filled in; InputError (one line naming `where`) for a required key
    that is missing or a value the family does not have."""
    config = json.loads(json.dumps(config, default=list))
    for key, value in family.config_defaults.items():
        if not has(config, key):
            _set(config, key, value)
    missing = [k for k in family.config_required if not has(config, k)]
    if missing:
        raise InputError(f"{where}: cannot establish the {family.name} conventions, the config lacks "
                         f"{', '.join(missing)}")
    for key, allowed in family.config_expect.items():
        value = get(config, key, None)
        if has(config, key) and _norm(value) not in {_norm(a) for a in allowed}:
            raise InputError(f"{where}: {key} = {value!r} does not fit family {family.name!r} (expects "
                             f"{' or '.join(repr(a) for a in allowed)})")
    return config


# -------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class _File:
    """What a checkpoint file holds: its format, the network's state dict (no prefix), the EMA entry."""

    format: Literal["score_sde", "bare"]
    architecture: Literal["ddpm", "ncsnpp", "adm"]
    model: dict[str, Tensor]
    ema: Mapping[str, Any] | None


def _architecture(keys: list[str]) -> Literal["ddpm", "ncsnpp", "adm"] | None:
    if "input_blocks.0.0.weight" in keys and any(k.startswith("time_embed.") for k in keys):
        return "adm"
    if not any(k.startswith("all_modules.") for k in keys):
        return None
    if "all_modules.0.W" in keys or any(".Conv2d_0." in k or ".Conv_2." in k for k in keys):
        return "ncsnpp"
    return "ddpm"


def read_checkpoint(path: str | os.PathLike, error: type[InputError] = InputError) -> _File:
    """Load a checkpoint file safely (`weights_only`) and say what it holds (`parse_checkpoint`); `error`
    (one line naming the file) otherwise."""
    return parse_checkpoint(load_torch_file(path, error=error), Path(path), error)


def parse_checkpoint(obj: Any, path: Path, error: type[InputError] = InputError) -> _File:
    """What a loaded public-prior file `obj` holds: score_sde's `{'model', 'ema', ...}` (DataParallel's
    `module.` prefix removed), or a bare state dict (guided-diffusion's ADM, or a score_sde network); `error`
    (one line naming `path`) for anything else, a Lightning checkpoint included."""
    if not isinstance(obj, dict):
        raise error(f"{path}: not a score_sde checkpoint or a state dict (a {type(obj).__name__}, expected "
                    "a dict)")
    if "state_dict" in obj and "pytorch-lightning_version" in obj:
        raise error(f"{path}: this is a Lightning checkpoint, not a public prior; resume from it with "
                    "--ckpt_path or convert it with `lfmri export`")
    if isinstance(obj.get("model"), dict):
        fmt, model, ema = "score_sde", obj["model"], obj.get("ema")
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        fmt, model, ema = "bare", obj, None
    else:
        raise error(f"{path}: not a score_sde checkpoint (keys 'model', 'ema') or a bare state dict (found "
                    f"keys {sorted(map(str, obj))[:6]})")
    if model and all(str(k).startswith(_PREFIX) for k in model):
        model = {k[len(_PREFIX):]: v for k, v in model.items()}
    arch = _architecture(list(model))
    if arch is None:
        raise error(f"{path}: the state dict is neither a score_sde DDPM / NCSN++ (all_modules.*) nor a "
                    f"guided-diffusion ADM (input_blocks.*); first keys {list(model)[:3]}")
    if fmt == "bare" and arch != "adm":
        fmt = "score_sde"  # a bare score_sde network state dict: `model` without EMA
    return _File(format=fmt, architecture=arch, model=dict(model), ema=ema if isinstance(ema, dict) else None)


def config_family(config: Mapping[str, Any]) -> Family | None:
    """The family a checkpoint config belongs to, from the config alone (None: it cannot tell): a
    guided-diffusion config (a `diffusion` section, `model.type` 'openai') is dds; an NCSN++ one score_mri;
    a DDPM one with HFS-SDE's data.normalize_* fields hfs_sde, without them score_sde."""
    if isinstance(config.get("diffusion"), Mapping) or _norm(get(config, "model.type", "")) == "openai":
        return FAMILIES["dds"]
    name = _norm(get(config, "model.name", None))
    if name == "ncsnpp":
        return FAMILIES["score_mri"]
    if any(has(config, k) for k in FAMILIES["hfs_sde"].markers):
        return FAMILIES["hfs_sde"]
    if name == "ddpm" or has(config, "model.nf"):
        return FAMILIES["score_sde"]
    return None


def detect_family(file: _File, config: Mapping[str, Any] | None) -> Family:
    """The family of a checkpoint from what it holds and its config (see `load_pretrained`)."""
    if file.architecture == "adm":
        return FAMILIES["dds"]
    if file.architecture == "ncsnpp":
        return FAMILIES["score_mri"]
    found = config_family(config) if config is not None else None
    return found if found is not None and found.architecture == "ddpm" else FAMILIES["score_sde"]


def _check_family(family: Family, file: _File, config: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse (one line) a family that contradicts the file or the config's family markers."""
    names = {"ddpm": "score_sde's DDPM", "ncsnpp": "score_sde's NCSN++", "adm": "a guided-diffusion ADM"}
    if family.architecture != file.architecture:
        detected = detect_family(file, config).name
        raise InputError(f"{path}: family {family.name!r} needs {names[family.architecture]} checkpoint, the "
                         f"file holds {names[file.architecture]} (family {detected!r})")
    if config is not None:
        _check_markers(family, config, str(path))


def _check_markers(family: Family, config: Mapping[str, Any], where: str) -> None:
    """Refuse (one line naming `where`) a config that has another family's marker fields."""
    for other in FAMILIES.values():
        found = [k for k in other.markers if has(config, k)]
        if other is not family and found:
            raise InputError(f"{where}: the config has {found[0]}, a {other.name} field: this is a "
                             f"{other.name} checkpoint (labels {other.label}, output {other.output}), not "
                             f"{family.name}; pass family={other.name!r}")


def check_family_config(family: str, config: Mapping[str, Any] | str | os.PathLike) -> None:
    """Refuse (InputError, one line naming the config) a checkpoint config that is not `family`'s: another
    family's marker fields (HFS-SDE's data.normalize_*), or values the family does not have (e.g. a VE or an
    NCSN++ config for score_sde's DDPM), or missing required keys."""
    fam = FAMILIES[family]
    where = "the config" if isinstance(config, Mapping) else str(config)
    raw = read_config(config)
    _check_markers(fam, raw, where)
    resolve_config(fam, raw, where)


# ----------------------------------------------------------------------------------------------- networks
def _build_network(family: Family, config: Mapping[str, Any], device: str = "meta",
                   grad_checkpointing: bool = False) -> nn.Module:
    """The family's network for a resolved config, on `device` (meta: no storage, weights assigned later;
    cpu: the architecture's own initialisation); `grad_checkpointing` recomputes its blocks' activations in
    the backward pass (fine-tuning the large priors, e.g. DDS's 361M ADM)."""
    g = lambda key: get(config, key)  # noqa: E731
    with torch.device(device):
        if family.architecture == "ddpm":
            # every DDPM field the config has (the required ones are, `resolve_config`); num_groups only in
            # lfmri's own exports (score_sde fixes 32)
            return DDPM(DDPMConfig.from_score_sde(config), grad_checkpointing=grad_checkpointing)
        if family.architecture == "ncsnpp":
            return NCSNpp(nf=g("model.nf"), ch_mult=tuple(g("model.ch_mult")),
                          num_res_blocks=g("model.num_res_blocks"),
                          attn_resolutions=tuple(g("model.attn_resolutions")), dropout=g("model.dropout"),
                          image_size=g("data.image_size"), num_channels=g("data.num_channels"),
                          centered=g("data.centered"), fourier_scale=g("model.fourier_scale"),
                          fir_kernel=tuple(g("model.fir_kernel")), skip_rescale=g("model.skip_rescale"),
                          init_scale=g("model.init_scale"), scale_by_sigma=g("model.scale_by_sigma"),
                          sigma_min=g("model.sigma_min"), sigma_max=g("model.sigma_max"),
                          num_scales=g("model.num_scales"), nonlinearity=g("model.nonlinearity"),
                          grad_checkpointing=grad_checkpointing)
        return ADMUNet(ADMConfig.from_guided_diffusion(config["model"]),
                       grad_checkpointing=grad_checkpointing)


def _build_sde(family: Family, config: Mapping[str, Any]) -> VPSDE | VESDE:
    g = lambda key: get(config, key)  # noqa: E731
    if family.sde == "vp":
        return VPSDE(beta_min=g("model.beta_min"), beta_max=g("model.beta_max"),
                     N=get(config, "model.num_scales", 1000))
    if family.sde == "ve":
        return VESDE(sigma_min=g("model.sigma_min"), sigma_max=g("model.sigma_max"), N=g("model.num_scales"))
    return DiscreteVPSDE(beta_start=g("diffusion.beta_start"), beta_end=g("diffusion.beta_end"),
                         N=g("diffusion.num_diffusion_timesteps"))


def _state(family: Family, file: _File, net: nn.Module, weights: str, path: Path) -> tuple[dict, str]:
    """(the state dict to load into `net`, which weights it holds: 'ema' | 'model' | 'file')."""
    if family.file_format == "bare":
        return dict(net.from_guided_diffusion_state_dict(file.model)), "file"
    expected = net.state_dict()
    missing = [k for k in expected if k not in file.model]
    unexpected = [k for k in file.model if k not in expected]
    head = f"{path}: the checkpoint does not fit the {family.name} config"
    if missing or unexpected:
        first = (f"first missing key '{_PREFIX}{missing[0]}'" if missing
                 else f"first unexpected key '{_PREFIX}{unexpected[0]}'")
        raise InputError(f"{head} ({len(missing)} missing, {len(unexpected)} unexpected): {first}")
    for k, v in expected.items():
        if tuple(file.model[k].shape) != tuple(v.shape):
            raise InputError(f"{head}: '{_PREFIX}{k}' has shape {tuple(file.model[k].shape)} in the "
                             f"checkpoint, {tuple(v.shape)} in the network")
    state = {k: file.model[k] for k in expected}
    if weights == "model":
        return state, "model"
    return with_ema(state, net, file.ema, path), "ema"


def with_ema(state: Mapping[str, Tensor], net: nn.Module, ema: Mapping[str, Any] | None, path: Path,
             error: type[InputError] = InputError) -> dict[str, Tensor]:
    """`state` (net's layout) with score_sde's EMA shadows (`ema['shadow_params']`, one per *trainable*
    parameter in `parameters()` order) in place of those parameters; `error` (one line naming `path`) when
    the file has no EMA or its shadows do not fit."""
    if not isinstance(ema, Mapping) or "shadow_params" not in ema:
        raise error(f"{path}: no EMA weights in the checkpoint; use weights='model'")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shadows = list(ema["shadow_params"])
    if len(shadows) != len(names):
        raise error(f"{path}: the EMA has {len(shadows)} shadow tensors, the network {len(names)} trainable "
                    "parameters")
    state = dict(state)
    for i, (name, s) in enumerate(zip(names, shadows, strict=True)):
        if not isinstance(s, Tensor) or tuple(s.shape) != tuple(state[name].shape):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise error(f"{path}: EMA shadow {i} ('{_PREFIX}{name}') has shape {shape}, the network "
                        f"{tuple(state[name].shape)}")
        state[name] = s
    return state


# ------------------------------------------------------------------------------------------------ the API
@dataclass(eq=False)
class Pretrained:
    """An imported prior: its network, the family's conventions and SDE, and its score.

    Attributes:
        network: the network in eval mode on the CPU, called as `network(x, labels)` with the family's labels
            (score_sde: 999 t; hfs_sde: the VP std; score_mri: sigma(t); dds: float step indices).
        family: the `Family` (conventions). sde: `VPSDE` / `DiscreteVPSDE` / `VESDE` with the config's
            parameters.
        config: the checkpoint's config (nested dicts, family defaults filled in). path: the checkpoint file
            (None: `family_prior`, no file).
        weights: 'ema' or 'model' (score_sde format), 'file' (a bare state dict: the only weights it holds),
            'init' (`family_prior`: the architecture's initialisation).
    """

    network: nn.Module
    family: Family
    sde: VPSDE | VESDE
    config: dict[str, Any]
    path: Path | None
    weights: str

    @property
    def channels(self) -> int:
        """Channels of the network's input (1: a magnitude / real prior, 2: real and imaginary)."""
        if self.family.architecture == "adm":
            return int(get(self.config, "model.in_channels"))
        return int(get(self.config, "data.num_channels"))

    def data_scale(self, kspace: Tensor, noise_sigma: Tensor | None = None) -> Tensor:
        """The factor [B] that takes each slice from lfmri's units to the data range this prior was trained
        on (`Family.data_scale`): ones for 'none'; for 'kspace_std' 1 / (data.normalize_coeff x std(k)),
        the std over the slice's k-space samples (numpy's complex std: sqrt(mean |k - mean k|^2)).

        Args:
            kspace: complex [B, ...] k-space of each slice (centred orthonormal FFT; the clean slice when
                training, the measured `y` at inference).
            noise_sigma: [B] the std of the complex noise per k-space sample in `kspace` (None: noiseless);
                its variance is taken off the measured one, so the factor is the clean slice's.
        """
        ones = torch.ones(kspace.shape[0], dtype=torch.float32, device=kspace.device)
        if self.family.data_scale == "none":
            return ones
        k = kspace.reshape(kspace.shape[0], -1)
        var = (k - k.mean(dim=1, keepdim=True)).abs().square().mean(dim=1).float()
        if noise_sigma is not None:  # the signal's part; a slice of noise alone keeps the measured variance
            clean = var - noise_sigma.to(var).square()
            var = torch.where(clean > 0, clean, var)
        coeff = float(get(self.config, "data.normalize_coeff"))
        return torch.where(var > 0, 1.0 / (coeff * var.clamp_min(1e-30).sqrt()), ones)

    def empty_network(self, device: torch.device | str = "cpu") -> nn.Module:
        """A new network of this prior's architecture and config on `device`, its tensors uninitialised (load
        a state dict into it, e.g. `network.state_dict()`)."""
        return _build_network(self.family, self.config).to_empty(device=device)

    def labels(self, t: Tensor) -> Tensor:
        """The network's time labels [B] for continuous times t [B] in (0, 1], in the family's convention."""
        kind, sde = self.family.label, self.sde
        if kind == "999t":
            return 999.0 * t
        if kind == "vp_std":  # as the original's VPSDE.marginal_prob computes it (float32, not expm1)
            log_mean = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
            return torch.sqrt(1.0 - torch.exp(2.0 * log_mean))
        if kind == "ve_sigma":
            return sde.sigma(t)
        return sde.labels(t)  # 'index': DiscreteVPSDE.labels, round(t (N - 1)) as float

    def score_from_output(self, out: Tensor, t: Tensor) -> Tensor:
        """The score [B, C, H, W] from the network's output (any channels) at times t [B]."""
        if self.family.eps_channels == "input_channels":
            out = out[:, : self.channels]
        if self.family.output == "score":
            return out
        return -out / self.sde.std(t).to(out.dtype)[:, None, None, None]

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Score of the family's SDE, [B, C, H, W], at x [B, C, H, W] and continuous t [B] (or a float).

        C is the network's channel count; with the 'real_imag_separately' rule (score_mri) x may also have
        twice as many channels (real parts, then imaginary parts), each half passed through the prior on its
        own. The network's train / eval mode is left as it is.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).contiguous()
        c = self.channels
        if x.shape[1] == c:
            return self.score_from_output(self.network(x, self.labels(t)), t)
        if self.family.complex_rule == "real_imag_separately" and x.shape[1] == 2 * c:
            b, _, h, w = x.shape
            parts = x.reshape(b * 2, c, h, w)  # [re_0, im_0, re_1, im_1, ...]
            ts = t.repeat_interleave(2)
            return self.score_from_output(self.network(parts, self.labels(ts)), ts).reshape(b, 2 * c, h, w)
        raise ValueError(f"x has {x.shape[1]} channels; the {self.family.name} prior takes {c}"
                         + (f" (or {2 * c}: real and imaginary parts)"
                            if self.family.complex_rule == "real_imag_separately" else ""))

    __call__ = score


def family_prior(family: str, config: Mapping[str, Any] | str | os.PathLike,
                 grad_checkpointing: bool = False) -> Pretrained:
    """A family's prior without a checkpoint: its network for `config` (a mapping, a JSON / YAML file or a
    score_sde-style `.py`), freshly initialised on the CPU in train mode (`grad_checkpointing`: see
    `_build_network`), and its SDE (`Pretrained.path` None, `weights` 'init'). What a model is built from
    before a checkpoint's weights are loaded into it.

    Raises InputError (one line): an unknown family, an unreadable config, conventions that cannot be
    established or that belong to another family.
    """
    if family not in FAMILIES:
        raise InputError(f"unknown checkpoint family {family!r} (known: {', '.join(FAMILIES)})")
    fam = FAMILIES[family]
    where = "the config" if isinstance(config, Mapping) else str(config)
    raw = read_config(config)
    _check_markers(fam, raw, where)
    resolved = resolve_config(fam, raw, where)
    net = _build_network(fam, resolved, device="cpu", grad_checkpointing=grad_checkpointing)
    return Pretrained(network=net.train(), family=fam,
                      sde=_build_sde(fam, resolved), config=resolved, path=None, weights="init")


def load_pretrained(path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None,
                    family: str | None = None, weights: Weights = "ema") -> Pretrained:
    """Import a public diffusion-prior checkpoint with its own conventions.

    Args:
        path: the checkpoint (score_sde-format `checkpoint_*.pth`, or DDS's bare `.pt`).
        config: its config: a mapping, a JSON / YAML file, or a score_sde-style `.py` (read, never run).
            Needed for every family (the architecture is not in the file); default: `config.json` beside the
            file.
        family: 'score_sde' | 'hfs_sde' | 'score_mri' | 'dds'; default: detected (an ADM is dds, an NCSN++
            score_mri, a DDPM hfs_sde when its config has HFS-SDE's data.normalize_* fields, else score_sde).
        weights: 'ema' (the EMA shadows, trainable parameters; the rest from `model`), 'model', or 'family'
            (the weights the family's original code samples with: hfs_sde 'model', others 'ema'). A bare state
            dict holds one set of weights, loaded for either.
    Returns:
        `Pretrained` (network in eval mode on the CPU).
    Raises:
        InputError (one line naming the file and the problem): unreadable file or config, conventions that
            cannot be established (a required config key missing), a family that contradicts the file or its
            config, a state dict that does not fit the config, a requested EMA that the file lacks.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise InputError(f"unknown checkpoint family {family!r} (known: {', '.join(FAMILIES)})")
    if weights not in ("ema", "model", "family"):
        raise InputError(f"weights must be 'ema', 'model' or 'family', got {weights!r}")
    file = read_checkpoint(path)
    if config is None:
        beside = path.with_name("config.json")
        if not beside.is_file():
            raise InputError(f"{path}: cannot establish its conventions without its config (pass config=, "
                             "e.g. the run's config.json / .py / .yml)")
        config = beside
    where = str(config) if not isinstance(config, Mapping) else f"{path} (config)"
    raw = read_config(config)
    fam = FAMILIES[family] if family is not None else detect_family(file, raw)
    _check_family(fam, file, raw, path)
    resolved = resolve_config(fam, raw, where)
    if weights == "family":
        weights = fam.default_weights
    net = _build_network(fam, resolved)
    try:
        state, source = _state(fam, file, net, weights, path)
        net.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    except (KeyError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"{path}: the checkpoint does not fit the {fam.name} config {where} "
                         f"({reason})") from err
    return Pretrained(network=net.eval(), family=fam, sde=_build_sde(fam, resolved), config=resolved,
                      path=path, weights=source)
