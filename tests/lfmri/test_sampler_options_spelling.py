"""Issue 23 (3): one sampler-options type (`SamplerOptions`) and one spelling of each option, its field name,
at every entry point: `lfmri reconstruct` / `lfmri evaluate` (`--sampling.<field>`, argparse), `lfmri predict`
(`--sampling.<field>`, LightningCLI) and the validation `SamplerCallback` (`init_args.sampling.<field>`).
The former spellings (`--dc-lambda`, the callback's flat `dc_lambda:`) still work and say they are deprecated.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch import Callback

from diffusion.sampling.options import FORMER_SPELLINGS
from diffusion.sampling.samplers import Sampler, SamplerOptions, build_sampler
from lfmri.cli import main
from lfmri.commands.sampler_options import add_sampler_arguments, sampler_from_args
from lfmri.lightning_cli import sampling_nulls_as_blocks
from lightning_modules.callbacks import SamplerCallback

FIELDS = {f.name for f in dataclasses.fields(SamplerOptions)}
#: a valid value of every field, as typed on the command line (warm_ddim takes them all)
VALUES = {"sampler": "warm_ddim", "steps": "3", "t0": "0.3", "dc": "gradient", "dc_weight": "0.5",
          "dc_lambda": "3.0", "dc_floor": "0.01", "t0_ratio": "2.0", "stop_ratio": "0.5", "start": "tv",
          "start_lam": "0.25", "start_error": "2.0"}
#: the same values, typed
TYPED = {"sampler": "warm_ddim", "steps": 3, "t0": 0.3, "dc": "gradient", "dc_weight": 0.5, "dc_lambda": 3.0,
         "dc_floor": 0.01, "t0_ratio": 2.0, "stop_ratio": 0.5, "start": "tv", "start_lam": 0.25,
         "start_error": 2.0}
#: the options with a former spelling (the others were added since issue 23: `--sampling.<field>` only)
FORMER = set(FORMER_SPELLINGS)
COMMANDS = ("reconstruct", "evaluate")


def _command_parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of one of lfmri's own subcommands."""
    sub = argparse.ArgumentParser(prog="lfmri").add_subparsers(dest="command")
    importlib.import_module(f"lfmri.commands.{command}").register(sub)
    return sub.choices[command]


def _sampling_names(help_text: str, prefix: str) -> set[str]:
    """The option names `<prefix>sampling.<name>` a help text lists."""
    return set(re.findall(rf"{re.escape(prefix)}sampling\.(\w+)", help_text))


