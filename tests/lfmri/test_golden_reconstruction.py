"""Reconstructions are bit-identical to those of the code before issue 23's redesign (commit 958dbf0).

The fixture `tests/fixtures/golden/colin_48px_958dbf0.npz` holds what that code's `lfmri degrade` and
`lfmri reconstruct` wrote for a 48 x 48 x 2 crop of the bundled Colin27 (see tests/fixtures/README.md); this
test runs the same commands with today's code and compares every voxel. It fails when a change alters a
degradation or a reconstruction (a refactor must not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO

GOLDEN = REPO / "tests" / "fixtures" / "golden" / "colin_48px_958dbf0.npz"
COLIN = REPO / "datamodules" / "data" / "colin27_ch2.nii.gz"


def _lfmri(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "lfmri.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.slow
@pytest.mark.e2e
def test_degrade_and_reconstruct_match_the_recorded_outputs(tmp_path: Path) -> None:
    img = nib.load(str(COLIN))
    crop = np.asarray(img.dataobj, dtype=np.float32)[40:88, 60:108, 85:95:5]
    nib.save(nib.Nifti1Image(crop, img.affine), str(tmp_path / "clean.nii.gz"))
    _lfmri("degrade", "clean.nii.gz", "deg.nii.gz", "--regime", "noise_blur_t2star_b0", "--seed", "3",
           "--snr-db", "5", "--kspace-out", "deg.h5", cwd=tmp_path)
    _lfmri("degrade", "clean.nii.gz", "degn.nii.gz", "--regime", "noise", "--seed", "4", "--snr-db", "4",
           cwd=tmp_path)
    _lfmri("reconstruct", "degn.nii.gz", "rec_noise.nii.gz", "--ckpt", "reference-small", "--regime", "noise",
           "--sampling.steps", "8", "--seed", "1", cwd=tmp_path)
    _lfmri("reconstruct", "deg.nii.gz", "rec_b0.nii.gz", "--ckpt", "reference-small", "--regime",
           "noise_blur_t2star_b0", "--kspace", "deg.h5", "--sampling.sampler", "warm_ddim",
           "--sampling.steps", "8", "--seed", "2", "--samples", "2", "--std-out", "rec_b0_std.nii.gz",
           cwd=tmp_path)
    golden = np.load(GOLDEN)
    assert sorted(golden.files) == ["deg", "degn", "rec_b0", "rec_b0_std", "rec_noise"]
    for name in golden.files:
        now = _array(tmp_path / f"{name}.nii.gz")
        assert now.shape == golden[name].shape, name
        assert np.array_equal(now, golden[name]), (name, float(np.abs(now - golden[name]).max()))
