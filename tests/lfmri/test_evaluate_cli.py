"""`lfmri evaluate` end to end on the bundled data (tiny model, one slice per subject) and its bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest

from lfmri.cli import main
from lfmri.evaluation import CSV_COLUMNS
from lightning_modules.module import ScoreModel

SCORE_SDE_CKPT = Path(__file__).resolve().parents[1] / "fixtures" / "score_sde_tiny" / "checkpoint.pth"
CONFIG = """\
trainer:
  max_epochs: 1
model:
  class_path: lightning_modules.module.ScoreModel
  init_args:
    nf: 8
data:
  class_path: datamodules.LowFieldDataModule
  init_args:
    source: bundled
    image_size: {size}
    bundled_train_subjects: 1
    bundled_val_subjects: 1
    eval_slices_per_volume: 2
"""
REGIMES = "noise,noise_blur_t2star_b0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ScoreModel checkpoint (trained size 32) and a data config resizing slices to 32 x 32."""
    d = tmp_path_factory.mktemp("evaluate")
    model = ScoreModel(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=32,
                       num_groups=4, dropout=0.0, warmup_steps=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(d / "tiny.ckpt")
    (d / "data.yaml").write_text(CONFIG.format(size=32))
    return {"ckpt": d / "tiny.ckpt", "config": d / "data.yaml"}


def _argv(setup: dict[str, Path], out: Path, *extra: str, ckpt: Path | None = None,
          config: Path | None = None) -> list[str]:
    return ["evaluate", "--ckpt", str(ckpt or setup["ckpt"]), "--config", str(config or setup["config"]),
            "--regimes", REGIMES, "--out", str(out), "--steps", "2", "--max-slices-per-subject", "1",
            "--device", "cpu", *extra]


def test_evaluate_writes_well_formed_results_and_tunes_on_validation_only(
        setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    assert main(_argv(setup, out, "--baselines", "all")) == 0
    printed = capsys.readouterr().out
    names = ["figure.png", "results.csv", "results.json", "results.md"]
    assert sorted(p.name for p in out.iterdir()) == names

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    test_subjects = {"real-nibabel-anatomical", "real-nibabel-epi"}  # the bundled source's held-out volumes
    assert {r["subject"] for r in rows} == test_subjects
    assert {(r["regime"], r["method"]) for r in rows} == {
        (g, m) for g in REGIMES.split(",") for m in ("degraded", "tv", "nlm", "lfmri")}
    assert len(rows) == 2 * 2 * 4 and all(r["n_slices"] == "1" for r in rows)
    assert all(-1 <= float(r["ssim"]) <= 1 and float(r["nmse"]) >= 0 for r in rows)

    payload = json.loads((out / "results.json").read_text())
    for regime in REGIMES.split(","):
        for name in ("tv", "nlm"):
            tuned = payload["tuned_baselines"][regime][name]
            assert tuned["subjects"] == ["pseudo-mni-val-000"]  # validation, never test
            assert set(tuned["params"]) == {"tv": {"weight_factor"}, "nlm": {"h_factor"}}[name]
    assert payload["settings"]["sampler"] == "warm_ddim" and payload["settings"]["steps"] == 2

    md = (out / "results.md").read_text()
    assert md in printed
    assert "| regime | SSIM | PSNR (dB) | NMSE (%) |" in md and "| noise + blur + T2* + B0 |" in md
    assert "weight_factor=" in md and "h_factor=" in md
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def _fails(argv: list[str], capsys: pytest.CaptureFixture, out: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(".*"))  # no temporary folder left behind
    return err


def test_bad_inputs_exit_2_and_write_nothing(setup: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00garbage")
    assert "score_sde" in _fails(_argv(setup, out, ckpt=SCORE_SDE_CKPT), capsys, out)
    assert "junk.ckpt" in _fails(_argv(setup, out, ckpt=junk), capsys, out)
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text("trainer:\n  max_epochs: 1\n")
    assert "data" in _fails(_argv(setup, out, config=no_data), capsys, out)
    assert "bogus" in _fails(_argv(setup, out, "--regimes", "noise,bogus"), capsys, out)
    assert "bm3d" in _fails(_argv(setup, out, "--baselines", "bm3d"), capsys, out)
    assert "sampler" in _fails(_argv(setup, out, "--sampler", "euler"), capsys, out)
    out.mkdir()
    assert "samples" in _fails(_argv(setup, out, "--samples", "0"), capsys, out)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(_argv(setup, a_file)) == 2 and a_file.read_text() == "x"