def _same_value(a: Any, b: Any) -> bool:
    """Equal: tensors element for element, dataclasses and objects (the SDE) attribute for attribute."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if inspect.isfunction(a):
        return a is b
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and vars(a).keys() == vars(b).keys() and all(
            _same_value(v, vars(b)[k]) for k, v in vars(a).items())
    return a == b


def _same_sampler(a: Sampler, b: Sampler) -> bool:
    return all(_same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Sampler))


def test_the_value_tables_cover_every_field():
    assert set(VALUES) == set(TYPED) == FIELDS


# --------------------------------------------------------------------- the same names at every entry point
@pytest.mark.parametrize("command", COMMANDS)
def test_reconstruct_and_evaluate_list_exactly_the_fields(command):
    help_text = _command_parser(command).format_help()
    assert _sampling_names(help_text, "--") == FIELDS
    listed = set(re.findall(r"^\s+(--[\w.-]+)", help_text, flags=re.MULTILINE))
    assert not listed & {f"--{name.replace('_', '-')}" for name in FIELDS}  # the former spellings are hidden
    assert FORMER < FIELDS


def test_predict_lists_exactly_the_fields(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    try:
        main(["predict", "--help"])
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert _sampling_names(capsys.readouterr().out, "--") == FIELDS


def test_the_callback_takes_exactly_the_fields_as_its_sampling_block():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SamplerCallback, "callback")
    parsed = parser.parse_args([f"--callback.sampling.{name}={VALUES[name]}" for name in sorted(FIELDS)])
    assert parsed.callback.sampling.as_dict() == TYPED  # every field, nothing else
    with pytest.raises(ArgumentError, match="bogus"):
        parser.parse_args(["--callback.sampling.bogus=1"])
    parameters = inspect.signature(SamplerCallback).parameters
    assert "SamplerOptions" in str(parameters["sampling"].annotation)
    # the former flat keywords, each one field, all of them
    assert {n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY} == FORMER


# ------------------------------------------------------------------------------------- the argparse commands
@pytest.mark.parametrize("command", COMMANDS)
def test_each_option_reaches_the_sampler(command, capsys):
    parser = _command_parser(command)
    argv = ["in.nii.gz", "out.nii.gz", "--ckpt", "c", "--regime", "noise"] if command == "reconstruct" else [
        "--ckpt", "c", "--config", "c.yaml", "--out", "o"]
    args = parser.parse_args([*argv, *(a for name, v in VALUES.items() for a in (f"--sampling.{name}", v))])
    assert capsys.readouterr().err == ""  # the one spelling notes nothing
    assert {name: getattr(args, name) for name in FIELDS} == TYPED
    assert _same_sampler(sampler_from_args(args, None), SamplerOptions(**TYPED).build())


@pytest.mark.parametrize("name", sorted(FORMER))
def test_a_former_spelling_still_works_and_says_so(name, capsys):
    parser = argparse.ArgumentParser(prog="lfmri reconstruct")
    add_sampler_arguments(parser)
    old = f"--{name.replace('_', '-')}"
    args = parser.parse_args([old, VALUES[name]])
    assert capsys.readouterr().err == f"lfmri reconstruct: {old} is deprecated; use --sampling.{name}\n"
    assert vars(args) == vars(parser.parse_args([f"--sampling.{name}", VALUES[name]]))
    assert getattr(args, name) == TYPED[name]


def test_a_former_spelling_runs_reconstruct_to_the_same_refusal(tmp_path, capsys):
    """Through `lfmri reconstruct` itself: the old flag is checked as the new one (here: refused)."""
    volume = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.float32), np.eye(4)), volume)
    for flag in ("--steps", "--sampling.steps"):
        assert main(["reconstruct", str(volume), str(tmp_path / "o.nii.gz"),
                     "--ckpt", "reference-small", "--regime", "noise", flag, "0"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == "lfmri reconstruct: error: --sampling.steps: must be >= 1, got 0"
        assert ("deprecated" in err) == (flag == "--steps")


def test_a_bad_choice_is_refused_by_both_spellings(capsys):
    parser = argparse.ArgumentParser(prog="lfmri reconstruct")
    add_sampler_arguments(parser)
    for flag in ("--sampling.dc", "--dc"):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, "exact"])
        assert "invalid choice: 'exact'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- the callback
def _callbacks_from_yaml(text: str) -> list[Callback]:
    """`trainer.callbacks` as LightningCLI reads and builds them (jsonargparse's list of Callback classes)."""
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_object(yaml.safe_load(text))
    return parser.instantiate_classes(config).callbacks


def test_the_callback_from_yaml_builds_the_same_sampler_as_before():
    new = _callbacks_from_yaml(yaml.safe_dump({"callbacks": [{
        "class_path": "lightning_modules.callbacks.SamplerCallback",
        "init_args": {"sampling": TYPED, "n_slices": 2}}]}))[0]
    assert new.sampling == SamplerOptions(**TYPED) and new.n_slices == 2
    with pytest.warns(FutureWarning, match=r"^SamplerCallback: .*deprecated.*sampling\.dc_lambda"):
        old = _callbacks_from_yaml(yaml.safe_dump({"callbacks": [{
            "class_path": "lightning_modules.callbacks.SamplerCallback",
            "init_args": {**{k: TYPED[k] for k in FORMER}, "n_slices": 2}}]}))[0]  # before: flat keywords
    assert old.sampling == SamplerOptions(**{k: TYPED[k] for k in FORMER}) and old.n_slices == 2
    before = build_sampler(TYPED["sampler"], **{k: v for k, v in TYPED.items() if k != "sampler"})
    assert _same_sampler(new.sampling.build(), before)
    assert _same_sampler(old.sampling.build(), build_sampler(
        TYPED["sampler"], **{k: TYPED[k] for k in FORMER if k != "sampler"}))
    assert not _same_sampler(SamplerOptions(**{**TYPED, "dc_lambda": 4.0}).build(), before)  # it can tell


def test_the_callback_overrides_one_field_on_the_command_line():
    parser = ArgumentParser()
    parser.add_argument("--trainer.callbacks", type=list[Callback])
    config = parser.parse_args(["--trainer.callbacks+=lightning_modules.callbacks.SamplerCallback",
                                "--trainer.callbacks.init_args.sampling.dc_lambda=64"])
    (callback,) = parser.instantiate_classes(config).trainer.callbacks
    assert callback.sampling == SamplerOptions(dc_lambda=64.0)


def test_the_callback_takes_null_on_the_command_line():
    """`sampling.<field>=null` (a sweep's "null": the registry's default) reaches the block as None, through
    the command line's rewriting (`sampling_nulls_as_blocks`; jsonargparse would pass the string 'None')."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.callbacks", type=list[Callback])
    key = "--trainer.callbacks.init_args.sampling"
    argv = ["--trainer.callbacks+=lightning_modules.callbacks.SamplerCallback", f"{key}.sampler=pnp",
            f"{key}.t0=0.2", f"{key}.steps=3", f"{key}.sampler=null", f"{key}.t0=null"]
    assert sampling_nulls_as_blocks(argv)[-2:] == [f"{key}={{sampler: null}}", f"{key}={{t0: null}}"]
    config = parser.parse_args(sampling_nulls_as_blocks(argv))
    (callback,) = parser.instantiate_classes(config).trainer.callbacks
    assert callback.sampling == SamplerOptions(steps=3)


@pytest.mark.parametrize("name", sorted(FORMER))
def test_each_flat_keyword_of_the_callback_lands_in_its_field(name):
    with pytest.warns(FutureWarning, match=rf"^SamplerCallback: {name} are deprecated .*sampling\.{name}\)$"):
        callback = SamplerCallback(**{name: TYPED[name]})
    assert callback.sampling == SamplerOptions(**{name: TYPED[name]})


def test_the_callbacks_flat_keywords_fold_into_sampling_and_refuse_a_conflict():
    with pytest.warns(FutureWarning, match="steps, dc_lambda are deprecated"):
        callback = SamplerCallback(steps=2, dc_lambda=3.0)
    assert callback.sampling == SamplerOptions(steps=2, dc_lambda=3.0)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="steps given both"):
        SamplerCallback(SamplerOptions(steps=2), steps=3)
    assert SamplerCallback().sampling == SamplerOptions()  # None: every registry default
