"""`lfmri evaluate` end to end on the bundled data (tiny model, one slice per subject) and its bad inputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from helpers import SCORE_SDE_CKPT, refused

from diffusion.sampling.samplers import DEFAULT_SAMPLER
from lfmri.baselines import BASELINES, available_baselines
from lfmri.cli import main
from lfmri.results import CSV_COLUMNS

CONFIG = """\
trainer:
  max_epochs: 1
model:
  class_path: lightning_modules.module.ScoreModel
  init_args:
    net: {{nf: 8}}
data:
  class_path: datamodules.LowFieldDataModule
  init_args:
    source:
      class_path: datamodules.sources.BundledSource
      init_args: {{n_train: 1, n_val: 1}}
    slices: {{image_size: {size}, eval_per_volume: 2}}
"""
REGIMES = "noise,noise_blur_t2star_b0"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tv_model with B0): one thread is faster


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """A tiny ScoreModel checkpoint (trained size 32) and a data config resizing slices to 32 x 32."""
    d = tmp_path_factory.mktemp("evaluate")
    (d / "data.yaml").write_text(CONFIG.format(size=32))
    return {"ckpt": tiny_checkpoint, "config": d / "data.yaml"}


def _argv(setup: dict[str, Path], out: Path, *extra: str, ckpt: Path | None = None,
          config: Path | None = None) -> list[str]:
    return ["evaluate", "--ckpt", str(ckpt or setup["ckpt"]), "--config", str(config or setup["config"]),
            "--regimes", REGIMES, "--out", str(out), "--sampling.steps", "2", "--max-slices-per-volume", "1",
            "--device", "cpu", *extra]


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_writes_well_formed_results_and_tunes_on_validation_only(
        setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("bm3d", "bm3d_complex"):  # seconds per call: one grid point is enough to test the wiring
        one_point = dataclasses.replace(BASELINES[name], grid={"sigma_factor": (1.0,)})
        monkeypatch.setitem(BASELINES, name, one_point)
    baselines = available_baselines()  # every core baseline, and BM3D where the extra is installed
    assert {"degraded", "tv", "nlm", "tv_complex", "nlm_complex", "tv_model"} <= set(baselines)
    out = tmp_path / "results"
    assert main(_argv(setup, out, "--baselines", "all", "--reference-pc-steps", "21",
                      "--also", "tweedie,warm_ddim:2")) == 0
    printed = capsys.readouterr().out
    names = ["figure.png", "results.csv", "results.json", "results.md", "slices.csv"]
    assert sorted(p.name for p in out.iterdir()) == names

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    test_volumes = {"real-colin27"}  # the bundled source's held-out subject's one volume
    assert {r["volume_id"] for r in rows} == test_volumes
    methods = [*baselines, "lfmri", "lfmri_tweedie", "lfmri_warm_ddim_mean2", "lfmri_pc"]
    assert {(r["regime"], r["method"]) for r in rows} == {(g, m) for g in REGIMES.split(",") for m in methods}
    assert len(rows) == 1 * 2 * len(methods) and all(r["n_slices"] == "1" for r in rows)
    assert all(-1 <= float(r["ssim"]) <= 1 and float(r["nmse"]) >= 0 for r in rows)
    seconds = [float(r["seconds_per_slice"]) for r in rows]
    assert all(math.isfinite(t) and t >= 0 for t in seconds)

    payload = json.loads((out / "results.json").read_text())
    for regime in REGIMES.split(","):
        assert set(payload["tuned_baselines"][regime]) == {n for n in baselines if BASELINES[n].grid}
        for name in (n for n in baselines if BASELINES[n].grid):
            tuned = payload["tuned_baselines"][regime][name]
            assert tuned["volume_ids"] == ["pseudo-mni-val-000"]  # validation, never test
            assert set(tuned["params"]) == set(BASELINES[name].grid)
    assert payload["settings"]["sampler"] == DEFAULT_SAMPLER and payload["settings"]["steps"] == 2
    settings = payload["settings"]
    assert settings["lfmri_warm_ddim_mean2: samples"] == 2 and settings["lfmri_tweedie: nfe"] == 1
    assert settings["lfmri_pc: sampler"] == "pc" and settings["lfmri_pc: dc_weight"] == 0.3
    assert payload["spread"].startswith("one test volume (real-colin27): mean ± std over its 1 slices")
    with open(out / "slices.csv", newline="") as fh:
        slice_rows = list(csv.DictReader(fh))
    assert len(slice_rows) == len(rows)  # one slice per volume here: the slice SSIM is the volume SSIM
    by_key = {(r["regime"], r["method"]): float(r["ssim"]) for r in rows}
    assert all(float(s["ssim"]) == pytest.approx(by_key[(s["regime"], s["method"])], abs=1e-6)
               for s in slice_rows)

    md = (out / "results.md").read_text()
    assert md in printed
    assert "| regime | SSIM | PSNR (dB) | NMSE (%) | s / slice |" in md
    assert "| noise + blur + T2* + B0 |" in md
    assert all(f"## {m}\n" in md for m in methods)
    assert "### SSIM\n" in md and "| method | noise | noise + blur + T2* + B0 | s / slice |" in md
    assert all(f"| {m} | " in md.split("### SSIM")[1] for m in methods)
    assert "weight_factor=" in md and "h_factor=" in md
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def _fails(argv: list[str], capsys: pytest.CaptureFixture, out: Path) -> str:
    err = refused(argv, capsys)
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
    assert "bogus" in _fails(_argv(setup, out, "--baselines", "tv,bogus"), capsys, out)
    assert "unknown sampler 'bogus'" in _fails(_argv(setup, out, "--also", "bogus"), capsys, out)
    assert "deterministic point estimate" in _fails(_argv(setup, out, "--also", "tweedie:4"), capsys, out)
    assert "deterministic point estimate" in _fails(_argv(setup, out, "--samples", "2"), capsys, out)
    no_bm3d = dataclasses.replace(BASELINES["bm3d"], module="lfmri_no_such_module")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BASELINES, "bm3d", no_bm3d)
        assert "lfmri[bm3d]" in _fails(_argv(setup, out, "--baselines", "bm3d"), capsys, out)
    assert "sampler" in _fails(_argv(setup, out, "--sampling.sampler", "euler"), capsys, out)
    out.mkdir()
    assert "samples" in _fails(_argv(setup, out, "--samples", "0"), capsys, out)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(_argv(setup, a_file)) == 2 and a_file.read_text() == "x"


def test_out_dot_writes_into_the_working_folder(setup: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` (a folder without a name of its own) gets the results, not a traceback after the work."""
    monkeypatch.chdir(tmp_path)
    assert main(_argv(setup, Path("."), "--baselines", "none", "--regimes", "noise")) == 0
    assert {"results.csv", "results.json", "results.md"} <= {p.name for p in tmp_path.iterdir()}
