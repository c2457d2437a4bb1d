"""The `lfmri` command: LightningCLI (fit / validate / test / predict) plus lfmri's own subcommands.

Our own subcommands are plain argparse programs in `lfmri.commands.<name>`; each module defines
`register(subparsers)` (adding its parser with `set_defaults(func=run)`) and `run(args) -> int`.
Bad user input raises `lfmri_utils.errors.InputError` (a `ValueError`): it is printed as one line on stderr
and the exit code is 2, with no traceback. A `fit` stopped by SIGINT / SIGTERM saves a resumable checkpoint,
prints one line naming it and exits with 128 + the signal number (130, 143).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lfmri_utils.errors import InputError

#: our own subcommands, each implemented by the module `lfmri.commands.<name>`
COMMANDS: tuple[str, ...] = ("degrade", "preview", "metrics", "export", "reconstruct", "evaluate")
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: lfmri COMMAND [options]    (lfmri COMMAND --help for a command's options)

training and inference (LightningCLI: --config YAML, dotted overrides, --print_config):
  fit          train or fine-tune a score model
  validate     run validation (losses, sampler metrics per regime)
  test         run the test loop
  predict      reconstruct the data module's predict_path
lfmri's own commands:
  degrade      simulate a low-field acquisition of a NIfTI volume
  preview      picture of clean slices and their four degradation regimes
  metrics      fastMRI SSIM / PSNR / NMSE of two NIfTI volumes
  export       Lightning checkpoint -> score_sde checkpoint
  reconstruct  reconstruct a low-field NIfTI volume with a trained model
  evaluate     the paper's protocol on held-out subjects, with baselines"""


def _custom_parser(names: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser holding the subcommands `names` (only their modules are imported: start-up stays fast)."""
    parser = argparse.ArgumentParser(prog="lfmri", description="lfmri's own subcommands.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in names:
        importlib.import_module(f"lfmri.commands.{name}").register(sub)
    return parser


def run_custom(argv: list[str]) -> int:
    """Run one of lfmri's own subcommands; bad input -> one line on stderr and exit code 2."""
    args = _custom_parser((argv[0],)).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, OSError) as err:  # bad input, or an output path that cannot be written
        print(f"lfmri {args.command}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lfmri` console script."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return run_custom(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in LIGHTNING_SUBCOMMANDS:
        from lfmri.lightning_cli import run_lightning_cli
        from lightning_modules.callbacks import NonFiniteLossError, TrainingInterrupted

        try:
            run_lightning_cli(None if from_sys else argv)
        except InputError as err:  # bad data / checkpoint paths found while the run is set up
            print(f"lfmri {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        except NonFiniteLossError as err:  # the run stopped itself; its last good checkpoint is kept
            print(f"lfmri {argv[0]}: stopped: {err}", file=sys.stderr)
            return 1
        except TrainingInterrupted as err:  # SIGINT / SIGTERM: a resumable checkpoint was written
            print(f"lfmri {argv[0]}: {err}", file=sys.stderr)
            return 128 + err.signum
        return 0
    print(f"lfmri: error: unknown command {argv[0]!r}; choose from "
          f"{', '.join(LIGHTNING_SUBCOMMANDS + COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
