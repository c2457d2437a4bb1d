"""`lfmri metrics REF PRED` against an independent skimage / numpy computation on a real MRI volume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import MNI
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lfmri.cli import main


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 96x80x10 crop of the MNI T1 template (REF) and a Rician-noisy copy (PRED), written as NIfTI."""
    img = nib.load(str(MNI))
    ref = np.asarray(img.dataobj, dtype=np.float32)[50:146, 60:140, 70:80]
    rng = np.random.default_rng(0)
    sigma = 0.08 * ref.max()
    pred = np.abs(ref + rng.normal(0, sigma, ref.shape) + 1j * rng.normal(0, sigma, ref.shape))
    pred = pred.astype(np.float32)
    d = tmp_path_factory.mktemp("metrics")
    ref_path, pred_path = d / "ref.nii.gz", d / "pred.nii"
    nib.save(nib.Nifti1Image(ref, img.affine), ref_path)
    nib.save(nib.Nifti1Image(pred, img.affine), pred_path)
    return ref_path, pred_path, ref, pred


def _oracle(ref: np.ndarray, pred: np.ndarray, axis: int) -> dict[str, float]:
    """fastMRI's evaluate.py: skimage per slice with data_range = volume max; numpy NMSE (float64)."""
    r = np.moveaxis(ref, axis, 0).astype(np.float64)
    p = np.moveaxis(pred, axis, 0).astype(np.float64)
    ssim = np.mean([structural_similarity(a, b, data_range=r.max()) for a, b in zip(r, p, strict=True)])
    return {"ssim": ssim, "psnr": peak_signal_noise_ratio(r, p, data_range=r.max()),
            "nmse": np.linalg.norm(r - p) ** 2 / np.linalg.norm(r) ** 2}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_metrics_match_skimage_on_real_volumes(volumes, capsys, axis: int | None) -> None:
    ref_path, pred_path, ref, pred = volumes
    extra = [] if axis is None else ["--slice-axis", str(axis)]
    code, out, _ = _run(["metrics", str(ref_path), str(pred_path), *extra], capsys)
    assert code == 0
    got = json.loads(out)
    assert set(got) == {"ssim", "psnr", "nmse"}
    expected = _oracle(ref, pred, 2 if axis is None else axis)
    for key in got:
        assert abs(got[key] - expected[key]) < 1e-4, (key, got[key], expected[key])
    assert 0 < got["ssim"] < 1 and got["nmse"] > 0


def _strict_json(text: str) -> dict:
    """Parse as standard JSON: NaN / Infinity / -Infinity (Python's extensions) are refused."""
    def refuse(name: str) -> None:
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_identical_volumes(volumes, capsys) -> None:
    ref_path, *_ = volumes
    code, out, _ = _run(["metrics", str(ref_path), str(ref_path)], capsys)
    got = _strict_json(out)  # valid JSON for jq, JavaScript, ...: no `Infinity`
    assert code == 0 and got["ssim"] == pytest.approx(1.0) and got["nmse"] == 0
    assert got["psnr"] is None  # infinite PSNR (PRED equals REF) is printed as null, as documented
    assert json.dumps(got, allow_nan=False)


def test_bad_input_is_one_line_and_exit_2(volumes, capsys, tmp_path: Path) -> None:
    ref_path, _, ref, _ = volumes
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(ref[:-1], np.eye(4)), other)
    cases = {
        "does not match": [str(ref_path), str(other)],
        "no such file": [str(ref_path), str(tmp_path / "missing.nii.gz")],
        "slice-axis": [str(ref_path), str(ref_path), "--slice-axis", "3"],
    }
    for message, args in cases.items():
        code, out, err = _run(["metrics", *args], capsys)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("lfmri metrics: error:") and message in err


def test_console_entry_point(volumes) -> None:
    ref_path, pred_path, ref, pred = volumes
    proc = subprocess.run([sys.executable, "-m", "lfmri.cli", "metrics", str(ref_path), str(pred_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["psnr"] == pytest.approx(_oracle(ref, pred, 2)["psnr"], abs=1e-4)
