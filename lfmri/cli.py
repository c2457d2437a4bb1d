"""The `lfmri` command: LightningCLI (fit / validate / test / predict) plus lfmri's own subcommands.

Our own subcommands are plain argparse programs in `lfmri.commands.<name>`; each module defines
`register(subparsers)` (adding its parser with `set_defaults(func=run)`) and `run(args) -> int`.
Bad user input raises `lfmri_utils.errors.InputError` (a `ValueError`): it is printed as one line on stderr
and the exit code is 2, with no traceback. A `fit` stopped by SIGINT / SIGTERM in its training loop saves a
resumable checkpoint, prints one line naming it and exits with 128 + the signal number (130, 143); in any
other phase of fit / validate / test / predict (imports, set-up, the loop of the other three, a second Ctrl-C)
the signal stops the command at once (`StopOnSignal`): one line, nothing saved on the way out, the same exit
code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from types import FrameType, TracebackType

from lfmri_utils.errors import InputError

#: our own subcommands, each implemented by the module `lfmri.commands.<name>`
COMMANDS: tuple[str, ...] = ("degrade", "preview", "metrics", "export", "reconstruct", "evaluate")
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: lfmri COMMAND [options]    (lfmri COMMAND --help for a command's options)

training and inference (LightningCLI: --config YAML, dotted overrides, --print_config):
  fit          train or fine-tune a score model
  validate     run validation (losses, sampler metrics per regime)
  test         run the test loop
  predict      reconstruct the data module's predict.path
lfmri's own commands:
  degrade      simulate a low-field acquisition of a NIfTI volume
  preview      picture of clean slices and their four degradation regimes
  metrics      fastMRI SSIM / PSNR / NMSE of two NIfTI volumes
  export       Lightning checkpoint -> score_sde checkpoint
  reconstruct  reconstruct a low-field NIfTI volume with a trained model
  evaluate     the paper's protocol on held-out subjects, with baselines"""


class Interrupted(BaseException):
    """SIGINT / SIGTERM outside `InterruptCheckpoint`'s watch (raised by `StopOnSignal`). A BaseException, as
    KeyboardInterrupt, so no `except Exception` swallows it, but not KeyboardInterrupt, which Lightning turns
    into its own shutdown and exit code 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class StopOnSignal:
    """Context manager: inside it SIGINT and SIGTERM raise `Interrupted` in the main thread (a further signal,
    while the command stops, exits at once with 128 + its number); the previous handlers come back on exit.
    Lightning and `InterruptCheckpoint` put their own handlers in front while they run and hand back to these.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.raised = False
        self.previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:  # os.write, not print: sys.stderr may be in the middle of a write
            os.write(2, f"\nlfmri: {signal.Signals(signum).name} again; stopped at once\n".encode())
            os._exit(128 + signum)
        self.raised = True
        raise Interrupted(signum)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


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


def run_lightning(command: str, argv: list[str] | None) -> int:
    """Run a LightningCLI subcommand (`argv` None: `sys.argv`); the exit code of its outcome."""
    from lfmri.lightning_cli import run_lightning_cli
    from lightning_modules.callbacks import NonFiniteLossError, TrainingInterrupted

    try:
        run_lightning_cli(argv)
    except InputError as err:  # a bad config, data / checkpoint path or output folder, before any work
        print(f"lfmri {command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the run stopped itself; its last good checkpoint is kept
        print(f"lfmri {command}: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # SIGINT / SIGTERM: a resumable checkpoint was written
        print(f"lfmri {command}: {err}", file=sys.stderr)
        return 128 + err.signum
    return 0


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
        with StopOnSignal():
            try:
                return run_lightning(argv[0], None if from_sys else argv)
            except Interrupted as stop:  # imports, set-up, or a loop without InterruptCheckpoint's watch
                print(f"lfmri {argv[0]}: interrupted by {stop}; stopped at once, nothing saved on the way "
                      "out", file=sys.stderr)
                return 128 + stop.signum
    print(f"lfmri: error: unknown command {argv[0]!r}; choose from "
          f"{', '.join(LIGHTNING_SUBCOMMANDS + COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
