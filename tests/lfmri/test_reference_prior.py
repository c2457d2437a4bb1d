"""The reference prior shipped in the repository (`--ckpt reference-small`): small, loads, and right after
set-up reconstructs a user's NIfTI better than the degraded input it was given (SSIM and PSNR against the
clean volume, on slices of the held-out Colin27 subject the prior never saw)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from diffusion.checkpoint import SHIPPED_CHECKPOINTS
from lfmri.cli import main
from lfmri.models import load_score_model, read_lightning_checkpoint

SHIPPED = SHIPPED_CHECKPOINTS["reference-small"]
#: the bundled held-out subject (`datamodules.sources.BundledSource`'s test volume: never trained or tuned on)
COLIN27 = Path(__file__).resolve().parents[2] / "datamodules" / "data" / "colin27_ch2.nii.gz"
#: what the reconstruction must gain over the degraded input, about half the measured gain. Measured
#: (3 native axial 1 mm Colin27 slices z = 70, 90, 110, 181 x 217, --snr-db 5, default sampler, 2-core CPU):
#:   noise:                degraded SSIM 0.236, PSNR 13.48 dB -> reconstruction 0.508, 16.38 dB (+0.27, +2.9)
#:   noise_blur_t2star_b0: degraded SSIM 0.210, PSNR 13.59 dB -> reconstruction 0.471, 16.46 dB (+0.26, +2.9)
#: (degradation seed 1: the same to 0.01 SSIM, 0.05 dB)
MIN_SSIM_GAIN, MIN_PSNR_GAIN_DB = 0.13, 1.4


def _ssim(x: np.ndarray, ref: np.ndarray) -> float:
    """Mean over slices (last axis) of skimage's SSIM with the clean slice's maximum as data range."""
    return float(np.mean([structural_similarity(x[..., i], ref[..., i], data_range=float(ref[..., i].max()))
                          for i in range(ref.shape[-1])]))


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(ref.max() ** 2 / np.mean((x.astype(np.float64) - ref) ** 2)))


def test_the_shipped_reference_prior_is_small_and_loads() -> None:
    assert SHIPPED.is_file(), f"{SHIPPED} is not in the repository"
    assert SHIPPED.stat().st_size <= 10 * 2**20
    model = load_score_model("reference-small", torch.device("cpu"))
    ckpt = read_lightning_checkpoint("reference-small")
    assert model.net.config.num_channels == 2 and ckpt["global_step"] > 0
    assert {"command", "wall_s", "val"} <= set(ckpt["lfmri"])


@pytest.mark.parametrize("regime", ["noise", "noise_blur_t2star_b0"])
def test_a_new_user_reconstructs_a_nifti_better_than_its_degraded_input(tmp_path: Path, regime: str) -> None:
    img = nib.load(str(COLIN27))
    vol = np.asarray(img.dataobj, dtype=np.float32)[:, :, [70, 90, 110]]  # 181 x 217 x 3, a non-square matrix
    src, deg, rec = tmp_path / "vol.nii.gz", tmp_path / "deg.nii.gz", tmp_path / "rec.nii.gz"
    nib.save(nib.Nifti1Image(vol, img.affine), src)
    assert main(["degrade", str(src), str(deg), "--regime", regime, "--snr-db", "5", "--seed", "0"]) == 0
    assert main(["reconstruct", str(deg), str(rec), "--ckpt", "reference-small", "--regime", regime,
                 "--device", "cpu", "--seed", "0"]) == 0
    degraded, out = np.asarray(nib.load(str(deg)).dataobj), np.asarray(nib.load(str(rec)).dataobj)
    assert out.shape == vol.shape and np.all(np.isfinite(out))
    ssim_in, ssim_out = _ssim(degraded, vol), _ssim(out, vol)
    psnr_in, psnr_out = _psnr(degraded, vol), _psnr(out, vol)
    assert ssim_out - ssim_in >= MIN_SSIM_GAIN, f"SSIM {ssim_in:.3f} -> {ssim_out:.3f}"
    assert psnr_out - psnr_in >= MIN_PSNR_GAIN_DB, f"PSNR {psnr_in:.2f} -> {psnr_out:.2f} dB"
