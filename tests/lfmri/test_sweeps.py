"""Every W&B sweep file in experiments/sweeps: every value it can produce is accepted by the CLI.

Each parameter's values (grid values, a distribution's bounds and midpoint, a few seeded draws, typed as W&B's
controller types them: int for int_uniform, float for uniform / log-uniform) are rendered into the command by
W&B's own `create_sweep_command_args` (`--name=value`, Python's str()), then the full command line is parsed
AND instantiated by `lfmri` (model, data module, trainer, callbacks: constructors validate too), without
running. So a sweep never dies on its first agent.
"""

import math
import random
import shutil
import sys

import pytest
import yaml
from helpers import REPO
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from lfmri.lightning_cli import LfmriCLI, run_lightning_cli

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
REGIMES = ("noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0")


def parameter_values(name: str, spec: dict, draws: int = 3) -> list:
    """The values a W&B sweep parameter can produce, typed as the controller sends them."""
    if "value" in spec:
        values = [spec["value"]]
    elif "values" in spec:
        values = list(spec["values"])
    else:
        kind, lo, hi = spec.get("distribution"), spec["min"], spec["max"]
        rng = random.Random(0)
        if kind == "int_uniform":
            assert isinstance(lo, int) and isinstance(hi, int), f"{name}: int_uniform needs int bounds"
            values = [lo, hi, (lo + hi) // 2] + [rng.randint(lo, hi) for _ in range(draws)]
        elif kind == "uniform":
            values = [float(lo), float(hi), (lo + hi) / 2] + [rng.uniform(lo, hi) for _ in range(draws)]
        elif kind == "log_uniform_values":
            a, b = math.log(lo), math.log(hi)
            values = [float(lo), float(hi), math.exp((a + b) / 2)]
            values += [math.exp(rng.uniform(a, b)) for _ in range(draws)]
        elif kind == "log_uniform":  # bounds are natural-log exponents
            values = [math.exp(lo), math.exp(hi)] + [math.exp(rng.uniform(lo, hi)) for _ in range(draws)]
        else:
            raise AssertionError(f"{name}: distribution {kind!r} not covered by this test; add it here")
    for v in values:
        assert v is not None, f"{name}: W&B renders None as 'None', a string to the CLI; write \"null\""
    return values


def command_lines(sweep: dict) -> list[tuple[list[str], dict]]:
    """The agent's command lines (and the values in each): the i-th line takes every parameter's i-th value
    (cycling), so every value appears at least once with the others at legal values."""
    values = {name: parameter_values(name, spec) for name, spec in sweep["parameters"].items()}
    lines = []
    for i in range(max(len(v) for v in values.values())):
        args = {name: {"value": v[i % len(v)]} for name, v in values.items()}
        rendered = create_sweep_command_args({"args": args})["args"]
        line = []
        for chunk in sweep["command"]:
            if chunk == "${args}":
                line += rendered
            elif chunk == "${program}":
                line.append(sweep["program"])
            elif chunk not in ("${env}", "${interpreter}"):
                line.append(str(chunk))
        lines.append((line, {name: arg["value"] for name, arg in args.items()}))
    return lines


@pytest.fixture
def no_run(monkeypatch, tmp_path, tiny_checkpoint):
    """Parse and instantiate without running the subcommand, from a folder that looks like the repo root."""
    monkeypatch.setattr(LfmriCLI, "_run_subcommand", lambda self, subcommand: None)
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun1")  # the agent sets it for each run
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"  # the sampler sweep's
    last.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, last)


def test_sweep_files_exist():
    assert {p.name for p in SWEEPS} >= {"finetune.yaml", "sampler.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_is_well_formed(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    metric = sweep["metric"]
    assert metric["goal"] in ("maximize", "minimize")
    kind, name, regime = metric["name"].split("/")  # the sampler callback's val/<ssim|psnr|nmse>/<regime>
    assert kind == "val" and name in ("ssim", "psnr", "nmse") and regime in REGIMES
    assert sweep["command"][0] == "lfmri" and sweep["command"].count("${args}") == 1
    if sweep["method"] == "grid":
        assert all("distribution" not in spec for spec in sweep["parameters"].values())


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_value_is_accepted_by_the_cli(path, no_run):
    sweep = yaml.safe_load(path.read_text())
    lines = command_lines(sweep)
    assert lines
    for line, values in lines:
        cli = run_lightning_cli(line[1:])
        assert cli.subcommand == line[1]
        for name, sent in values.items():  # each swept value reached the parsed config
            value = cli.config[line[1]]
            for key in name.split("."):
                value = value[key][-1] if key == "callbacks" else value[key]  # the appended callback
            expected = None if sent == "null" else sent
            assert value == (tuple(expected) if isinstance(value, tuple) else expected), (name, sent)
        samplers = [c for c in cli.trainer.callbacks if type(c).__name__ == "SamplerCallback"]
        assert len(samplers) == 1, "one SamplerCallback must log the sweep's metric"
        assert type(cli.trainer.logger).__name__ == "WandbLogger", "the metric must reach W&B"
        assert "sweeprun1" in cli.trainer.default_root_dir  # one folder per run: runs never share checkpoints
        checkpoint = cli.trainer.checkpoint_callback
        assert checkpoint is None or "sweeprun1" in checkpoint.dirpath


def test_none_renders_as_a_string_so_sweeps_must_write_null():
    """Why parameter_values refuses None: W&B renders it 'None', which a str-typed option takes literally."""
    rendered = create_sweep_command_args({"args": {"a": {"value": None}, "b": {"value": "null"},
                                                   "c": {"value": [0.05, 0.3]}, "d": {"value": 1e-05}}})
    assert rendered["args"] == ["--a=None", "--b=null", "--c=[0.05, 0.3]", "--d=1e-05"]
