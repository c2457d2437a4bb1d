"""The options shared by lfmri's model commands: the sampler options of `lfmri reconstruct` and
`lfmri evaluate` (`--sampling.<field>`, generated from `SamplerOptions`' fields, declared torch-free by
`options.SamplerOptionFields`: the names of `lfmri predict --sampling.*` and of the validation callback's
`sampling.*`) and the `--ckpt` check of those two and `lfmri export`.

Nothing here imports torch until a sampler is built: the commands check their arguments first, so a missing
file is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion.sampling.options import FORMER_SPELLINGS, SamplerOptionFields
from lfmri_utils.errors import InputError
from lfmri_utils.files import check_input_file

if TYPE_CHECKING:  # the CLI builds its parsers without importing torch
    from diffusion.sampling.samplers import Sampler
    from diffusion.sampling.sde import SDE


class _DeprecatedAlias(argparse.Action):
    """A former spelling of a sampler option (`--dc-lambda`): stores into the same destination and notes on
    stderr, in one line, the spelling that replaces it."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "",
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _argparse_type(annotation: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """(type, choices) of an argparse option for a `SamplerOptions` field typed `T | None` (`T`: str, int,
    float or a `Literal` of strings)."""
    (kind,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return str, typing.get_args(kind)
    return kind, None


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """`--sampling.<field>` for each field of `SamplerOptions` (declared torch-free by `SamplerOptionFields`:
    its type, its default None for the registry's, its help text); the destination is the field's name. The
    former spellings (`--dc-lambda`, `--t0-ratio`, ...; `FORMER_SPELLINGS`) stay as hidden deprecated
    aliases."""
    group = p.add_argument_group("sampler options (as `lfmri predict --sampling.*`; unset: the registry's "
                                 "defaults)")
    hints = typing.get_type_hints(SamplerOptionFields)
    for option in dataclasses.fields(SamplerOptionFields):
        kind, choices = _argparse_type(hints[option.name])
        spelling = f"--sampling.{option.name}"
        group.add_argument(spelling, dest=option.name, type=kind, choices=choices, default=option.default,
                           metavar=option.name.upper() if choices is None else None,
                           help=option.metadata["help"])
        if option.name in FORMER_SPELLINGS:
            group.add_argument(f"--{option.name.replace('_', '-')}", dest=option.name, type=kind,
                               choices=choices, default=option.default, action=_DeprecatedAlias,
                               replacement=spelling, help=argparse.SUPPRESS)


def check_sampler_arguments(args: argparse.Namespace) -> None:
    """InputError, before torch is imported, for `--sampling.steps` below 1 (the other options are checked
    when the sampler is built, `sampler_from_args`)."""
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--sampling.steps: must be >= 1, got {args.steps}")


def sampler_from_args(args: argparse.Namespace, sde: SDE | None) -> Sampler:
    """The sampler the options name, on the model's SDE (`ScoreModel.sde`: `VPSDE`, `DiscreteVPSDE` or
    `VESDE`, whatever its family; None: the default `VPSDE`, to check the options before the model is read);
    ValueError on an invalid option or `--samples` K > 1 for a point estimate."""
    from diffusion.sampling.samplers import SamplerOptions

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerOptions)}
    sampler = SamplerOptions(**options).build(sde)
    sampler.check_samples(getattr(args, "samples", 1))  # K samples of a point estimate would be identical
    return sampler


def check_checkpoint_argument(value: str) -> None:
    """InputError, before torch is imported, for a `--ckpt` that is a path (with a folder part or a suffix)
    but not a checkpoint file: missing, a folder, not a regular file. A bare name (`reference-small`) may be
    a shipped checkpoint's: `diffusion.checkpoint.resolve_checkpoint` resolves it with the model
    (shipped names have neither part, which tests/lfmri/test_fast_refusals.py checks)."""
    path = Path(value)
    if path.is_file() or (path.name == value and not path.suffix):
        return
    check_input_file(path, "", "checkpoint file")
