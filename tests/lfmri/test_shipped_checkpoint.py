"""The shipped reference prior: short names (`--ckpt reference-small`, `pretrained: {path: reference-small}`),
the slim EMA-only file that `experiments/ship_reference.py` writes, and the real shipped file itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_MODEL

from diffusion import checkpoint as ckpt_mod
from diffusion.checkpoint import SHIPPED_CHECKPOINTS, resolve_checkpoint
from lfmri.models import load_score_model, read_lightning_checkpoint, slim_checkpoint
from lfmri_utils.errors import InputError
from lightning_modules.module import ScoreModel
from lightning_modules.priors import PretrainedSource

SHIPPED = SHIPPED_CHECKPOINTS["reference-small"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, save_score_model) -> tuple[Path, ScoreModel]:
    """A tiny checkpoint whose EMA weights differ from its raw weights (as after training)."""
    torch.manual_seed(0)
    model = ScoreModel(**TINY_MODEL)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # raw weights move; the EMA keeps the initial ones
    path = save_score_model(tmp_path_factory.mktemp("ship") / "last.ckpt", model)
    return path, model


def _param_bytes(model: ScoreModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.net.parameters())


def test_slim_file_holds_the_ema_weights_once(trained: tuple[Path, ScoreModel], tmp_path: Path) -> None:
    path, model = trained
    slim = tmp_path / "slim.ckpt"
    torch.save(slim_checkpoint(path, {"wall_s": 1.0}), slim)
    loaded = load_score_model(slim, torch.device("cpu"))
    for p, shadow in zip(loaded.net.parameters(), model.ema.shadow_params, strict=True):
        assert torch.equal(p, shadow)  # the network's weights are the EMA weights...
    for p, shadow in zip(loaded.net.parameters(), loaded.ema.shadow_params, strict=True):
        assert torch.equal(p, shadow)  # ...and the EMA state is the same
    assert not all(torch.equal(a, b) for a, b in zip(loaded.net.parameters(), model.net.parameters(),
                                                     strict=True))
    # stored once: the file is far smaller than two copies of the weights
    assert slim.stat().st_size < 1.5 * _param_bytes(model) + 200_000
    ckpt = read_lightning_checkpoint(slim)
    assert ckpt["lfmri"] == {"wall_s": 1.0} and ckpt["hyper_parameters"]["pretrained"] is None
    assert "optimizer_states" not in ckpt


def test_short_name_resolves_and_a_missing_shipped_file_is_named(trained: tuple[Path, ScoreModel],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = trained
    monkeypatch.setitem(ckpt_mod.SHIPPED_CHECKPOINTS, "tiny-test", path)
    assert resolve_checkpoint("tiny-test") == path
    assert resolve_checkpoint(tmp_path / "x.ckpt") == tmp_path / "x.ckpt"  # other values are paths
    assert load_score_model("tiny-test", torch.device("cpu")).net.config == TINY_MODEL["net"]
    monkeypatch.setitem(ckpt_mod.SHIPPED_CHECKPOINTS, "tiny-test", tmp_path / "gone.ckpt")
    with pytest.raises(InputError, match=r"tiny-test: the shipped checkpoint .*gone\.ckpt is missing"):
        load_score_model("tiny-test", torch.device("cpu"))


def test_fine_tuning_starts_from_a_lightning_checkpoint_by_short_name(trained: tuple[Path, ScoreModel],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = trained
    monkeypatch.setitem(ckpt_mod.SHIPPED_CHECKPOINTS, "tiny-test", path)
    student = ScoreModel(**TINY_MODEL, pretrained=PretrainedSource("tiny-test"))
    student.load_pretrained()
    for p, shadow in zip(student.net.parameters(), model.ema.shadow_params, strict=True):
        assert torch.equal(p, shadow)  # pretrained.weights="ema" by default
    raw = ScoreModel(**TINY_MODEL, pretrained=PretrainedSource("tiny-test", weights="model"))
    raw.load_pretrained()
    for p, q in zip(raw.net.parameters(), model.net.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.e2e
def test_ship_reference_script_writes_the_slim_file(trained: tuple[Path, ScoreModel], tmp_path: Path) -> None:
    path, model = trained
    out = tmp_path / "reference.ckpt"
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "ship_reference.py"), str(path),
                           "--out", str(out), "--wall-s", "12.5"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    ckpt = read_lightning_checkpoint(out)
    assert ckpt["lfmri"]["wall_s"] == 12.5 and "reference_small.yaml" in ckpt["lfmri"]["command"]
    assert all(torch.equal(a, b) for a, b in zip(ckpt["ema"]["shadow_params"], model.ema.shadow_params,
                                                 strict=True))
