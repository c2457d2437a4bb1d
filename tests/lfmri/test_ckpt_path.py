"""A `--ckpt_path` that is not one of our checkpoints (missing, a folder, truncated, another model's) is one
line on stderr and exit code 2, before anything is built; Lightning's keywords and remote URLs are left to
Lightning."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handlers exist before the fixture below adjusts them)
import pytest
import torch
from helpers import QUICKSTART

from lfmri import lightning_cli
from lfmri.cli import main
from lfmri.lightning_cli import _check_ckpt_path
from lfmri_utils.errors import InputError

pytestmark = pytest.mark.usefixtures("lightning_logs_to_stderr")


def _bad_checkpoint(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A path that is not an lfmri checkpoint, and what the error line must say (a regular expression)."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path, "no such"
    if kind == "folder":
        path.mkdir()
        return path, "folder|no such"
    if kind == "truncated":
        full = tmp_path / "full.ckpt"
        torch.save({"state_dict": {"net.w": torch.zeros(1000)}, "ema": {}, "global_step": 3}, full)
        path.write_bytes(full.read_bytes()[:1500])
        return path, "truncated|damaged|not a readable"
    if kind == "other_model":  # another LightningModule's checkpoint
        torch.save({"state_dict": {"layer.weight": torch.zeros(3, 3)}, "hyper_parameters": {"hidden": 3},
                    "global_step": 1, "epoch": 0}, path)
        return path, "not a ScoreModel checkpoint"
    if kind == "score_sde":  # the clinical checkpoint format, imported through model.pretrained instead
        torch.save({"model": {}, "ema": {}, "optimizer": {}, "step": 0}, path)
        return path, "a score_sde checkpoint"
    raise AssertionError(kind)


@pytest.mark.parametrize("command", ["fit", "validate"])
@pytest.mark.parametrize("kind", ["missing", "folder", "truncated", "other_model", "score_sde"])
def test_a_bad_ckpt_path_is_one_line(tmp_path, capsys, command, kind):
    path, words = _bad_checkpoint(tmp_path, kind)
    rc = main([command, "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
               f"--data.init_args.source={tmp_path}/no-data", "--ckpt_path", str(path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"lfmri {command}: error: ") and "ckpt_path" in lines[0], lines[0]
    assert str(path) in lines[0] and re.search(words, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [None, "", "last", "best", "hpc", "registry", "registry:model:v2",
                                   "s3://bucket/run/last.ckpt"])
def test_lightnings_keywords_and_remote_paths_are_not_files_to_check(value, tmp_path, monkeypatch):
    # files named like the keywords in the working directory, none of them a checkpoint: the keyword is still
    # Lightning's, never opened as a local file
    monkeypatch.chdir(tmp_path)
    for name in ("last", "best", "hpc", "registry"):
        (tmp_path / name).write_text("not a checkpoint")
    with pytest.raises(InputError, match="ckpt_path"):  # such a file, named as a path, is checked and refused
        _check_ckpt_path(str(tmp_path / "last"))
    opened = []
    monkeypatch.setattr(lightning_cli, "read_lightning_checkpoint", lambda path: opened.append(path))
    assert _check_ckpt_path(value) is None  # nothing read: Lightning resolves it
    assert opened == []
