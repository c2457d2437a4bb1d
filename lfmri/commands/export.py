"""`lfmri export --ckpt C OUT.pth [--weights ema|model] [--config-out OUT.json] [--force]`.

Converts a Lightning checkpoint of `lightning_modules.module.ScoreModel` into score_sde's checkpoint format
(`model` / `ema` / `optimizer` / `step`, keys with `module.`), plus the network's score_sde config JSON, so
score_sde, score-MRI or `diffusion.checkpoint.load_score_sde_checkpoint` can load the fine-tuned net.

`--weights ema` (default) writes the EMA weights into both `model` and `ema` (whatever a consumer reads, it
gets the weights lfmri validates and samples with); `--weights model` writes the raw training weights into
`model` and the EMA into `ema`, as score_sde's own training saves them.

The config JSON carries what score_sde's own code needs to run the file correctly: the network, the data
fields, the SDE (`training.sde: vpsde`, `training.continuous`, `model.beta_min` / `beta_max`) and the
learning rate (`optim.lr`, also the exported Adam state's). score_sde's DDPM hard-codes 32 GroupNorm groups:
a network with another `num_groups` (the quickstart's and the reference prior's 8) would run wrong there
without an error, so it is refused unless `--force` (lfmri itself reads `num_groups` from the JSON and loads
such a file exactly). A fine-tune of a checkpoint family (`pretrained.family`) is written in that family's
own format with its resolved config: score_sde's dict for score_sde, hfs_sde and score_mri, guided-diffusion's
bare state dict for dds (`diffusion.load_pretrained(OUT, config=OUT.json, family=...)` reads it back;
`--weights` picks the weights of DDS's single set).

OUT must end with .pth or .pt and the config with .json; an existing file is replaced only when it is of the
same kind (a PyTorch checkpoint, a JSON file), so a mistyped name never overwrites a NIfTI volume or a YAML
config. Both are checked before the checkpoint is read; a `--ckpt` path that names no file is refused before
torch is imported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfmri.commands.sampler_options import check_checkpoint_argument
from lfmri_utils.errors import InputError
from lfmri_utils.files import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser("export", help="Lightning checkpoint -> score_sde checkpoint",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True,
                   help="Lightning checkpoint (.ckpt) of a ScoreModel, or reference-small")
    p.add_argument("out", help="output score_sde checkpoint (.pth or .pt)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="weights written into `model` (default: ema)")
    p.add_argument("--config-out", default=None,
                   help="where to write the score_sde config JSON (default: OUT with suffix .json)")
    p.add_argument("--force", action="store_true",
                   help="write a network score_sde's own code cannot run (num_groups != 32): for lfmri only")
    p.set_defaults(func=run)


#: GroupNorm groups of score_sde's DDPM (fixed in its code)
SCORE_SDE_GROUPS = 32
#: suffixes of the exported score_sde checkpoint
CHECKPOINT_SUFFIXES = (".pth", ".pt")


def _is_json_file(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _check_outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(OUT, config JSON) checked before any work: suffixes, writable folders, not the input, and an existing
    file replaced only when it is of the same kind."""
    out = Path(args.out)
    config_out = Path(args.config_out) if args.config_out else out.with_suffix(".json")
    check_output_file(out, "OUT", CHECKPOINT_SUFFIXES)
    check_output_file(config_out, "--config-out", (".json",))
    if out.resolve() == Path(args.ckpt).resolve():
        raise InputError(f"{out}: the export would overwrite the Lightning checkpoint it reads")
    if config_out.resolve() in (out.resolve(), Path(args.ckpt).resolve()):
        raise InputError(f"{config_out}: the config JSON would overwrite a checkpoint (choose --config-out)")
    if out.is_file():
        from diffusion.checkpoint import is_torch_file  # imports torch: only for an existing OUT

        if not is_torch_file(out):
            raise InputError(f"OUT {out}: exists and is not a PyTorch checkpoint; not replaced (remove it or "
                             "choose another name)")
    if config_out.is_file() and not _is_json_file(config_out):
        raise InputError(f"--config-out {config_out}: exists and is not a JSON file; not replaced (remove it "
                         "or choose another name with --config-out)")
    return out, config_out


def run(args: argparse.Namespace) -> int:
    """Export; prints the written paths. A family fine-tune goes in that family's own format with its resolved
    config (what `diffusion.load_pretrained(OUT, OUT.json)` reads back): score_sde's dict for
    score_sde, hfs_sde and score_mri (EMA shadows over the trainable parameters: NCSN++'s Fourier `W` only in
    `model`), guided-diffusion's bare state dict for dds (one set of weights: `--weights`)."""
    out, config_out = _check_outputs(args)
    check_checkpoint_argument(args.ckpt)
    from diffusion.checkpoint import export_guided_diffusion_checkpoint, export_score_sde_checkpoint
    from lfmri.models import read_lightning_checkpoint, score_model_from_checkpoint

    ckpt = read_lightning_checkpoint(args.ckpt)
    model, step = score_model_from_checkpoint(ckpt, args.ckpt), int(ckpt.get("global_step", 0))
    family = model.prior.family if model.prior is not None else None
    groups = None if family is not None else model.net.config.num_groups
    if groups not in (None, SCORE_SDE_GROUPS) and not args.force:
        raise InputError(f"--ckpt {args.ckpt}: the network has num_groups = {groups}; "
                         f"score_sde's DDPM hard-codes {SCORE_SDE_GROUPS} and would run it wrong without an "
                         "error (lfmri reads num_groups from the config JSON): --force to write it for lfmri")
    net = model.frozen_net(use_ema=args.weights == "ema")
    config = model.prior.config if family is not None else None  # None: score_sde's DDPM config of the net
    if family is not None and family.file_format == "bare":
        export_guided_diffusion_checkpoint(net, out, config, config_out)
        print(f"wrote {out} ({family.name}: guided-diffusion state dict, {args.weights} weights, step "
              f"{step}) and its config {config_out}")
        return 0
    ema = model.ema  # the EMA shadows: `net` itself with --weights ema (the default of ema_params)
    export_score_sde_checkpoint(net, out, ema_params=None if args.weights == "ema" else ema.shadow_params,
                                step=step, ema_decay=ema.decay, ema_num_updates=ema.num_updates,
                                config_path=config_out, sde=model.sde, lr=float(model.optim_config.lr),
                                config=config,
                                trainable=[n for n, p in model.net.named_parameters() if p.requires_grad])
    kind = f"{family.name}: score_sde format, " if family is not None else ""
    print(f"wrote {out} ({kind}{args.weights} weights in 'model', step {step}) and its config {config_out}")
    return 0
