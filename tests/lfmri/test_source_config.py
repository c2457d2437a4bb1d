"""The data module's `source` in configs: a `class_path` source block in YAML and a plain string on the
command line both parse through the real LightningCLI (`lfmri fit`), and the block builds the same datasets
as the data module built in Python (and as the string shorthand, where both mean the same data)."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
import yaml
from helpers import QUICKSTART

from datamodules import BundledSource, LowFieldDataModule
from lfmri.cli import main
from lfmri.data_config import load_datamodule
from lfmri.lightning_cli import run_lightning_cli

BLOCK = {"class_path": "datamodules.sources.NiftiDirSource",
         "init_args": {"root": "/data/bids", "pattern": "**/*T2w.nii.gz"}}
#: a little data, quick to build: one slice per volume, one regime
SMALL = {"slices": {"eval_per_volume": 1}, "eval_regimes": ["noise"], "loader": {"num_workers": 0}}


def printed_data(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """`lfmri fit --config configs/quickstart.yaml ARGS --print_config` in this process -> its data block."""
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        run_lightning_cli(["fit", "--config", str(QUICKSTART), *args, "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())["data"]["init_args"]


def test_a_source_block_in_yaml_and_a_string_on_the_command_line_both_parse(tmp_path, monkeypatch):
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"source": BLOCK}}}))
    source = printed_data(["--config", str(config)], monkeypatch)["source"]
    assert source["class_path"] == BLOCK["class_path"] and source["init_args"] == {**BLOCK["init_args"],
                                                                                    "slice_axis": None}
    for value in ("/data/bids", "bundled"):  # a string replaces the block, and the quickstart's string
        for base in (["--config", str(config)], []):
            assert printed_data([*base, f"--data.init_args.source={value}"], monkeypatch)["source"] == value
    root = "--data.init_args.source.init_args.root=/other"  # one option of the block on the command line
    other = printed_data(["--config", str(config), root], monkeypatch)["source"]
    assert other["init_args"]["root"] == "/other"
    flow = printed_data(["--data.init_args.source={class_path: BundledSource, init_args: {n_train: 2}}"],
                        monkeypatch)["source"]  # a block on the command line, the class by its name
    assert flow["class_path"].endswith("BundledSource") and flow["init_args"]["n_train"] == 2


def test_lightning_cli_builds_the_source_of_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    block = {"class_path": "datamodules.sources.BundledSource", "init_args": {"n_train": 2, "n_val": 1}}
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"source": block, "slices": {"slice_axis": 1}}}}))
    cli = run_lightning_cli(["--config", str(QUICKSTART), "--config", str(config),
                             f"--trainer.default_root_dir={tmp_path}/run"], run=False)
    source = cli.datamodule.source
    assert type(source) is BundledSource and (source.n_train, source.n_val, source.slice_axis) == (2, 1, 1)
    assert cli.datamodule.split.sizes() == {"train": 2, "val": 1, "test": 1}
    assert cli.datamodule.hparams["source"] == {"class_path": "datamodules.sources.BundledSource",
                                                "init_args": {"n_train": 2, "n_val": 1, "seed": 0,
                                                              "slice_axis": 1}}


def _same_datasets(a: LowFieldDataModule, b: LowFieldDataModule, stages: tuple[str, ...]) -> None:
    for stage in stages:
        a.setup(stage)
        b.setup(stage)
    for name in ("val_dataset", "test_dataset"):
        ds_a, ds_b = getattr(a, name), getattr(b, name)
        if ds_a is None:
            continue
        assert len(ds_a) == len(ds_b) > 0
        for i in range(len(ds_a)):
            x, y = ds_a[i], ds_b[i]
            assert (x.volume_id, int(x.slice)) == (y.volume_id, int(y.slice))
            assert torch.equal(x.clean, y.clean) and torch.equal(x.y, y.y)


def test_a_yaml_source_block_builds_the_same_datasets_as_the_string_and_python_forms(tmp_path):
    block = tmp_path / "block.yaml"
    block.write_text(yaml.safe_dump({"source": {"class_path": "datamodules.sources.BundledSource",
                                                "init_args": {"n_train": 2, "n_val": 1}}, **SMALL}))
    from_yaml = load_datamodule(block)
    assert isinstance(from_yaml.source, BundledSource)
    assert from_yaml.split.sizes() == {"train": 2, "val": 1, "test": 1}
    in_python = LowFieldDataModule(BundledSource(n_train=2, n_val=1), **SMALL)
    _same_datasets(from_yaml, in_python, ("validate", "test"))
    # the string shorthand is the block with BundledSource's defaults
    string, default_block = tmp_path / "string.yaml", tmp_path / "default_block.yaml"
    string.write_text(yaml.safe_dump({"source": "bundled", **SMALL}))
    default_block.write_text(yaml.safe_dump({"source": {"class_path": "datamodules.sources.BundledSource"},
                                             **SMALL}))
    a, b = load_datamodule(string), load_datamodule(default_block)
    assert a.split == b.split and a.split.sizes() == {"train": 8, "val": 2, "test": 1}
    _same_datasets(a, b, ("test",))


def test_nifti_without_a_path_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    rc = main(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
               "--data.init_args.source=nifti"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("lfmri fit: error: source 'nifti' needs its data")
    assert "--data.init_args.source=/data/dir" in lines[-1] and "NiftiDirSource" in lines[-1]
    assert not (tmp_path / "run").exists()
