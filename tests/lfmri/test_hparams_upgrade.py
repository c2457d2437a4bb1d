"""Checkpoints written before the network became one object (`DDPMConfig`) and before the reconstruction
options left the model (flat nf, ch_mult, ... and predict_* hyper-parameters; the first shipped prior,
reference-small-v1, is one) still load, through `module.upgrade_hparams`; `lfmri predict` takes its
sampler as `--sampling.*`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI, TINY_MODEL, predict_config

from diffusion.checkpoint import SHIPPED_CHECKPOINTS
from lfmri.cli import main
from lfmri.models import load_score_model
from lightning_modules.module import upgrade_hparams

pytestmark = pytest.mark.usefixtures("one_thread", "lightning_logs_to_stderr")


def test_upgrade_gathers_the_network_fields_and_drops_the_prediction_options() -> None:
    legacy = {"_class_path": "lightning_modules.module.ScoreModel", "nf": 8, "ch_mult": [1, 2],
              "num_groups": 4, "grad_checkpointing": False, "lr": 1e-3, "predict_steps": 5,
              "predict_sampler": None}
    today = upgrade_hparams(legacy)
    assert today == {"_class_path": "lightning_modules.module.ScoreModel",
                     "net": {"nf": 8, "ch_mult": [1, 2], "num_groups": 4}, "grad_checkpointing": False,
                     "lr": 1e-3}
    assert upgrade_hparams(today) == today  # today's layout is left as it is
    assert legacy["nf"] == 8 and "net" not in legacy  # the checkpoint's own dict is not changed


def test_a_legacy_checkpoint_loads_as_the_same_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    hparams = dict(ckpt["hyper_parameters"])
    ckpt["hyper_parameters"] = {**{k: v for k, v in hparams.items() if k != "net"}, **hparams["net"],
                                "predict_steps": 3, "predict_dc": "gradient"}
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    old = load_score_model(tmp_path / "legacy.ckpt", torch.device("cpu"))
    new = load_score_model(tiny_checkpoint, torch.device("cpu"))
    assert old.net.config == new.net.config == TINY_MODEL["net"]
    assert old.hparams.net == new.hparams.net and "predict_steps" not in old.hparams
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def lowfield(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real low-field-like volume (MNI, 48 x 56 x 2 voxels)."""
    img = nib.load(str(MNI))
    vol = np.asarray(img.dataobj, dtype=np.float32)[4:196:4, 4:228:4, 80:100:10]
    path = tmp_path_factory.mktemp("lowfield") / "low.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), img.affine), path)
    return path


def test_predict_builds_the_shipped_legacy_checkpoints_network_and_takes_the_sampler_options(
        lowfield: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # without the upgrade the model would be the default 34.4M network, and its weights would not load
    config = predict_config(tmp_path, lowfield)
    shipped = str(SHIPPED_CHECKPOINTS["reference-small-v1"])  # the first shipped prior: the older layout
    assert main(["predict", "--config", str(config), "--ckpt_path", shipped, "--sampling.steps=1"]) == 0
    out = nib.load(str(tmp_path / "pred" / "low_recon.nii.gz"))
    assert out.shape == (48, 56, 2) and np.isfinite(np.asarray(out.dataobj)).all()
    # a bad sampler option: one line, before any data is read, nothing written
    capsys.readouterr()
    assert main(["predict", "--config", str(predict_config(tmp_path / "bad", lowfield)), "--ckpt_path",
                 shipped, "--sampling.dc_lambda=-1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lfmri predict: error: --sampling: dc_lambda must be") and "> 0" in line
    assert not (tmp_path / "bad" / "pred").exists()
