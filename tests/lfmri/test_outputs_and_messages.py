"""Issue 14, items 9 and 12: outputs are checked before any work (`reconstruct`, `evaluate`, `preview` share
`lfmri_utils.files.check_output_file` / `check_output_dir`), and bad input files get one clear line naming the
file and the problem (`lfmri <command>: error: ...`, exit code 2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from diffusion.checkpoint import CheckpointError, load_score_sde_checkpoint, read_ddpm_config
from lfmri.cli import main
from lfmri_utils.errors import InputError

#: a complete score_sde config of a tiny DDPM (nested layout)
CONFIG = {"model": {"nf": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []},
          "data": {"image_size": 16, "num_channels": 2, "centered": True}}
DATA = {"class_path": "datamodules.LowFieldDataModule",
        "init_args": {"source": {"class_path": "datamodules.sources.BundledSource",
                                 "init_args": {"n_train": 1, "n_val": 1}}, "slices": {"image_size": 32}}}


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `lfmri argv`; it must fail with exit code 2, print nothing on stdout and one line on stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "", "work started before the error was found"
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"lfmri {argv[0]}: error: "), err
    return err.strip()


@pytest.fixture()
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "in.nii.gz"
    data = np.random.default_rng(0).random((16, 16, 2), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


# ---------------------------------------------------------------------------------------------- item 9
def test_reconstruct_checks_its_outputs_before_reading_the_model(volume, tmp_path, unwritable, capsys):
    missing = str(tmp_path / "absent.ckpt")  # reading it is the first piece of work after the checks
    base = ["--ckpt", missing, "--regime", "noise"]
    err = _error(["reconstruct", str(volume), str(unwritable / "r.nii.gz"), *base], capsys)
    assert f"OUTPUT {unwritable / 'r.nii.gz'}: cannot write in folder {unwritable}" in err
    err = _error(["reconstruct", str(volume), str(tmp_path / "r.nii.gz"), *base, "--samples", "2",
                  "--std-out", str(unwritable / "s.nii.gz")], capsys)
    assert f"--std-out {unwritable / 's.nii.gz'}: cannot write in" in err
    err = _error(["reconstruct", str(volume), str(tmp_path / "r.png"), *base], capsys)
    assert "OUTPUT" in err and "must end with .nii.gz or .nii" in err
    # a folder that does not exist yet is created when the result is written: no objection to it
    err = _error(["reconstruct", str(volume), str(tmp_path / "new" / "r.nii.gz"), *base], capsys)
    assert "absent.ckpt: no such checkpoint file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"] + (
        ["locked"] if (tmp_path / "locked").exists() else [])


def test_evaluate_checks_its_out_folder_before_reading_the_model(tmp_path, unwritable, capsys):
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": DATA}))
    base = ["--ckpt", str(tmp_path / "absent.ckpt"), "--config", str(config), "--regimes", "noise"]
    err = _error(["evaluate", *base, "--out", str(unwritable / "eval")], capsys)
    assert f"--out {unwritable / 'eval'}: cannot write in" in err
    err = _error(["evaluate", *base, "--out", str(config)], capsys)
    assert "exists and is not a folder" in err


def test_preview_checks_its_output_before_building_the_data(tmp_path, unwritable, capsys):
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(DATA))
    err = _error(["preview", "--config", str(config), "--out", str(unwritable / "p.png")], capsys)
    assert f"--out {unwritable / 'p.png'}: cannot write in" in err


# ------------------------------------------------------------------------------------------- item 12
def test_a_text_file_given_as_a_checkpoint_is_named_as_such(tmp_path, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("epoch 3: loss 0.12, looks fine\n")
    err = _error(["export", "--ckpt", str(notes), str(tmp_path / "o.pth")], capsys)
    assert err == (f"lfmri export: error: {notes}: not a PyTorch checkpoint (a text file starting "
                   "'epoch 3: loss 0.12, looks fine')")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty.ckpt: not a PyTorch checkpoint (the file is empty)" in _error(
        ["export", "--ckpt", str(empty), str(tmp_path / "o.pth")], capsys)


def test_a_folder_given_as_a_file_is_called_a_folder(volume, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    err = _error(["export", "--ckpt", str(folder), str(tmp_path / "o.pth")], capsys)
    assert err == f"lfmri export: error: {folder}: is a folder, expected a checkpoint file"
    err = _error(["reconstruct", str(volume), str(tmp_path / "r.nii.gz"), "--ckpt", str(tmp_path / "x.ckpt"),
                  "--regime", "noise", "--kspace", str(folder)], capsys)
    assert err == f"lfmri reconstruct: error: --kspace {folder}: is a folder, expected a file"


def test_a_pretrained_checkpoint_with_foreign_objects_gives_the_reason(tmp_path):
    crafted = tmp_path / "clinical.pth"
    torch.save({"model": {}, "ema": {}, "config": argparse.Namespace(nf=8)}, crafted)
    with pytest.raises(CheckpointError) as info:
        load_score_sde_checkpoint(crafted, CONFIG)
    message = str(info.value)
    assert message.startswith(f"{crafted}: refused to load: it holds objects other than tensors")
    assert "(Unsupported global: GLOBAL argparse.Namespace)" in message and "\n" not in message


def test_a_damaged_checkpoint_keeps_torchs_whole_reason(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"x": torch.zeros(1000)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut.pth: a damaged or truncated PyTorch checkpoint \(.*zip"):
        load_score_sde_checkpoint(cut, CONFIG)


def test_a_config_that_lacks_a_field_names_its_file(tmp_path):
    config = tmp_path / "config.json"
    model = {k: v for k, v in CONFIG["model"].items() if k != "ch_mult"}
    incomplete = {"model": model, "data": CONFIG["data"]}
    config.write_text(json.dumps(incomplete))
    with pytest.raises(CheckpointError) as info:
        read_ddpm_config(config)
    assert str(info.value) == (f"{config}: the score_sde config lacks ch_mult (nested layout: 'model', "
                               "'data' sections)")
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"{config}: the score_sde config is a JSON list"):
        read_ddpm_config(config)
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a folder, expected a score_sde config file"):
        read_ddpm_config(tmp_path)


def test_a_data_block_without_class_path_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": DATA["init_args"]}}))
    err = _error(["preview", "--config", str(config), "--out", str(tmp_path / "p.png")], capsys)
    assert err == (f"lfmri preview: error: --config {config}: no data: block with a class_path "
                   "(e.g. class_path: datamodules.LowFieldDataModule)")
    with pytest.raises(InputError, match="no data: block with a class_path"):
        from lfmri.data_config import load_datamodule

        load_datamodule(config)
