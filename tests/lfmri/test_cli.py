"""The `lfmri` dispatcher: unknown commands, required `???` config values and bad data paths give one line on
stderr and exit code 2, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICKSTART, REPO

from lfmri.cli import main
from lfmri.lightning_cli import missing_values


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and err.count("\n") == 1


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "degrade", "preview", "metrics", "export",
                 "reconstruct", "evaluate"):
        assert f"\n  {name} " in out


def test_missing_values_are_found_at_any_depth():
    config = {"model": {"init_args": {"pretrained": {"path": "???"}, "optim": {"lr": 1e-4}}},
              "trainer": {"callbacks": [{"a": "???"}]}}
    assert missing_values(config) == ["model.init_args.pretrained.path", "trainer.callbacks.0.a"]
    assert missing_values({"x": "ok", "y": [1, 2]}) == []


def test_required_config_values_are_refused_before_anything_is_built(capsys):
    assert main(["fit", "--config", str(REPO / "configs/finetune_mouse.yaml")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lfmri fit: error:")
    assert "model.init_args.pretrained.path" in last and "data.init_args.source.init_args.root" in last


def test_a_missing_data_directory_is_one_line(tmp_path, capsys):
    rc = main(["fit", "--config", str(QUICKSTART),
               f"--data.init_args.source={tmp_path}/nope", f"--trainer.default_root_dir={tmp_path}/run",
               "--trainer.enable_progress_bar=false"])
    assert rc == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lfmri fit: error:") and "nope" in last


def test_one_seed_rule_for_every_command(tmp_path, capsys):
    """A negative or too large seed is one line, exit 2, before any work, in fit, degrade, reconstruct and
    evaluate alike (fit once ended in a NumPy traceback, reconstruct accepted -1)."""
    vol = tmp_path / "v.nii.gz"
    vol.write_bytes(b"not read: the seed is checked first")
    commands = {
        "fit": ["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
                "--seed_everything=-1"],
        "degrade": ["degrade", str(vol), str(tmp_path / "d.nii.gz"), "--regime", "noise", "--seed", "-1"],
        "reconstruct": ["reconstruct", str(vol), str(tmp_path / "r.nii.gz"), "--ckpt", "reference-small",
                        "--regime", "noise", "--seed", "-1"],
        "evaluate": ["evaluate", "--ckpt", "reference-small", "--config", str(QUICKSTART), "--out",
                     str(tmp_path / "e"), "--seed", str(2**32)],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith(f"lfmri {name}: error:"), (name, err[-500:])
        assert "must be an integer from 0 to 4294967295" in last, (name, last)
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_fit_shows_no_third_party_noise(tmp_path):
    """A plain `lfmri fit` console: no LitLogger advert, no deprecation inside Lightning, no `weights_only`
    notice; Lightning's useful lines (the seed, the model summary) stay."""
    script = Path(sys.executable).with_name("lfmri")
    argv = [str(script), "fit", "--config", str(QUICKSTART), "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}/r", "--model.init_args.net.nf=8",
            "--model.init_args.net.num_groups=4", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--data.init_args.loader.num_workers=0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr
    assert "Tip:" not in printed and "LeafSpec" not in printed and "weights_only" not in printed, printed
    assert "Seed set to 0" in printed and "Trainable params" in printed
