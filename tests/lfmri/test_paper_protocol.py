"""The paper protocol script (experiments/paper/run.py) end to end at absurdly small settings, and its parts.

The end-to-end run takes the --small path exactly as `make demo` does (`lfmri export` of the shipped reference
prior, fine-tune through `model.init_args.pretrained`, scratch, `lfmri evaluate`, compare.py), with two steps,
one slice of the test subject (Colin27) and one bundled pseudo-subject per split.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO

from diffusion.checkpoint import SHIPPED_CHECKPOINTS

PAPER = REPO / "experiments" / "paper"
REGIMES = ("noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0")


def load_script(name: str):
    """Import experiments/paper/<name>.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(PAPER))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PAPER))
    return module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(PAPER / "run.py"), "bundled", "--small", "--out", str(out), "--jobs", "2",
           "--finetune-steps", "2", "--eval-steps", "2",
           "--max-slices-per-volume", "1", "--baselines", "tv",
           "--set", "data.init_args.source={class_path: datamodules.sources.BundledSource, "
                    "init_args: {n_train: 1, n_val: 1}}",
           "--set", "trainer.limit_val_batches=0", "--set", "trainer.enable_progress_bar=false",
           "--set", "trainer.enable_model_summary=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.e2e
def test_small_protocol_runs_every_stage_and_writes_the_comparison(small_run):
    out = small_run
    stages = [s["stage"] for s in json.loads((out / "protocol.json").read_text())["steps"]]
    assert stages[0] == "export" and stages[-1] == "compare"
    assert set(stages[1:3]) == {"finetune", "scratch"}  # side by side: in the order they finished
    assert set(stages[3:6]) == {"eval_finetune", "eval_scratch", "eval_prior"}  # + the starting prior
    table = (out / "comparison.md").read_text()
    assert "0.758 ± 0.050" in table and "19.25 ± 1.56" in table  # the paper's figures beside ours
    assert "fine-tuned" in table and "from scratch" in table and "Paired difference" in table
    assert "starting prior" in table and table.count("Paired difference") == 2
    assert "lfmri export --ckpt reference-small" in (out / "protocol.md").read_text()  # the shipped prior


@pytest.mark.slow
@pytest.mark.e2e
def test_the_fine_tune_imports_the_exported_score_sde_checkpoint(small_run):
    out = small_run
    exported = torch.load(out / "clinical.pth", map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "step"} <= set(exported)  # score_sde's format
    assert all(k.startswith("module.") for k in exported["model"])
    finetune = yaml.safe_load((out / "finetune" / "config.yaml").read_text())["model"]["init_args"]
    scratch = yaml.safe_load((out / "scratch" / "config.yaml").read_text())["model"]["init_args"]
    assert finetune["pretrained"]["path"] == str(out / "clinical.pth") and scratch["pretrained"] is None
    # the same model otherwise; each at its own recipe's rate: the fine-tune's 1e-4, the quickstart's 1e-3
    assert (finetune["optim"]["lr"], scratch["optim"]["lr"]) == (1e-4, 1e-3)
    assert {**finetune["optim"], "lr": None} == {**scratch["optim"], "lr": None}
    assert {k: v for k, v in finetune.items() if k not in ("pretrained", "optim")} == \
        {k: v for k, v in scratch.items() if k not in ("pretrained", "optim")}
    ckpt = torch.load(out / "finetune" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["pretrained"]["path"] == str(out / "clinical.pth")
    shipped = torch.load(SHIPPED_CHECKPOINTS["reference-small"], map_location="cpu", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(exported["ema"]["shadow_params"],
                                                 shipped["ema"]["shadow_params"], strict=True))


@pytest.mark.slow
@pytest.mark.e2e
def test_both_models_are_evaluated_on_the_same_held_out_volumes_in_all_regimes(small_run):
    rows = {name: list(csv.DictReader((small_run / f"eval_{name}" / "results.csv").open()))
            for name in ("finetune", "scratch", "prior")}
    keys = {name: {(r["volume_id"], r["regime"]) for r in rs if r["method"] == "lfmri"}
            for name, rs in rows.items()}
    assert keys["finetune"] == keys["scratch"] == keys["prior"]
    assert {regime for _, regime in keys["finetune"]} == set(REGIMES)
    assert {volume_id for volume_id, _ in keys["finetune"]} == {"real-colin27"}  # the bundled held-out one
    assert {r["method"] for r in rows["finetune"]} == {"degraded", "tv", "lfmri"}
    assert {r["method"] for r in rows["scratch"]} == {"degraded", "lfmri"}  # tuned baselines only once
    assert {r["method"] for r in rows["prior"]} == {"degraded", "lfmri"}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_second_run_into_the_same_folder_needs_overwrite(small_run):
    run = load_script("run")
    with pytest.raises(run.ProtocolError, match="--overwrite"):
        run.prepare_out(small_run, overwrite=False)


def test_full_protocol_without_clinical_weights_is_refused(capsys):
    run = load_script("run")
    with pytest.raises(SystemExit) as stop:
        run.parse_args(["/data/mouse"])
    assert stop.value.code == 2 and "--pretrained" in capsys.readouterr().err


def test_split_holds_out_exactly_n_test_and_n_val_subjects(tmp_path):
    run = load_script("run")
    data = tmp_path / "mouse"
    for i in range(14):
        (data / f"sub-{i:02d}" / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((8, 8, 4), dtype=np.float32), np.eye(4)),
                 data / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T2w.nii.gz")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "datamodules.LowFieldDataModule",
                                               "init_args": {"source": str(data),
                                                             "slices": {"image_size": 8}}}}))
    split = yaml.safe_load(run.write_split(config, tmp_path, n_test=10, n_val=2, seed=0).read_text())
    assert (len(split["test"]), len(split["val"]), len(split["train"])) == (10, 2, 2)
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == {f"sub-{i:02d}" for i in range(14)}
    with pytest.raises(run.ProtocolError, match="holds 14 subject"):
        run.write_split(config, tmp_path, n_test=10, n_val=4, seed=0)


