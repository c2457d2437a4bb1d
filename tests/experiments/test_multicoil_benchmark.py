"""experiments/benchmarks/multicoil.py (issue 24's benchmark) in a small form: the table holds every method
of each row it ran, lfmri's rows through the default sampler's undersampled variant, and `--draw` is another
noise draw of the same slices (a row's draw does not depend on the other rows run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import script_module

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "multicoil.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def multicoil():
    with script_module(BENCH, "bench_multicoil") as module:
        yield module


def _run(multicoil, out: Path, *args: str) -> dict:
    argv = ["--test-slices", "1", "--val-slices", "1", "--width", "24", "--baselines",
            "zero_filled_rss,cg_sense", "--out", str(out), *args]
    assert multicoil.main(argv) == 0
    return json.loads((out / "multicoil.json").read_text())


@pytest.mark.slow
def test_the_benchmark_tables_every_method_and_a_draw_is_its_own(multicoil, tmp_path: Path,
                                                                  tiny16_checkpoint: Path) -> None:
    first = _run(multicoil, tmp_path / "a", "--rows", "0", "--ckpt", str(tiny16_checkpoint),
                 "--lfmri-variants")
    methods = {r["method"] for r in first["results"]}
    assert methods == {"zero_filled_rss", "cg_sense", *multicoil.LFMRI_VARIANTS}
    assert first["settings"]["lfmri"][multicoil.LFMRI]["start"] == "auto"  # the undersampled variant's
    assert "multicoil.md" in {p.name for p in (tmp_path / "a").iterdir()}
    again = _run(multicoil, tmp_path / "b", "--rows", "0,1", "--ckpt", "none")
    other = _run(multicoil, tmp_path / "c", "--rows", "0", "--ckpt", "none", "--draw", "1")

    def psnr(payload: dict, method: str, row: int) -> float:
        label = payload["rows"][row]
        return next(r["psnr"] for r in payload["results"] if r["method"] == method and r["row"] == label)

    assert psnr(again, "cg_sense", 0) == psnr(first, "cg_sense", 0)  # row 0's draw, whatever else runs
    assert psnr(other, "zero_filled_rss", 0) != psnr(first, "zero_filled_rss", 0)
    assert other["settings"]["draw"] == 1
