"""Evaluation outputs: summary statistics, the paper-format table, the CSV round trip and atomic writing."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO

from degradations import channels_to_complex, fft2c, neutral_params, regime_label
from diffusion.sampling.samplers import build_sampler
from lfmri.baselines import TuningResult
from lfmri.evaluation import run_evaluation
from lfmri.results import (
    CSV_COLUMNS,
    EvaluationResult,
    ResultRow,
    SliceRow,
    format_benchmark,
    format_markdown,
    read_csv,
    summarise,
    write_files_atomically,
    write_results,
)


def _result() -> EvaluationResult:
    rows = []
    for method, base, seconds in (("degraded", 0.3, 0.001), ("tv", 0.5, 0.05), ("lfmri", 0.7, 2.0)):
        for regime in ("noise", "noise_blur_t2star_b0"):
            for i, vid in enumerate(("s1", "s2", "s3")):
                rows.append(ResultRow(vid, regime, method, base + 0.01 * i, 20.0 + i, 0.02 + 0.01 * i, 4,
                                      seconds * (1 + i)))
    tv = TuningResult({"weight_factor": 1.5}, 0.5, ["v1"])
    tuned = {"degraded": TuningResult({}, 0.3, ["v1"]), "tv": tv}
    tuning = {g: dict(tuned) for g in ("noise", "noise_blur_t2star_b0")}
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    panels = {g: {"degraded": img, "tv": img, "lfmri": img * 0.9, "reference": img} for g in tuning}
    return EvaluationResult(rows=rows, tuning=tuning, panels=panels, settings={"sampler": "pc", "steps": 10})


def test_regime_labels_follow_the_paper() -> None:
    assert regime_label("noise") == "noise"
    assert regime_label("noise_blur_t2star_b0") == "noise + blur + T2* + B0"


def test_summary_is_mean_and_sample_std_across_volumes() -> None:
    stats = summarise(_result().rows)["tv"]["noise"]
    assert stats["ssim"][0] == pytest.approx(0.51)
    assert stats["ssim"][1] == pytest.approx(np.std([0.5, 0.51, 0.52], ddof=1))
    assert stats["psnr"] == pytest.approx((21.0, 1.0, 3))


def test_a_single_volume_is_summarised_over_its_slices() -> None:
    rows = [ResultRow("s1", "noise", m, 0.5, 20.0, 0.1, 3, 1.0) for m in ("tv", "lfmri", "lfmri_pc")]
    slices = [SliceRow("s1", "noise", m, i, base + 0.1 * i, 20.0 + i, 0.1) for m, base in
              (("tv", 0.4), ("lfmri", 0.6), ("lfmri_pc", 0.5)) for i in range(3)]
    result = EvaluationResult(rows=rows, slice_rows=slices)
    stats = summarise(rows, slices)
    assert stats["lfmri"]["noise"]["ssim"] == pytest.approx((0.7, 0.1, 3))
    assert stats["tv"]["noise"]["psnr"] == pytest.approx((21.0, 1.0, 3))
    assert stats["tv"]["noise"]["seconds_per_slice"] == pytest.approx((1.0, 0.0, 1))  # from the volume rows
    assert summarise(rows)["lfmri"]["noise"]["ssim"] == pytest.approx((0.5, 0.0, 1))  # without slices
    table = format_benchmark(result)
    ssim = table.split("### PSNR")[0]
    assert [line.split(" | ")[0] for line in ssim.splitlines() if line.startswith("| ") and "±" in line] == \
        ["| tv", "| lfmri", "| lfmri_pc"]  # baselines first, then ours
    assert "| lfmri | **0.700 ± 0.100** | 1 |" in ssim  # the best mean of the regime in bold
    assert "over its 3 slices" in format_markdown(result)


def test_markdown_has_one_paper_format_block_per_method_and_the_tuned_parameters() -> None:
    md = format_markdown(_result())
    blocks = md.split("\n## ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["degraded", "tv", "lfmri"]
    assert "| regime | SSIM | PSNR (dB) | NMSE (%) | s / slice |" in blocks[0]
    assert "| noise | 0.710 ± 0.010 | 21.00 ± 1.00 | 3.00 ± 1.00 | 4 |" in blocks[2]  # mean seconds per slice
    assert "| noise | 0.310 ± 0.010 | 21.00 ± 1.00 | 3.00 ± 1.00 | 0.002 |" in blocks[0]
    assert "| noise + blur + T2* + B0 |" in blocks[2]
    assert "weight_factor=1.5" in blocks[1] and "v1" in blocks[1]
    assert "weight_factor" not in blocks[0]


def test_write_results_writes_well_formed_files(tmp_path: Path) -> None:
    result = _result()
    out = tmp_path / "new" / "out"
    paths = write_results(result, out)
    assert sorted(p.name for p in paths) == ["figure.png", "results.csv", "results.json", "results.md"]
    with open(out / "results.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == CSV_COLUMNS
    back = read_csv(out / "results.csv")
    assert len(back) == 18 and back[0].method == "degraded" and back[0].n_slices == 4
    assert back[4].ssim == pytest.approx(result.rows[4].ssim)
    assert [r.seconds_per_slice for r in back] == pytest.approx([r.seconds_per_slice for r in result.rows])
    payload = json.loads((out / "results.json").read_text())
    assert payload["tuned_baselines"]["noise"]["tv"] == {"params": {"weight_factor": 1.5}, "val_ssim": 0.5,
                                                         "volume_ids": ["v1"]}
    assert payload["summary"]["lfmri"]["noise"]["seconds_per_slice"]["mean"] == pytest.approx(4.0)
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text() == format_markdown(result)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize("exists", [False, True])
def test_a_failing_writer_leaves_out_untouched(tmp_path: Path, exists: bool) -> None:
    out = tmp_path / "out"
    if exists:
        out.mkdir()

    def boom(path: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_files_atomically(out, {"a.txt": lambda p: p.write_text("a"), "b.txt": boom})
    assert out.exists() == exists
    assert not exists or list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if exists else [])


#: writes NAMES ("new <name>") into sys.argv[1] with write_files_atomically, SIGKILLed at its sys.argv[2]-th
#: os.rename / os.replace call (the moments a kill can split an update)
_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from lfmri.results import write_files_atomically
calls = [0]
def counted(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
os.rename, os.replace = counted(os.rename), counted(os.replace)
write_files_atomically(sys.argv[1], {n: (lambda p, n=n: Path(p).write_text("new " + n)) for n in %r})
"""
NAMES = ("results.csv", "results.md", "results.json")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_an_existing_out_folder_is_replaced_all_or_nothing_if_killed(tmp_path: Path, kill_at: int) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    for name in NAMES:
        (out / name).write_text("old " + name)
    (out / "notes.txt").write_text("mine")  # a file of the user's: kept
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE % (NAMES,), str(out), str(kill_at)],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]

    def boom(path: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):  # the next run (failing here) first puts back what a kill set aside
        write_files_atomically(out, {"results.csv": boom})
    contents = {(out / name).read_text() for name in NAMES}
    assert contents in ({"old " + n for n in NAMES}, {"new " + n for n in NAMES}), contents
    assert (out / "notes.txt").read_text() == "mine"
    write_files_atomically(out, {n: (lambda p, n=n: p.write_text("new " + n)) for n in NAMES})
    assert {(out / name).read_text() for name in NAMES} == {"new " + n for n in NAMES}
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # nothing left beside it


