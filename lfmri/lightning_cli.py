"""LightningCLI wiring: `lfmri fit|validate|test|predict --config configs/….yaml`.

Models and data modules are given as `class_path` + `init_args` (class swapping), YAML may use OmegaConf
interpolation, and `config.yaml` is written into the run's log directory (overwritten on resume).
W&B runs offline unless an API key is configured, so `--trainer.logger=WandbLogger` never blocks on a login.
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI


class LfmriCLI(LightningCLI):
    """LightningCLI with lfmri's defaults: OmegaConf YAML, subclass mode, config saved per run."""


def _default_wandb_mode() -> None:
    """Run W&B offline unless the user configured it (`WANDB_MODE` or an API key)."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def run_lightning_cli(args: ArgsType = None, run: bool = True) -> LfmriCLI:
    """Build (and by default run) the CLI; `args` as `sys.argv[1:]`."""
    _default_wandb_mode()
    import datamodules  # noqa: F401  (registers the data module classes for class_path shorthand)
    import lightning_modules  # noqa: F401

    return LfmriCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
