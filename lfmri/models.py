"""Reading lfmri's own (Lightning) `ScoreModel` checkpoints (shipped ones by short name); the device choice.

Shared by `lfmri reconstruct`, `lfmri evaluate`, `lfmri export` and `--ckpt_path`. A checkpoint argument is a
path or the short name of a checkpoint shipped with lfmri (`diffusion.checkpoint.SHIPPED_CHECKPOINTS`,
e.g. `reference-small`). `slim_checkpoint` makes such a shipped file: the EMA weights only.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from diffusion.checkpoint import load_torch_file, resolve_checkpoint
from lfmri_utils.errors import InputError
from lightning_modules.module import ScoreModel, upgrade_hparams


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cpu` / `cuda` (InputError when CUDA is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device: unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return torch.device(name)


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """The dict of an lfmri `ScoreModel` Lightning checkpoint (a path or a shipped short name), read once on
    the CPU.

    Raises InputError (one line naming the file) for a missing file or anything that is not one of our
    checkpoints (e.g. a score_sde checkpoint, which is imported through `model.pretrained.path` instead).
    """
    path = resolve_checkpoint(path)
    # weights_only: unpickling arbitrary objects would run a crafted file's code; one-line reasons naming the
    # file (missing, a folder, a text file, refused objects, damaged)
    ckpt = load_torch_file(path, error=InputError)
    if isinstance(ckpt, dict) and {"model", "ema"} <= set(ckpt):
        raise InputError(f"{path}: a score_sde checkpoint, not an lfmri (Lightning) one; fine-tune from it "
                         "(model.init_args.pretrained.path in a config) and pass the Lightning checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    if "ema" not in ckpt or not any(k.startswith("net.") for k in ckpt["state_dict"]):
        raise InputError(f"{path}: not a ScoreModel checkpoint (no 'ema' or no 'net.*' weights)")
    return ckpt


def score_model_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> ScoreModel:
    """A `ScoreModel` (CPU) with the weights and EMA of a checkpoint dict from `read_lightning_checkpoint`
    (hyper-parameters of older checkpoints upgraded: `module.upgrade_hparams`)."""
    accepted = inspect.signature(ScoreModel.__init__).parameters
    hparams = {k: v for k, v in upgrade_hparams(ckpt.get("hyper_parameters", {})).items() if k in accepted}
    try:
        model = ScoreModel(**hparams)
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        # all of torch's lines: its first one ("Error(s) in loading state_dict for ...:") holds no reason
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = reason if len(reason) <= 400 else reason[:400] + " ..."
        raise InputError(f"{path}: checkpoint does not fit its ScoreModel hyperparameters ({reason})",
                         ) from None
    return model


def load_score_model(path: str | os.PathLike, device: torch.device) -> ScoreModel:
    """Load an lfmri `ScoreModel` Lightning checkpoint (a path or a shipped short name) onto `device` (eval
    mode; samplers use its EMA); reconstruction needs a 2-channel (real, imaginary) network. Bad files ->
    InputError."""
    model = score_model_from_checkpoint(read_lightning_checkpoint(path), path)
    # (a family's prior: its constructor already refused one that cannot take the 2-channel layout)
    if model.prior is None and model.net.config.num_channels != 2:
        raise InputError(f"--ckpt {path}: the network has {model.net.config.num_channels} channel(s); "
                         "reconstruction needs a 2-channel (real, imaginary) model")
    return model.to(device).eval()


def slim_checkpoint(path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> dict:
    """A `ScoreModel` Lightning checkpoint reduced to what reconstruction and fine-tuning read.

    The network's weights are replaced by its EMA weights (what the samplers use), and the EMA state holds the
    same tensors, so `torch.save` stores them once; the optimiser, scheduler, loops and callbacks' states are
    dropped (such a file cannot resume a run: fine-tune from it instead, `model.init_args.pretrained.path`).
    `provenance` (recipe, command, wall time, ...) is kept under the key `lfmri`.
    """
    ckpt = read_lightning_checkpoint(path)
    model = score_model_from_checkpoint(ckpt, path)
    model.ema.copy_to(model.net.parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shadows = [state[f"net.{name}"] for name, _ in model.net.named_parameters()]
    hparams = upgrade_hparams(ckpt.get("hyper_parameters", {}))
    if hparams.get("pretrained") is not None:  # the weights are in the file; a family's config is kept
        hparams["pretrained"] = {**hparams["pretrained"], "path": None}
    return {"pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
            "global_step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
            "state_dict": state, "hyper_parameters": hparams,
            "ema": {"decay": model.ema.decay, "num_updates": model.ema.num_updates, "shadow_params": shadows},
            "lfmri": dict(provenance or {})}