def test_results_json_is_standard_json(tmp_path: Path) -> None:
    result = _result()
    result.rows[0] = ResultRow("s1", "noise", "degraded", 1.0, float("inf"), 0.0, 4)  # a perfect result
    write_results(result, tmp_path / "out")

    def refuse(name: str) -> None:
        raise ValueError(f"not standard JSON: {name}")

    payload = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=refuse)
    assert payload["rows"][0]["psnr"] is None


def test_a_results_csv_without_timings_reads_back_with_nan(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"  # an older file: no timings, and its volume_id column named "subject"
    path.write_text("subject,regime,method,ssim,psnr,nmse,n_slices\ns1,noise,tv,0.5,20,0.02,4\n")
    (row,) = read_csv(path)
    assert row.ssim == 0.5 and np.isnan(row.seconds_per_slice)
    assert row.volume_id == "s1"
    assert "| – |" in format_markdown(EvaluationResult(rows=[row]))


class _FakeDataModule:
    """2 validation and 2 test volumes (noisy copies of one smooth image); records the splits it is asked."""

    regime_overrides: dict = {}

    def __init__(self) -> None:
        self.requested: list[tuple[str, str]] = []
        self.volume_ids = {"val": ["val-a", "val-b"], "test": ["test-a", "test-b"]}

    def volumes(self, split: str, regime: str):
        self.requested.append((split, regime))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        image = (xx**2 + yy**2 < 0.6).float() * (1 + 0.3 * xx)
        for i, volume_id in enumerate(self.volume_ids[split]):
            g = torch.Generator().manual_seed(i)
            clean = torch.stack([image, torch.zeros_like(image)])[None].repeat(2, 1, 1, 1)
            degraded = clean + 0.1 * torch.randn(clean.shape, generator=g)
            params = neutral_params(2, 16, 16)
            params["noise_sigma"] = torch.full((2,), 0.1 * 2**0.5)  # 0.1 per real channel: known std
            y = fft2c(channels_to_complex(degraded))
            yield SimpleNamespace(volume_id=volume_id, clean=clean, degraded=degraded, y=y, params=params,
                                  slices=torch.arange(2))


def test_protocol_tunes_on_validation_and_scores_test_volumes() -> None:
    dm = _FakeDataModule()
    model = SimpleNamespace(score_fn=lambda: (lambda x, t: torch.zeros_like(x)), data_scale=None)
    sampler = build_sampler("ddim", steps=1, dc="gradient", dc_weight=1.0)  # zero score + full DC: the data
    names = ["degraded", "tv", "tv_complex", "tv_model"]
    result = run_evaluation(model, dm, ["noise"], names, sampler, batch_size=1)
    assert dm.requested == [("val", "noise"), ("test", "noise")]
    assert result.tuning["noise"]["tv"].volume_ids == ["val-a", "val-b"]
    assert set(result.tuning["noise"]) == {"tv", "tv_complex", "tv_model"}
    assert {r.volume_id for r in result.rows} == {"test-a", "test-b"}
    by = {(r.volume_id, r.method): r for r in result.rows}
    for volume_id in ("test-a", "test-b"):
        assert by[volume_id, "lfmri"].ssim == pytest.approx(by[volume_id, "degraded"].ssim, abs=1e-4)
        for name in names[1:]:
            assert by[volume_id, name].ssim > by[volume_id, "degraded"].ssim
    assert all(np.isfinite(r.seconds_per_slice) and r.seconds_per_slice >= 0 for r in result.rows)
    assert list(result.panels["noise"]) == [*names, "lfmri", "reference"]