def write_results(path: Path, rows: list[tuple[str, str, str, float, float, float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["volume_id", "regime", "method", "ssim", "psnr", "nmse", "n_slices"])
        writer.writerows([*r, 4] for r in rows)
    return path


def test_compare_puts_the_paper_beside_us_and_pairs_the_difference_by_volume(tmp_path, capsys):
    compare = load_script("compare")
    a = write_results(tmp_path / "a.csv", [
        ("s1", "noise", "degraded", 0.3, 20.0, 0.2), ("s1", "noise", "lfmri", 0.7, 30.0, 0.02),
        ("s2", "noise", "degraded", 0.5, 22.0, 0.1), ("s2", "noise", "lfmri", 0.5, 26.0, 0.04)])
    b = write_results(tmp_path / "b.csv", [
        ("s1", "noise", "lfmri", 0.6, 31.0, 0.03), ("s2", "noise", "lfmri", 0.4, 25.0, 0.05)])
    out = tmp_path / "cmp.md"
    assert compare.main([f"tuned={a}", f"scratch={b}", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    # SSIM row: paper, degraded, tuned, scratch; mean ± sample std across the 2 volumes
    assert "| noise | 0.758 ± 0.050 | 0.400 ± 0.141 | 0.600 ± 0.141 | 0.500 ± 0.141 |" in text
    assert "| noise | 2.42 ± 0.77 | 15.00 ± 7.07 | 3.00 ± 1.41 | 4.00 ± 1.41 |" in text  # NMSE in %
    # paired: dSSIM = (+0.1, +0.1), dPSNR = (-1, +1), dNMSE = (-1, -1) %; wins 2 / 1 / 2 of 2
    assert "| noise | +0.100 ± 0.000 | +0.00 ± 1.41 | -1.00 ± 0.00 | 2 / 1 / 2 of 2 |" in text
    legacy = tmp_path / "legacy.csv"  # older files name the volume_id column "subject"
    legacy.write_text(a.read_text().replace("volume_id,", "subject,", 1))
    assert compare.read_results(legacy) == compare.read_results(a)
    assert compare.main([f"x={a}", f"x={b}"]) == 2  # labels must differ
    assert compare.main([f"x={tmp_path / 'missing.csv'}"]) == 2
