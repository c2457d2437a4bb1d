"""`lfmri export --ckpt C OUT.pth [--weights ema|model] [--config-out OUT.json]`.

Converts a Lightning checkpoint of `lightning_modules.module.ScoreModel` into score_sde's checkpoint format
(`model` / `ema` / `optimizer` / `step`, keys with `module.`), plus the network's score_sde config JSON, so
score_sde, score-MRI or `lightning_modules.checkpoint.load_score_sde_checkpoint` can load the fine-tuned net.

`--weights ema` (default) writes the EMA weights into both `model` and `ema` (whatever a consumer reads, it
gets the weights lfmri validates and samples with); `--weights model` writes the raw training weights into
`model` and the EMA into `ema`, as score_sde's own training saves them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.errors import InputError
from lfmri.evaluation import read_lightning_checkpoint, score_model_from_checkpoint
from lightning_modules.checkpoint import export_score_sde_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser("export", help="Lightning checkpoint -> score_sde checkpoint",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of a ScoreModel")
    p.add_argument("out", help="output score_sde checkpoint (.pth)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="weights written into `model` (default: ema)")
    p.add_argument("--config-out", default=None,
                   help="where to write the score_sde config JSON (default: OUT with suffix .json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export; prints the written paths."""
    ckpt = read_lightning_checkpoint(args.ckpt)
    model, step = score_model_from_checkpoint(ckpt, args.ckpt), int(ckpt.get("global_step", 0))
    out = Path(args.out)
    config_out = Path(args.config_out) if args.config_out else out.with_suffix(".json")
    if out.resolve() == Path(args.ckpt).resolve():
        raise InputError(f"{out}: the export would overwrite the Lightning checkpoint it reads")
    if config_out.resolve() in (out.resolve(), Path(args.ckpt).resolve()):
        raise InputError(f"{config_out}: the config JSON would overwrite a checkpoint (choose --config-out)")
    ema = model.ema
    if args.weights == "ema":
        net = model.frozen_net(use_ema=True)
        shadows = list(net.parameters())
    else:
        net, shadows = model.net, ema.shadow_params
    export_score_sde_checkpoint(net, out, ema_params=shadows, step=step, ema_decay=ema.decay,
                                ema_num_updates=ema.num_updates, config_path=config_out)
    print(f"wrote {out} ({args.weights} weights in 'model', step {step}) and its config {config_out}")
    return 0
