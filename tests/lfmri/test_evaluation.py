"""Evaluation outputs: summary statistics, the paper-format table, the CSV round trip and atomic writing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from degradations import channels_to_complex, fft2c, neutral_params
from lfmri.baselines import TuningResult
from lfmri.evaluation import (
    CSV_COLUMNS,
    EvaluationResult,
    ResultRow,
    format_markdown,
    read_csv,
    regime_label,
    run_evaluation,
    summarise,
    write_files_atomically,
    write_results,
)
from lightning_modules.samplers import build_sampler


def _result() -> EvaluationResult:
    rows = []
    for method, base in (("degraded", 0.3), ("tv", 0.5), ("lfmri", 0.7)):
        for regime in ("noise", "noise_blur_t2star_b0"):
            for i, subject in enumerate(("s1", "s2", "s3")):
                rows.append(ResultRow(subject, regime, method, base + 0.01 * i, 20.0 + i, 0.02 + 0.01 * i, 4))
    tv = TuningResult({"weight_factor": 1.5}, 0.5, ["v1"])
    tuned = {"degraded": TuningResult({}, 0.3, ["v1"]), "tv": tv}
    tuning = {g: dict(tuned) for g in ("noise", "noise_blur_t2star_b0")}
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    panels = {g: {"degraded": img, "tv": img, "lfmri": img * 0.9, "reference": img} for g in tuning}
    return EvaluationResult(rows=rows, tuning=tuning, panels=panels, settings={"sampler": "pc", "steps": 10})


def test_regime_labels_follow_the_paper() -> None:
    assert regime_label("noise") == "noise"
    assert regime_label("noise_blur_t2star_b0") == "noise + blur + T2* + B0"


def test_summary_is_mean_and_sample_std_across_subjects() -> None:
    stats = summarise(_result().rows)["tv"]["noise"]
    assert stats["ssim"][0] == pytest.approx(0.51)
    assert stats["ssim"][1] == pytest.approx(np.std([0.5, 0.51, 0.52], ddof=1))
    assert stats["psnr"] == pytest.approx((21.0, 1.0, 3))


def test_markdown_has_one_paper_format_block_per_method_and_the_tuned_parameters() -> None:
    md = format_markdown(_result())
    blocks = md.split("\n## ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["degraded", "tv", "lfmri"]
    assert "| regime | SSIM | PSNR (dB) | NMSE (%) |" in blocks[0]
    assert "| noise | 0.710 ± 0.010 | 21.00 ± 1.00 | 3.00 ± 1.00 |" in blocks[2]
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
    payload = json.loads((out / "results.json").read_text())
    assert payload["tuned_baselines"]["noise"]["tv"] == {"params": {"weight_factor": 1.5}, "val_ssim": 0.5,
                                                         "subjects": ["v1"]}
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


class _FakeDataModule:
    """2 validation and 2 test subjects (noisy copies of one smooth image); records the splits it is asked."""

    regime_overrides: dict = {}

    def __init__(self) -> None:
        self.requested: list[tuple[str, str]] = []
        self.subjects = {"val": ["val-a", "val-b"], "test": ["test-a", "test-b"]}

    def volumes(self, split: str, regime: str):
        self.requested.append((split, regime))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        image = (xx**2 + yy**2 < 0.6).float() * (1 + 0.3 * xx)
        for i, subject in enumerate(self.subjects[split]):
            g = torch.Generator().manual_seed(i)
            clean = torch.stack([image, torch.zeros_like(image)])[None].repeat(2, 1, 1, 1)
            degraded = clean + 0.1 * torch.randn(clean.shape, generator=g)
            params = neutral_params(2, 16, 16)
            y = fft2c(channels_to_complex(degraded))
            yield SimpleNamespace(subject=subject, clean=clean, degraded=degraded, y=y, params=params,
                                  slices=torch.arange(2))


def test_protocol_tunes_on_validation_and_scores_test_subjects() -> None:
    dm = _FakeDataModule()
    model = SimpleNamespace(score_fn=lambda: (lambda x, t: torch.zeros_like(x)))
    sampler = build_sampler("ddim", steps=1, dc="gradient", dc_weight=1.0)  # zero score + full DC: the data
    result = run_evaluation(model, dm, ["noise"], ["degraded", "tv"], sampler, batch_size=1)
    assert dm.requested == [("val", "noise"), ("test", "noise")]
    assert result.tuning["noise"]["tv"].subjects == ["val-a", "val-b"]
    assert {r.subject for r in result.rows} == {"test-a", "test-b"}
    by = {(r.subject, r.method): r for r in result.rows}
    for subject in ("test-a", "test-b"):
        assert by[subject, "lfmri"].ssim == pytest.approx(by[subject, "degraded"].ssim, abs=1e-4)
        assert by[subject, "tv"].ssim > by[subject, "degraded"].ssim
    assert list(result.panels["noise"]) == ["degraded", "tv", "lfmri", "reference"]
