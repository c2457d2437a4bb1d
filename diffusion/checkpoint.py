"""Import and export of score_sde / score-MRI checkpoints.

The format (what score_sde's `save_checkpoint` writes): a dict with
- `model`: the DDPM state dict under `torch.nn.DataParallel` (keys `module.sigmas`, `module.all_modules...`);
- `ema`: `{'decay', 'num_updates', 'shadow_params'}`, `shadow_params` a list in `parameters()` order;
- `optimizer`: an Adam state dict; `step`: an int.
The architecture is not stored; it comes from the run's config (`config.json`-style nested dict:
`{'model': {nf, ch_mult, ...}, 'data': {image_size, num_channels, centered}}`).

Channel adaptation (`adapt_channels`), only the first and the last conv change:
- 2 -> 1 (a complex real/imag model on real images): keep the real-channel input weights and the real-channel
  output weights and bias. A 1-channel image m is then the complex image (m, 0), so exactly
  `net1(m) == net2([m, 0])[:, :1]`.
- 1 -> 2 (a magnitude model on complex data): each input channel gets half the input weights and the output
  weights and bias are duplicated, so on images with equal parts exactly `net2([m, m]) == [net1(m), net1(m)]`.
Both are exact embeddings of one network's behaviour in the other's domain; fine-tuning adapts the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffusion.networks.ddpm import DDPM, REQUIRED_FIELDS, DDPMConfig, score_sde_key
from diffusion.networks.families import detect_family, has, parse_checkpoint, with_ema
from diffusion.sampling.sde import VPSDE
from diffusion.torch_files import CheckpointError, is_torch_file, load_torch_file  # noqa: F401 (re-exported)
from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_input_file

_PREFIX = "module."


#: checkpoints shipped with lfmri, by short name: `--ckpt reference-small` (reconstruct, evaluate, export) and
#: `model.init_args.pretrained.path: reference-small` (fine-tune). A short name wins over a file of the same
#: name.
SHIPPED_CHECKPOINTS: dict[str, Path] = {
    "reference-small": Path(__file__).parent / "pretrained" / "reference_small.ckpt",
    # the first reference prior (inside crops, the supervised term sharing the score's output; an older
    # checkpoint layout): kept for comparison (experiments/RESULTS.md, issue 21)
    "reference-small-v1": Path(__file__).parent / "pretrained" / "reference_small_v1.ckpt",
}


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """The file of a shipped checkpoint's short name (InputError if the install lacks it); any other value is
    a path, returned unchanged."""
    path = SHIPPED_CHECKPOINTS.get(str(name))
    if path is None:
        return Path(name)
    if not path.is_file():
        raise InputError(f"{name}: the shipped checkpoint {path} is missing from this installation "
                         "(reinstall lfmri from a full clone)")
    return path


def read_ddpm_config(config: Mapping | str | os.PathLike) -> DDPMConfig:
    """The DDPM configuration of a score_sde config in the nested layout (a dict or a JSON file path;
    `DDPMConfig.from_score_sde`). The `ddpm.REQUIRED_FIELDS` (nf, ch_mult, num_res_blocks, attn_resolutions,
    image_size, num_channels, centered) must be there; the others default to score_sde's defaults.
    CheckpointError (one line naming the file) for anything else.
    """
    where = "the score_sde config"
    if not isinstance(config, Mapping):
        path = check_input_file(config, "", "score_sde config file", CheckpointError)
        where = f"{path}: the score_sde config"
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read the score_sde config JSON "
                                  f"({type(err).__name__}: {' '.join(str(err).split())})") from None
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{where} is a JSON {type(config).__name__}, expected an object with "
                                  "'model' and 'data' sections")
    sections = {key: config.get(key, {}) for key in ("model", "data")}
    bad = [key for key, value in sections.items() if not isinstance(value, Mapping)]
    if bad:
        raise CheckpointError(f"{where}: section {bad[0]!r} must be a mapping")
    if sections["model"].get("name", "ddpm") != "ddpm":
        raise CheckpointError(f"{where}: model.name is {sections['model']['name']!r}; lfmri loads 'ddpm' "
                              "networks only")
    missing = [k for k in REQUIRED_FIELDS if not has(sections, score_sde_key(k))]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)} (nested layout: 'model', 'data' sections)")
    try:
        return DDPMConfig.from_score_sde(sections)
    except (InputError, TypeError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """(model state dict without the DataParallel prefix, ema state or None) of a score_sde DDPM checkpoint
    (`families.parse_checkpoint`), or of an lfmri `ScoreModel` Lightning checkpoint (its `net.*` weights and
    EMA state, same layouts). Another family's network (NCSN++, ADM) is refused, naming the family option."""
    obj = load_torch_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj:
        net = {k[len("net."):]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
        if not net:
            raise CheckpointError(f"{path}: a Lightning checkpoint without a ScoreModel network ('net.*' "
                                  "weights)")
        return net, obj.get("ema")
    file = parse_checkpoint(obj, Path(path), CheckpointError)
    if file.architecture != "ddpm":
        family = detect_family(file, None).name
        raise CheckpointError(f"{path}: not score_sde's DDPM but {family}'s network; set "
                              f"pretrained.family={family} (with pretrained.config, its config)")
    return file.model, file.ema


def _check_fit(path: str | os.PathLike, expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> None:
    """Raise CheckpointError on the first missing key, unexpected key or shape mismatch, in module order."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    head = f"{path}: checkpoint does not fit the DDPM config"
    counts = f"({len(missing)} missing, {len(unexpected)} unexpected)"
    if missing:
        raise CheckpointError(f"{head} {counts}: first missing key '{_PREFIX}{missing[0]}'")
    if unexpected:
        raise CheckpointError(f"{head} {counts}: first unexpected key '{_PREFIX}{unexpected[0]}'")
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{head}: '{_PREFIX}{k}' has shape {tuple(found[k].shape)} in the "
                                  f"checkpoint, {tuple(v.shape)} in the network")


def _adapted(state: dict[str, Tensor], net: DDPM, channels: int) -> dict[str, Tensor]:
    """`state` with the first and last conv adapted from net.num_channels to `channels` (see module doc)."""
    first = "all_modules.2" if net.conditional else "all_modules.0"
    last = f"all_modules.{len(net.all_modules) - 1}"
    state = dict(state)
    w_in, w_out, b_out = state[f"{first}.weight"], state[f"{last}.weight"], state[f"{last}.bias"]
    if (net.num_channels, channels) == (2, 1):
        w_in, w_out, b_out = w_in[:, :1], w_out[:1], b_out[:1]
    elif (net.num_channels, channels) == (1, 2):
        w_in, w_out, b_out = torch.cat([w_in / 2] * 2, dim=1), torch.cat([w_out] * 2), torch.cat([b_out] * 2)
    else:
        raise CheckpointError(f"channel adaptation {net.num_channels} -> {channels} is not supported "
                              "(1 <-> 2 only)")
    state[f"{first}.weight"], state[f"{last}.weight"], state[f"{last}.bias"] = w_in, w_out, b_out
    return state


def load_score_sde_checkpoint(path: str | os.PathLike, model_config: Mapping | str | os.PathLike,
                              weights: Literal["ema", "model"] = "ema",
                              adapt_channels: int | None = None) -> DDPM:
    """Load a score_sde-format checkpoint strictly into a new DDPM in eval mode (on the CPU).

    Args:
        path: the `checkpoint_*.pth` file.
        model_config: the run's config, nested layout `{'model': {...}, 'data': {...}}` (dict or JSON path).
        weights: 'ema' (the EMA shadow parameters, what score_sde samples with) or 'model' (the raw weights).
        adapt_channels: if given and different from the config's `data.num_channels`, adapt the first and last
            conv to this many channels (1 <-> 2, rule in the module docstring).
    Raises:
        CheckpointError: unreadable file, not a score_sde checkpoint, or the first missing / unexpected key or
            shape mismatch (with both shapes).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    config = read_ddpm_config(model_config)
    path = resolve_checkpoint(path)
    model_state, ema = _read(path)
    with torch.device("meta"):
        net = DDPM(config)
    expected = net.state_dict()
    _check_fit(path, expected, model_state)
    state = {k: model_state[k] for k in expected}
    if weights == "ema":
        state = with_ema(state, net, ema, path, CheckpointError)
    if adapt_channels is not None and adapt_channels != net.num_channels:
        state = _adapted(state, net, adapt_channels)
        with torch.device("meta"):
            net = DDPM(dataclasses.replace(config, num_channels=adapt_channels))
    net.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return net.eval()


def export_score_sde_checkpoint(net: nn.Module, path: str | os.PathLike,
                                ema_params: Sequence[Tensor] | None = None, step: int = 0,
                                ema_decay: float = 0.9999, ema_num_updates: int | None = None,
                                config_path: str | os.PathLike | None = None, sde: VPSDE | None = None,
                                lr: float = 2e-4, config: Mapping[str, Any] | None = None,
                                trainable: Sequence[str] | None = None) -> None:
    """Write `net` as a score_sde checkpoint (atomically: a temporary file, then os.replace).

    `model` holds net's state dict with the `module.` prefix (including buffers such as `module.sigmas` and
    non-trainable parameters such as NCSN++'s Fourier `W`); `ema` holds `ema_params` (one tensor per
    trainable parameter, in parameters() order; default: net's) with `ema_decay` and `ema_num_updates`
    (default: step); `optimizer` is a fresh Adam state dict over the trainable parameters (no moments) with
    learning rate `lr`, so score_sde can resume from it; `step` is `step`. `trainable`: the names of the
    trainable parameters (default: those of `net` that require gradients; give them for a frozen copy).
    With `config_path`, also write the config JSON: `config` (a checkpoint family's resolved config, e.g.
    HFS-SDE's or score-MRI's) with `optim.lr` set to `lr`; by default score_sde's DDPM config of `net`
    (nested layout; `load_score_sde_checkpoint` takes it as `model_config`): the network and data fields,
    the SDE (`training.sde` 'vpsde', `training.continuous`, `model.beta_min` / `beta_max` of `sde`, default
    `VPSDE()`) and `optim` (Adam, `lr`).
    """
    named = dict(net.named_parameters())
    names = list(trainable) if trainable is not None else [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    shadows = list(ema_params) if ema_params is not None else params
    if len(shadows) != len(params):
        raise ValueError(f"ema_params has {len(shadows)} tensors, the network {len(params)} trainable "
                         "parameters")
    for i, (s, p) in enumerate(zip(shadows, params, strict=True)):
        if s.shape != p.shape:
            raise ValueError(f"ema_params[{i}] has shape {tuple(s.shape)}, the parameter {tuple(p.shape)}")
    blob = {
        "model": {_PREFIX + k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "ema": {"decay": float(ema_decay),
                "num_updates": int(step if ema_num_updates is None else ema_num_updates),
                "shadow_params": [s.detach().cpu().clone() for s in shadows]},
        "optimizer": torch.optim.Adam([p.detach().clone().requires_grad_() for p in params],
                                      lr=float(lr)).state_dict(),
        "step": int(step),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    if config_path is not None:
        if config is None:
            sde = sde or VPSDE()
            config = net.config.score_sde_config()
            config["model"].update(beta_min=float(sde.beta_min), beta_max=float(sde.beta_max))
            config["training"] = {"sde": "vpsde", "continuous": True}
            config["optim"] = {"optimizer": "Adam", "lr": float(lr)}
        else:
            config = json.loads(json.dumps(config))
            config.setdefault("optim", {})["lr"] = float(lr)
        write_config_json(config, config_path)


def write_config_json(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint's config as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=1) + "\n")


def export_guided_diffusion_checkpoint(net: nn.Module, path: str | os.PathLike,
                                       config: Mapping[str, Any] | None = None,
                                       config_path: str | os.PathLike | None = None) -> None:
    """Write an `networks.adm.ADMUNet` as guided-diffusion's bare `UNetModel` state dict (DDS's format:
    `net.guided_diffusion_state_dict()`), atomically; with `config_path`, its config (DDS's `model` /
    `diffusion` sections) as JSON."""
    with atomic_path(path) as tmp:
        torch.save(net.guided_diffusion_state_dict(), tmp)
    if config_path is not None:
        write_config_json(config or {}, config_path)
