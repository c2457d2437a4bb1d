"""experiments/benchmarks/gpu.py, the script of a lent GPU session, run here in its `--tiny` CPU form: every
stage records numbers, the files that come back stay within the limits, a failing stage is recorded while the
others still run, and the budget skips what no longer fits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import script_module

from diffusion.sampling.samplers import build_sampler

GPU_PY = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "gpu.py"
STAGES = ("sampling_fp32", "sampling_bf16", "train_step_fp32", "train_step_bf16", "fit", "evaluate")

pytestmark = pytest.mark.usefixtures("one_thread", "lightning_logs_to_stderr")


@pytest.fixture(scope="module")
def gpu():
    with script_module(GPU_PY, "bench_gpu") as module:
        yield module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_files(out: Path, gpu) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= gpu.MAX_FILES
    assert all(p.stat().st_size < gpu.MAX_FILE_BYTES for p in files)
    assert {p.name for p in files} <= set(gpu.OUTPUT_FILES)


@pytest.mark.slow
def test_tiny_run_measures_every_stage(gpu, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu.main(["--out", str(out), "--tiny"]) == 0
    report = json.loads((out / "gpu.json").read_text())
    assert report["tiny"] and report["device_name"] and report["torch"]
    stages = report["stages"]
    assert tuple(stages) == STAGES
    assert all(stages[name]["status"] == "ok" for name in STAGES), stages
    assert all(_positive(stages[name]["stage_s"]) for name in STAGES)
    expected_nfe = build_sampler(None).expected_nfe  # the registry's default, whichever it is today
    for name in ("sampling_fp32", "sampling_bf16"):
        s = stages[name]
        assert s["nfe_per_slice"] == s["expected_nfe"] == expected_nfe
        assert _positive(s["s_per_slice"]) and _positive(s["s_per_30_slice_volume"])
        assert s["batch_size"] == s["slices"] == 2
    assert stages["sampling_bf16"]["autocast_bf16"] and not stages["sampling_fp32"]["autocast_bf16"]
    for name in ("train_step_fp32", "train_step_bf16"):
        assert _positive(stages[name]["step_ms_median"]) and _positive(stages[name]["samples_per_s"])
    fit = stages["fit"]
    assert fit["optimizer_steps"] == 2 and _positive(fit["train/loss"]) and fit["prior_ckpt"] == "prior.ckpt"
    evaluate = stages["evaluate"]
    for method in ("degraded", "lfmri"):
        ssim = evaluate["summary"][method]["noise"]["ssim"]["mean"]
        assert 0 < ssim <= 1
    assert _positive(evaluate["summary"]["lfmri"]["noise"]["seconds_per_slice"]["mean"])
    assert "| lfmri |" in evaluate["table_md"]
    assert [f["name"] for f in report["files"]] == sorted(
        ["gpu.json", "gpu.md", "fit_metrics.csv", "eval_figure.png", "prior.ckpt"])
    _check_files(out, gpu)
    md = (out / "gpu.md").read_text()
    assert "Default sampler" in md and "Training step" in md and "| lfmri |" in md

    # the small prior that came back is an lfmri checkpoint
    from lfmri.models import load_score_model

    load_score_model(out / "prior.ckpt", "cpu")


@pytest.mark.slow
def test_a_failing_stage_is_recorded_and_the_others_run(gpu, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    calls = []

    def fake_fit(plan, work, out, device, max_time_s, lr, precision):
        calls.append("fit")
        ckpt = work / "fit" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.touch()
        return {"network_parameters": 1, "optimizer_steps": 2, "wall_s": 1.0, "steps_per_s": 2.0,
                "max_time_s": None, "prior_ckpt": "skipped"}

    def fake_evaluate(plan, work, out, ckpt, device, baselines, jobs, deadline_s):
        calls.append("evaluate")
        assert ckpt.is_file()
        return {"summary": {}}

    monkeypatch.setattr(gpu, "train_step_timing", broken)
    monkeypatch.setattr(gpu, "run_fit", fake_fit)
    monkeypatch.setattr(gpu, "run_evaluate", fake_evaluate)
    out = tmp_path / "out"
    assert gpu.main(["--out", str(out), "--tiny"]) == 1
    stages = json.loads((out / "gpu.json").read_text())["stages"]
    assert tuple(stages) == STAGES
    for name in ("train_step_fp32", "train_step_bf16"):
        assert stages[name]["status"] == "error"
        assert stages[name]["error"] == "RuntimeError: planted failure"
        assert "planted failure" in stages[name]["traceback"]
    for name in ("sampling_fp32", "sampling_bf16", "fit", "evaluate"):  # before and after the failure
        assert stages[name]["status"] == "ok"
    assert calls == ["fit", "evaluate"]
    assert "RuntimeError: planted failure" in (out / "gpu.md").read_text()
    _check_files(out, gpu)


def test_the_budget_skips_what_does_not_fit(gpu, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu.main(["--out", str(out), "--tiny", "--budget-s", "0"]) == 1
    stages = json.loads((out / "gpu.json").read_text())["stages"]
    assert tuple(stages) == STAGES
    assert all(stages[name]["status"] == "skipped" for name in STAGES)
    assert "budget" in stages["sampling_fp32"]["reason"]
    assert [f["name"] for f in json.loads((out / "gpu.json").read_text())["files"]] == ["gpu.json", "gpu.md"]
