"""`lfmri export`: a ScoreModel Lightning checkpoint -> score_sde format, loadable with identical outputs."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_NET, slice_sample
from torch.utils.data import DataLoader

from diffusion.checkpoint import load_score_sde_checkpoint
from diffusion.networks.ddpm import DDPMConfig
from diffusion.networks.families import load_pretrained
from lfmri import cli
from lightning_modules.module import OptimConfig, ScoreModel

pytestmark = pytest.mark.usefixtures("one_thread")


def batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(8, 2, 16, 16, generator=g)
    samples = [slice_sample(c, c + 0.2 * torch.randn(c.shape, generator=g), i) for i, c in enumerate(clean)]
    return DataLoader(samples, batch_size=4)


def main(argv: list[str]) -> int:
    return cli.main(argv)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> tuple[ScoreModel, Path]:
    tmp = tmp_path_factory.mktemp("export")
    model = ScoreModel(net=DDPMConfig(**TINY_NET), optim=OptimConfig(lr=1e-3, warmup_steps=1, ema_decay=0.5))
    tr = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    tr.fit(model, batches())
    tr.save_checkpoint(tmp / "run.ckpt")
    return model, tmp / "run.ckpt"


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_export_round_trip(lightning_ckpt, tmp_path, capsys, weights):
    model, ckpt = lightning_ckpt
    out = tmp_path / "finetuned.pth"
    assert main(["export", "--ckpt", str(ckpt), str(out), "--weights", weights, "--force"]) == 0
    assert str(out) in capsys.readouterr().out
    config = tmp_path / "finetuned.json"
    assert config.is_file()
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([0.1, 0.9])
    labels = 999 * t
    ema_ref, raw_ref = model.frozen_net(use_ema=True), model.frozen_net(use_ema=False)
    with torch.no_grad():
        for loaded_weights, ref in (("ema", ema_ref), ("model", ema_ref if weights == "ema" else raw_ref)):
            net = load_score_sde_checkpoint(out, config, weights=loaded_weights)
            torch.testing.assert_close(net(x, labels), ref(x, labels), rtol=0, atol=0)
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert blob["step"] == 3 and blob["ema"]["num_updates"] == 3 and blob["ema"]["decay"] == 0.5
    assert all(k.startswith("module.") for k in blob["model"]) and "module.sigmas" in blob["model"]
    # what score_sde's own code needs to run the file: its SDE and learning rate
    fields = json.loads(config.read_text())
    assert fields["training"] == {"sde": "vpsde", "continuous": True}
    assert (fields["model"]["beta_min"], fields["model"]["beta_max"]) == (model.sde.beta_min,
                                                                          model.sde.beta_max)
    assert fields["optim"]["lr"] == 1e-3 == blob["optimizer"]["param_groups"][0]["lr"]
    # the family importer reads it back as a score_sde checkpoint: the same score as the lfmri model
    prior = load_pretrained(out, config, family="score_sde", weights="ema")
    torch.testing.assert_close(prior.score(x, t), model.score_fn(use_ema=True)(x, t), rtol=1e-6, atol=1e-6)


def test_export_refuses_a_network_score_sde_would_run_wrong(lightning_ckpt, tmp_path, capsys):
    _, ckpt = lightning_ckpt
    out = tmp_path / "out.pth"
    assert main(["export", "--ckpt", str(ckpt), str(out)]) == 2  # num_groups 8: score_sde hard-codes 32
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_groups = 8" in err[0] and "--force" in err[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_export_of_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.ckpt"
    bad.write_text("not a checkpoint")
    assert main(["export", "--ckpt", str(bad), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lfmri export: error:") and "broken.ckpt" in err and "\n" not in err
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "other.ckpt"), str(tmp_path / "o.pth")]) == 2
    assert "not a ScoreModel checkpoint" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tmp_path / "absent.ckpt"), str(tmp_path / "o.pth")]) == 2
    assert not (tmp_path / "o.pth").exists()


def test_export_checks_its_suffix_and_never_replaces_another_kind_of_file(lightning_ckpt, tmp_path, capsys):
    """Issue 14, item 9: `lfmri export --ckpt C brain.nii.gz` used to overwrite the volume."""
    _, ckpt = lightning_ckpt
    volume = tmp_path / "brain.nii.gz"
    volume.write_bytes(b"\x1f\x8b a NIfTI volume")
    assert main(["export", "--ckpt", str(ckpt), str(volume)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lfmri export: error: OUT {volume}: must end with .pth or .pt"
    assert volume.read_bytes() == b"\x1f\x8b a NIfTI volume"
    notes = tmp_path / "notes.pth"
    notes.write_text("my notes")
    assert main(["export", "--ckpt", str(ckpt), str(notes)]) == 2
    assert "notes.pth: exists and is not a PyTorch checkpoint; not replaced" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    config = tmp_path / "settings.yaml"
    config.write_text("lr: 1\n")
    out = tmp_path / "ok.pth"
    assert main(["export", "--ckpt", str(ckpt), str(out), "--config-out", str(config)]) == 2
    assert "--config-out" in capsys.readouterr().err and config.read_text() == "lr: 1\n"
    (tmp_path / "ok.json").write_text("not json")
    assert main(["export", "--ckpt", str(ckpt), str(out)]) == 2
    assert "ok.json: exists and is not a JSON file; not replaced" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "ok.json").unlink()
    for _ in range(2):  # a previous export (a checkpoint and its JSON) is replaced
        assert main(["export", "--ckpt", str(ckpt), str(out), "--force"]) == 0
    assert torch.load(out, weights_only=True)["step"] == 3
