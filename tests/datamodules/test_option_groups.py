"""The data module's options in typed groups (`slices`, `loader`, `predict`): a short constructor, one
`SliceOptions` object handed to every dataset, nested blocks in YAML and on the command line, plain values
in the hyper-parameters, and one line naming the new spelling for a config written with the former flat
options."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import QUICKSTART

from datamodules.datamodule import MOVED_OPTIONS, LoaderOptions, LowFieldDataModule
from datamodules.dataset import PredictOptions, SliceOptions
from datamodules.sources import BundledSource
from lfmri.cli import main
from lfmri.data_config import load_datamodule
from lfmri.lightning_cli import run_lightning_cli
from lfmri_utils.errors import InputError


def test_the_constructor_takes_at_most_twelve_options_and_the_groups_are_frozen_dataclasses():
    parameters = list(inspect.signature(LowFieldDataModule.__init__).parameters)[1:]
    assert len(parameters) <= 12, parameters
    assert {"slices", "loader", "predict"} <= set(parameters)
    assert not set(MOVED_OPTIONS) & set(parameters)  # every former flat option lives in a group now
    for group in (SliceOptions(), LoaderOptions(), PredictOptions()):
        with pytest.raises(AttributeError):
            group.__setattr__(next(iter(group.to_dict())), None)


def test_one_slices_group_reaches_every_dataset(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).uniform(50, 100, size=(20, 18, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "low.nii.gz"))
    slices = SliceOptions(crop_size=16, crop_coverage="uniform", image_size=24, eval_per_volume=2,
                          min_foreground_fraction=0.2, background_phase=True)
    dm = LowFieldDataModule(BundledSource(n_train=1, n_val=1), slices=slices, eval_regimes=["noise"],
                            loader={"batch_size": 2}, predict={"path": str(tmp_path / "low.nii.gz")})
    for stage in ("fit", "test", "predict"):
        dm.setup(stage)
    datasets = (dm.train_dataset, dm.val_dataset, dm.test_dataset, dm.predict_dataset)
    assert all(ds.slices is slices for ds in datasets)
    assert dm.train_dataset.item_shapes()[0] == (16, 16)  # crop_size
    assert dm.train_dataset.crop_coverage == "uniform"
    assert all(ds.item_shapes() == [(24, 24)] * len(ds) for ds in datasets[1:])  # image_size
    for ds in datasets[1:3]:  # eval_per_volume slices per volume, one regime
        assert len(ds) == 2 * len(ds.volumes)
    assert not np.allclose(dm.val_dataset[0].clean[1].numpy(), 0)  # background_phase: an imaginary part
    assert next(iter(dm.train_dataloader())).clean.shape[0] == 2  # loader.batch_size


def test_a_mapping_is_read_as_its_group_and_the_hyperparameters_hold_plain_values():
    dm = LowFieldDataModule(slices={"crop_size": 32}, loader={"num_workers": 1}, predict={"regime": "noise"})
    assert dm.slices == SliceOptions(crop_size=32) and dm.loader == LoaderOptions(num_workers=1)
    assert dm.predict == PredictOptions(regime="noise")
    assert dm.hparams["slices"] == SliceOptions(crop_size=32).to_dict()
    assert dm.hparams["loader"]["num_workers"] == 1 and dm.hparams["predict"]["regime"] == "noise"
    with pytest.raises(InputError, match=r"^slices: unknown option\(s\) crop; choose from image_size, "):
        LowFieldDataModule(slices={"crop": 32})
    with pytest.raises(InputError, match=r"^loader\.batch_size must be an integer >= 1, got 0$"):
        LowFieldDataModule(loader={"batch_size": 0})
    with pytest.raises(InputError, match=r"^predict\.regime: unknown regime 'x'"):
        LowFieldDataModule(predict={"regime": "x"})
    with pytest.raises(InputError, match=r"^predict\.kspace: give the NIfTI it belongs to as predict\.path$"):
        LowFieldDataModule(predict={"kspace": "k.h5"})


def test_the_groups_are_nested_blocks_on_the_command_line_and_in_yaml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"slices": {"eval_per_volume": 3}}}}))
    cli = run_lightning_cli(["--config", str(QUICKSTART), "--config", str(config), "--trainer.logger=false",
                             "--data.init_args.slices.crop_size=null",
                             "--data.init_args.slices.image_size=32", "--data.init_args.loader.batch_size=3",
                             f"--trainer.default_root_dir={tmp_path}"], run=False)
    dm = cli.datamodule
    # the command line's fields merge into the stacked configs' block (the quickstart's crop_coverage kept)
    assert dm.slices == SliceOptions(image_size=32, crop_size=None, crop_coverage="uniform",
                                     eval_per_volume=3)
    assert dm.loader.batch_size == 3 and dm.loader.num_workers == 2


OLD = {"data": {"class_path": "datamodules.LowFieldDataModule",
                "init_args": {"source": "bundled", "crop_size": 64}}}


@pytest.mark.parametrize("name", sorted(MOVED_OPTIONS))
def test_a_former_flat_option_on_the_command_line_is_one_line_naming_its_new_place(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    value = "/x.nii.gz" if name == "predict_path" else "1"
    assert main(["fit", "--config", str(QUICKSTART), f"--data.init_args.{name}={value}"]) == 2
    captured = capsys.readouterr()
    new = MOVED_OPTIONS[name]
    assert captured.err.strip() == (f"lfmri fit: error: data.init_args.{name} moved to data.init_args.{new} "
                                    f"(YAML: {new.split('.')[0]}: {{{new.split('.')[1]}: ...}})")
    assert captured.out == ""


def test_an_old_flat_config_is_one_line_naming_the_new_spelling(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump(OLD))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lfmri fit: error: {config}: data.init_args.crop_size moved to "
                   "data.init_args.slices.crop_size (YAML: slices: {crop_size: ...})"]
    # lfmri's own commands (preview, evaluate) read data blocks the same way
    with pytest.raises(InputError) as error:
        load_datamodule(config)
    assert str(error.value) == (f"--config {config}: data.init_args.crop_size moved to "
                                "data.init_args.slices.crop_size (YAML: slices: {crop_size: ...})")
    # the new spelling of the same config loads
    new = {"source": "bundled", "slices": {"crop_size": 64}, "loader": {"batch_size": 2}}
    config.write_text(yaml.safe_dump({"data": {**OLD["data"], "init_args": new}}))
    dm = load_datamodule(config, slices={"eval_per_volume": 2})  # an override merges into the group
    assert (dm.slices.crop_size, dm.slices.eval_per_volume, dm.loader.batch_size) == (64, 2, 2)


def test_a_kspace_or_params_file_needs_one_nifti_not_a_directory(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).uniform(50, 100, size=(12, 10, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "low.nii.gz"))
    for name in ("kspace", "params"):
        dm = LowFieldDataModule(predict={"path": str(tmp_path), name: str(tmp_path / "file")})
        with pytest.raises(InputError, match=rf"^predict\.{name}: belongs to one NIfTI, but predict\.path "
                                             rf"{tmp_path} is a directory: give the NIfTI file$"):
            dm.setup("predict")
    dm = LowFieldDataModule(predict={"path": str(tmp_path), "noise_sigma": 2.0})  # one std for every file
    dm.setup("predict")
    assert dm.predict_dataset[0].params["noise_sigma"] == pytest.approx(2.0 / dm.predict_dataset[0].scale)
