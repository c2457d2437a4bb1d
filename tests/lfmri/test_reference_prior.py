"""The reference prior shipped in the repository (`--ckpt reference-small`): small, loads, reconstructs a
user's NIfTI right after set-up."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from helpers import MNI

from lfmri.cli import main
from lfmri.models import load_score_model, read_lightning_checkpoint
from lightning_modules.checkpoint import SHIPPED_CHECKPOINTS

SHIPPED = SHIPPED_CHECKPOINTS["reference-small"]


def test_the_shipped_reference_prior_is_small_and_loads() -> None:
    assert SHIPPED.is_file(), f"{SHIPPED} is not in the repository"
    assert SHIPPED.stat().st_size <= 10 * 2**20
    model = load_score_model("reference-small", torch.device("cpu"))
    ckpt = read_lightning_checkpoint("reference-small")
    assert model.net.config.num_channels == 2 and ckpt["global_step"] > 0
    assert {"command", "wall_s", "val"} <= set(ckpt["lfmri"])


def test_a_new_user_reconstructs_a_nifti_with_the_shipped_prior(tmp_path: Path) -> None:
    img = nib.load(str(MNI))
    vol = np.asarray(img.dataobj, dtype=np.float32)[::4, ::4, 90:92]  # 49 x 58 x 2, a non-square matrix
    src, deg, rec = tmp_path / "vol.nii.gz", tmp_path / "deg.nii.gz", tmp_path / "rec.nii.gz"
    nib.save(nib.Nifti1Image(vol, img.affine), src)
    assert main(["degrade", str(src), str(deg), "--regime", "noise", "--seed", "0"]) == 0
    assert main(["reconstruct", str(deg), str(rec), "--ckpt", "reference-small", "--regime", "noise",
                 "--steps", "3", "--device", "cpu"]) == 0
    out = np.asarray(nib.load(str(rec)).dataobj)
    assert out.shape == vol.shape and np.all(np.isfinite(out)) and out.max() > 0
