"""Checkpoints written before the network became one object (`DDPMConfig`), before the reconstruction
options left the model (flat nf, ch_mult, ... and predict_* hyper-parameters; the first shipped prior,
reference-small-v1, is one) and before the options became blocks (flat lr, dsm_weight, pretrained_family, ...:
both shipped priors) still load, through `module.upgrade_hparams`; `lfmri predict` takes its sampler as
`--sampling.*`; configs and command lines in the flat spelling stop with one line naming the new one."""

from __future__ import annotations

import inspect
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI, QUICKSTART, TINY_MODEL, predict_config, refused

from diffusion.checkpoint import SHIPPED_CHECKPOINTS
from lfmri.cli import main
from lfmri.models import load_score_model
from lightning_modules.module import LEGACY_OPTIONS, LossConfig, OptimConfig, ScoreModel, upgrade_hparams

pytestmark = pytest.mark.usefixtures("one_thread", "lightning_logs_to_stderr")


def test_the_constructor_takes_at_most_12_arguments() -> None:
    assert len(inspect.signature(ScoreModel.__init__).parameters) - 1 <= 12  # (less `self`)


def test_upgrade_gathers_the_flat_options_into_blocks_and_drops_the_prediction_options() -> None:
    legacy = {"_class_path": "lightning_modules.module.ScoreModel", "nf": 8, "ch_mult": [1, 2],
              "num_groups": 4, "grad_checkpointing": False, "pretrained": "knee.pth",
              "pretrained_weights": "model", "adapt_channels": 2, "lr": 1e-3, "ema_decay": 0.9,
              "supervised_weight": 0.5, "supervised_t0": [0.1, 0.2], "predict_steps": 5,
              "predict_sampler": None}
    today = upgrade_hparams(legacy)
    assert today == {"_class_path": "lightning_modules.module.ScoreModel",
                     "net": {"nf": 8, "ch_mult": [1, 2], "num_groups": 4}, "grad_checkpointing": False,
                     "pretrained": {"path": "knee.pth", "weights": "model", "adapt_channels": 2},
                     "loss": {"supervised_weight": 0.5, "supervised_t0": [0.1, 0.2]},
                     "optim": {"lr": 1e-3, "ema_decay": 0.9}}
    assert upgrade_hparams(today) == today  # today's layout is left as it is
    assert legacy["nf"] == 8 and "net" not in legacy and "optim" not in legacy  # the caller's dict: unchanged
    # a former pretrained block that names no file, config or family is no block
    assert upgrade_hparams({"pretrained": None, "pretrained_weights": "ema", "pretrained_family": None,
                            "pretrained_config": None, "adapt_channels": None})["pretrained"] is None


def _flat(hparams: dict) -> dict:
    """`hparams` (today's layout) written as before the blocks and the network object: every field flat, the
    pretrained block as `pretrained` (its path) and pretrained_* (`LEGACY_OPTIONS`), and predict_* options."""
    source = hparams["pretrained"] or {"path": None, "weights": "ema", "config": None, "adapt_channels": None,
                                       "family": None}
    flat = {k: v for k, v in hparams.items() if k not in ("net", "pretrained", "loss", "optim")}
    flat.update({**hparams["net"], **hparams["loss"], **hparams["optim"], "pretrained": source["path"]})
    flat.update({old: source[new.split(".")[1]] for old, new in LEGACY_OPTIONS.items()
                 if new.startswith("pretrained.")})
    return {**flat, "predict_steps": 3, "predict_dc": "gradient"}


def test_a_flat_checkpoint_loads_as_the_same_model_with_the_same_blocks(save_score_model,
                                                                        tmp_path: Path) -> None:
    options = dict(loss=LossConfig(dsm_weight=0.5, supervised_weight=0.7, supervised_t0=(0.1, 0.2),
                                   supervised_loss="l2", supervised_conditioning="separate"),
                   optim=OptimConfig(lr=3e-4, weight_decay=0.01, warmup_steps=7, ema_decay=0.95))
    torch.manual_seed(0)
    today = save_score_model(tmp_path / "today.ckpt", ScoreModel(**{**TINY_MODEL, **options}, beta_max=15.0))
    ckpt = torch.load(today, weights_only=True)
    ckpt["hyper_parameters"] = _flat(ckpt["hyper_parameters"])
    assert "lr" in ckpt["hyper_parameters"] and "optim" not in ckpt["hyper_parameters"]
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    new = load_score_model(today, torch.device("cpu"))
    with open(tmp_path / "legacy.ckpt", "rb") as file:  # Lightning's loader also takes a file object
        from_file = ScoreModel.load_from_checkpoint(file, map_location="cpu")
    for old in (load_score_model(tmp_path / "legacy.ckpt", torch.device("cpu")),
                ScoreModel.load_from_checkpoint(tmp_path / "legacy.ckpt", map_location="cpu"), from_file):
        assert old.net.config == new.net.config == TINY_MODEL["net"]
        assert (old.loss_config, old.optim_config) == (new.loss_config, new.optim_config) == \
            (options["loss"], options["optim"])
        assert dict(old.hparams) == {k: v for k, v in new.hparams.items() if not k.startswith("_")}
        assert old.sde.beta_max == 15.0 and old.ema.decay == 0.95 and "predict_steps" not in old.hparams
        for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        pairs = zip(old.ema.shadow_params, new.ema.shadow_params, strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    # Lightning's keyword overrides, in either spelling, change one field of a block and keep the others
    tuned = ScoreModel.load_from_checkpoint(tmp_path / "legacy.ckpt", map_location="cpu", lr=1e-5,
                                            loss={"supervised_weight": 0.0})
    assert tuned.optim_config == OptimConfig(lr=1e-5, weight_decay=0.01, warmup_steps=7, ema_decay=0.95)
    assert tuned.loss_config == LossConfig(0.5, 0.0, (0.1, 0.2), "l2", "separate")


@pytest.mark.parametrize("name", ["reference-small", "reference-small-v1"])
def test_the_shipped_flat_priors_load_into_the_blocks(name: str) -> None:
    flat = torch.load(SHIPPED_CHECKPOINTS[name], weights_only=True)["hyper_parameters"]
    assert "lr" in flat and "loss" not in flat  # written before the blocks
    model = load_score_model(name, torch.device("cpu"))
    blocks = {"loss": model.loss_config, "optim": model.optim_config}
    for old, new in LEGACY_OPTIONS.items():
        block, field = new.split(".")
        if old in flat and block in blocks:  # the file's own values, read into the blocks
            value = getattr(blocks[block], field)
            assert (list(value) if isinstance(value, tuple) else value) == flat[old], old
    assert model.hparams.pretrained is None and flat["pretrained"] is None
    default = "shared" if "supervised_conditioning" not in flat else flat["supervised_conditioning"]
    assert model.loss_config.supervised_conditioning == default
    assert model.ema.decay == flat["ema_decay"]


@pytest.mark.usefixtures("lightning_logs_to_stderr")
@pytest.mark.parametrize(("yaml_text", "argument", "line"), [
    ("model:\n  init_args:\n    lr: 1.0e-4\n", None,
     "model.init_args.lr moved to model.init_args.optim.lr (YAML: optim: {lr: ...})"),
    ("model:\n  init_args:\n    pretrained: knee.pth\n", None,
     "model.init_args.pretrained is a block now: give the checkpoint as "
     "model.init_args.pretrained.path=knee.pth"),
    (None, "--model.init_args.supervised_weight=0.5",
     "model.init_args.supervised_weight moved to model.init_args.loss.supervised_weight"),
    (None, "--model.init_args.pretrained_family=dds",
     "model.init_args.pretrained_family moved to model.init_args.pretrained.family"),
    (None, "--model.init_args.pretrained=reference-small",
     "give the checkpoint as model.init_args.pretrained.path=reference-small"),
    (None, f"--model.init_args.pretrained={SHIPPED_CHECKPOINTS['reference-small']}",  # a file that exists
     "model.init_args.pretrained is a block now: give the checkpoint as model.init_args.pretrained.path="),
], ids=["yaml lr", "yaml pretrained", "supervised_weight", "pretrained_family", "pretrained", "a file"])
def test_the_flat_spelling_is_one_line_naming_the_new_one(yaml_text: str | None, argument: str | None,
                                                          line: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run"]
    if yaml_text is not None:
        (tmp_path / "old.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "old.yaml")]
    err = refused(argv + ([argument] if argument else []), capsys, tmp_path / "run")
    assert err.startswith("lfmri fit: error: ") and line in err, err
    assert (str(tmp_path / "old.yaml") in err) == (yaml_text is not None)  # the file it came from


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
