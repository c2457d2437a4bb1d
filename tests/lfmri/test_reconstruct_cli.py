"""`lfmri reconstruct` round trips (with and without measured k-space, posterior std) and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from helpers import MNI, SCORE_SDE_CKPT, refused

from lfmri.cli import main

FAST = ["--sampling.steps", "2", "--device", "cpu", "--sampling.sampler", "warm_ddim"]
#: full gradient data consistency (weight 1): on A = fft2c the result is x0 = ifft2c(y)
FULL_DC = ["--sampling.dc", "gradient", "--sampling.dc_weight", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """A tiny checkpoint, two real MNI-derived volumes (32 x 32 x 2 and 40 x 47 x 2) and a degraded one."""
    d = tmp_path_factory.mktemp("reconstruct")
    img = nib.load(str(MNI))
    data = np.asarray(img.dataobj, dtype=np.float32)
    square = data[20:180:5, 30:190:5, 80:110:20]  # 32 x 32 x 2
    rect = data[::5, ::5, 80:110:20]  # 40 x 47 x 2
    out = {"ckpt": tiny_checkpoint, "square": d / "square.nii.gz",
           "rect": d / "rect.nii.gz"}
    nib.save(nib.Nifti1Image(square, img.affine), out["square"])
    nib.save(nib.Nifti1Image(rect, img.affine), out["rect"])
    out["deg"], out["kspace"] = d / "deg.nii.gz", d / "deg_k.h5"
    assert main(["degrade", str(out["rect"]), str(out["deg"]), "--regime", "noise_blur_t2star_b0",
                 "--kspace-out", str(out["kspace"]), "--seed", "3"]) == 0
    return out


def _argv(files: dict[str, Path], name: str, out: Path, regime: str, *extra: str) -> list[str]:
    return ["reconstruct", str(files[name]), str(out), "--ckpt", str(files["ckpt"]), "--regime", regime,
            *FAST, *extra]


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def test_with_measured_kspace_and_posterior_std(files: dict[str, Path], tmp_path: Path) -> None:
    out, std = tmp_path / "rec.nii.gz", tmp_path / "std.nii.gz"
    code = main(_argv(files, "deg", out, "noise_blur_t2star_b0", "--kspace", str(files["kspace"]),
                      "--samples", "2", "--std-out", str(std)))
    assert code == 0
    deg, affine = _load(files["deg"])
    for path in (out, std):
        vol, aff = _load(path)
        assert vol.shape == deg.shape and np.allclose(aff, affine)
        assert np.all(np.isfinite(vol)) and vol.min() >= 0
    assert _load(std)[0].max() > 0


def test_full_data_consistency_on_plain_fourier_sampling_returns_the_input(files: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """Regime noise (A = fft2c) with DC weight 1 ends on x0 = ifft2c(y): the input, in its units and place."""
    out = tmp_path / "rec.nii.gz"
    code = main(_argv(files, "square", out, "noise", *FULL_DC))
    assert code == 0
    rec, affine = _load(out)
    ref, ref_affine = _load(files["square"])
    assert np.allclose(affine, ref_affine)
    np.testing.assert_allclose(rec, ref, atol=1e-3 * ref.max())
    # the same through lfmri degrade's measured k-space: the result is |ifft2c(y)|, degrade's own output
    deg, kspace = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    assert main(["degrade", str(files["square"]), str(deg), "--regime", "noise", "--kspace-out",
                 str(kspace)]) == 0
    argv = _argv({**files, "deg": deg}, "deg", out, "noise", *FULL_DC,
                 "--kspace", str(kspace))
    assert main(argv) == 0
    noisy = _load(deg)[0]
    np.testing.assert_allclose(_load(out)[0], noisy, atol=1e-3 * noisy.max())


def test_without_kspace_on_a_non_square_user_volume(files: dict[str, Path], tmp_path: Path) -> None:
    """A user's own magnitude NIfTI (40 x 47, not a multiple of the U-Net's) at its native matrix: with
    A = fft2c and full gradient DC the result is the input exactly; the former `--resize` path keeps shape,
    units and anatomy through the resize round trip; a regime with blur and T2* runs on the regime's
    mid-range operator."""
    out = tmp_path / "rec.nii"
    ref, _ = _load(files["rect"])
    assert main(_argv(files, "rect", out, "noise", *FULL_DC)) == 0
    np.testing.assert_allclose(_load(out)[0], ref, atol=1e-3 * ref.max())
    assert main(_argv(files, "rect", out, "noise", *FULL_DC,
                      "--batch-size", "1", "--resize")) == 0
    rec, _ = _load(out)
    assert rec.shape == ref.shape
    assert np.corrcoef(rec.ravel(), ref.ravel())[0, 1] > 0.9
    assert 0.8 < rec.mean() / ref.mean() < 1.25
    assert main(_argv(files, "rect", out, "noise_blur_t2star")) == 0
    assert _load(out)[0].shape == ref.shape


def test_noise_level_recorded_given_or_estimated(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The JSON names the k-space noise std used (input units): degrade's record when the k-space file has
    it, --noise-sigma when given (0: the proximal DC becomes the hard projection onto the data), else an
    estimate from the measurement that is close to the recorded one."""
    out = tmp_path / "rec.nii.gz"
    with h5py.File(files["kspace"], "r") as f:
        recorded = float(np.median(f["noise_sigma"][()]))
    assert main(_argv(files, "deg", out, "noise_blur_t2star_b0", "--kspace", str(files["kspace"]))) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["noise_sigma"] == pytest.approx(recorded, rel=1e-5) and "recorded" in printed[
        "noise_sigma_origin"] and printed["dc"] == "proximal"
    blind = tmp_path / "blind.h5"
    with h5py.File(files["kspace"], "r") as f, h5py.File(blind, "w") as g:
        g.create_dataset("kspace", data=f["kspace"][()])
        g.create_dataset("b0_map_hz", data=f["b0_map_hz"][()])
    volume = tmp_path / "blind.nii.gz"  # no parameters JSON beside it
    volume.write_bytes(files["deg"].read_bytes())
    assert main(_argv({**files, "blind": volume}, "blind", out, "noise_blur_t2star_b0", "--kspace",
                      str(blind))) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["noise_sigma"] == pytest.approx(recorded, rel=0.1) and "estimated" in printed[
        "noise_sigma_origin"]
    assert main(_argv({**files, "blind": volume}, "blind", out, "noise", "--noise-sigma", "0")) == 0
    assert json.loads(capsys.readouterr().out)["noise_sigma"] == 0.0
    deg = _load(files["deg"])[0]
    np.testing.assert_allclose(_load(out)[0], deg, atol=1e-3 * deg.max())


def test_a_checkpoint_that_is_not_ours(files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec.nii.gz"
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    for ckpt in (SCORE_SDE_CKPT, junk, tmp_path / "missing.ckpt"):
        err = refused(_argv({**files, "ckpt": ckpt}, "square", out, "noise"), capsys, out)
        assert str(ckpt) in err


def test_nifti_and_kspace_that_disagree(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec.nii.gz"
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("kspace", data=np.zeros((2, 40, 40), np.complex64))
    err = refused(_argv(files, "deg", out, "noise_blur_t2star_b0", "--kspace", str(bad)), capsys, out)
    assert "disagrees" in err
    err = refused(_argv(files, "deg", out, "noise", "--kspace", str(files["kspace"])), capsys, out)
    assert "regime" in err
    params = json.loads(Path(str(files["deg"]) + ".json").read_text())
    params["slices"] = params["slices"][:1]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(params))
    err = refused(_argv(files, "deg", out, "noise_blur_t2star_b0", "--params", str(short)), capsys, out)
    assert "slices" in err


def test_nan_in_the_input(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, affine = _load(files["square"])
    data[3, 4, 1] = np.nan
    nan_in = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nan_in)
    out, std = tmp_path / "rec.nii.gz", tmp_path / "std.nii.gz"
    files = {**files, "nan": nan_in}
    err = refused(_argv(files, "nan", out, "noise", "--samples", "2", "--std-out", str(std)), capsys, out,
                  std)
    assert "NaN" in err


def test_std_out_needs_several_samples(files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out, std = tmp_path / "rec.nii.gz", tmp_path / "std.nii.gz"
    refused(_argv(files, "square", out, "noise", "--std-out", str(std)), capsys, out, std)


@pytest.mark.parametrize("zeroed, message", [("noise_sigma", "not a measurement"),
                                             ("kspace", "every k-space sample is zero")])
def test_a_file_that_measured_nothing_is_refused(files: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture, zeroed: str,
                                                message: str) -> None:
    """A k-space file that records sigma = 0 in a blurred regime was once reconstructed into values ~700 x the
    input's range (the hard projection divides by the attenuated k-space), an all-zero one into an invented
    image: both are refused in one line, nothing written."""
    zero = tmp_path / "zero.h5"
    with h5py.File(files["kspace"], "r") as f, h5py.File(zero, "w") as g:
        for key in f:
            g.create_dataset(key, data=np.zeros_like(f[key][()]) if key == zeroed else f[key][()])
        g.attrs.update(dict(f.attrs))
    out = tmp_path / "rec.nii.gz"
    err = refused(_argv(files, "deg", out, "noise_blur_t2star_b0", "--kspace", str(zero)), capsys, out)
    assert message in err


@pytest.mark.parametrize("extra, message", [
    (["--sampling.steps", "1000000000"], "steps must be from 1 to 10000"),
    (["--sampling.sampler", "warm_ddim", "--samples", "1000000000"], "samples must be from 1 to 1000"),
])
def test_absurd_work_is_refused_before_it_starts(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture, extra: list[str],
                                                 message: str) -> None:
    out = tmp_path / "rec.nii.gz"
    assert message in refused(_argv(files, "deg", out, "noise_blur_t2star_b0", *extra), capsys, out)


# ------------------------------------------------------------------------- k-space files as INPUT (issue 24)
def _fastmri_file(path: Path, images: np.ndarray, coils: int, mask: np.ndarray | None, sigma: float = 0.0,
                  seed: int = 0) -> Path:
    """A k-space file in fastMRI's exact layout, written by hand with h5py (no lfmri attribute): `images`
    [S, H_f, W_f] in the file's own order, `kspace` complex64 [S, C, H_f, W_f] (single-coil: [S, H_f, W_f])
    of birdcage-weighted coil images with complex noise of std `sigma`, zeros where the 1D `mask` [W_f] is 0,
    an `ismrmrd_header` (1.5 x 2.5 x 4 mm voxels) and fastMRI's attributes."""
    import torch

    from degradations import birdcage_sensitivities, fft2c

    x = torch.from_numpy(images.astype(np.complex64))[:, None]
    maps = birdcage_sensitivities(coils, *images.shape[1:])[None] if coils > 1 else 1.0
    k = fft2c(maps * x).numpy()
    rng = np.random.default_rng(seed)
    k = k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / np.sqrt(2)
    if mask is not None:
        k = k * mask
    h_f, w_f = images.shape[1:]
    header = (f'<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
              f"<encodedSpace><matrixSize><x>{h_f}</x><y>{w_f}</y><z>1</z></matrixSize><fieldOfView_mm>"
              f"<x>{1.5 * h_f}</x><y>{2.5 * w_f}</y><z>4</z></fieldOfView_mm></encodedSpace>"
              "</encoding></ismrmrdHeader>")
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=(k if coils > 1 else k[:, 0]).astype(np.complex64))
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(bool))
        f.create_dataset("ismrmrd_header", data=np.bytes_(header.encode()))
        f.attrs.update({"acquisition": "AXT2", "max": float(np.abs(images).max()), "norm": 1.0,
                        "patient_id": "test"})
    return path


def _nmse(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((x - ref) ** 2) / np.sum(ref ** 2))


def _kspace_argv(ckpt: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(src), str(out), "--ckpt", str(ckpt), *FAST, *extra]


def test_foreign_single_coil_file_in_its_own_order(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """fastMRI's single-coil layout (readout along H_f), fully sampled, no lfmri attribute: no low-field
    effects (A = fft2c), so full gradient DC returns |image| exactly, in the file's own (H_f, W_f) order with
    the slices along --slice-axis, in the file's units, with the header's voxel sizes."""
    ref = np.moveaxis(_load(files["rect"])[0], 2, 0)  # [2, 40, 47]: H_f = 40, W_f = 47
    src = _fastmri_file(tmp_path / "sc.h5", ref, 1, None)
    out = tmp_path / "rec.nii.gz"
    assert main(_kspace_argv(files["ckpt"], src, out, *FULL_DC)) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["regime"] == "noise" and printed["coils"] == 1 and printed["sampled_fraction"] == 1.0
    rec, affine = _load(out)
    np.testing.assert_allclose(rec, np.moveaxis(ref, 0, 2), atol=1e-3 * ref.max())
    np.testing.assert_allclose(np.diag(affine), [1.5, 2.5, 4.0, 1.0])
    assert main(_kspace_argv(files["ckpt"], src, out, *FULL_DC, "--slice-axis", "0")) == 0
    np.testing.assert_allclose(_load(out)[0], ref, atol=1e-3 * ref.max())


def test_foreign_multicoil_undersampled_file_reconstructs(tiny16_checkpoint: Path, files: dict[str, Path],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The done-when file: fastMRI's exact multi-coil test-set layout written by hand (kspace [2, 4, 40, 47]
    with zeros, mask [47], ismrmrd_header bytes, acquisition / max / norm / patient_id) reconstructs from the
    CLI: sensitivities by ESPIRiT, noise estimated, output [40, 47, 2] in the file's order."""
    ref = np.moveaxis(_load(files["rect"])[0], 2, 0)
    mask = np.zeros(47, bool)
    mask[::3] = True
    mask[19:29] = True  # 10 fully sampled centre lines for ESPIRiT
    src = _fastmri_file(tmp_path / "mc.h5", ref, 4, mask, sigma=0.01 * float(np.abs(ref).max()))
    out = tmp_path / "rec.nii.gz"
    assert main(_kspace_argv(tiny16_checkpoint, src, out)) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["coils"] == 4 and printed["sampled_fraction"] == pytest.approx(mask.mean())
    assert "estimated" in printed["noise_sigma_origin"]
    rec = _load(out)[0]
    assert rec.shape == (40, 47, 2) and np.all(np.isfinite(rec)) and rec.min() >= 0
    assert np.corrcoef(rec.ravel(), np.moveaxis(ref, 0, 2).ravel())[0, 1] > 0.5


def test_lfmri_file_round_trips_to_the_nifti_order(files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """`lfmri degrade --coils 1` writes fastMRI's layout (in-plane axes transposed); reconstructing it gives
    the NIfTI's own order and affine back: with A = fft2c and full gradient DC, degrade's magnitude."""
    deg, kspace = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    assert main(["degrade", str(files["rect"]), str(deg), "--regime", "noise", "--coils", "1",
                 "--kspace-out", str(kspace)]) == 0
    with h5py.File(kspace) as f:
        assert f["kspace"].shape == (2, 47, 40)  # fastMRI's [S, H_f, W_f], readout along H_f
    out = tmp_path / "rec.nii.gz"
    assert main(_kspace_argv(files["ckpt"], kspace, out, *FULL_DC)) == 0, capsys.readouterr().err
    noisy, affine = _load(deg)
    rec, rec_affine = _load(out)
    np.testing.assert_allclose(rec, noisy, atol=1e-3 * noisy.max())
    np.testing.assert_allclose(rec_affine, affine)


def test_degraded_multicoil_file_reconstructs_closer_to_the_clean_volume(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The done-when pair: `lfmri degrade --coils 4 --acceleration 4` at a low-field SNR (5 dB; 64 x 72 x 2
    at 1 mm, 13 centre lines for ESPIRiT) then `lfmri reconstruct K.h5` with the shipped prior: the
    reconstruction is closer to the clean volume than the degraded (zero-filled, aliased, noisy) NIfTI
    (measured: NMSE 0.027 against 0.048)."""
    img = nib.load(str(MNI))
    clean = np.asarray(img.dataobj, dtype=np.float32)[60:124, 70:142, 90:92]
    src, deg, kspace = tmp_path / "clean.nii.gz", tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    nib.save(nib.Nifti1Image(clean, img.affine), src)
    assert main(["degrade", str(src), str(deg), "--regime", "noise", "--snr-db", "5", "--coils", "4",
                 "--acceleration", "4", "--center-fraction", "0.2", "--seed", "1", "--kspace-out",
                 str(kspace)]) == 0
    out = tmp_path / "rec.nii.gz"
    argv = ["reconstruct", str(kspace), str(out), "--ckpt", "reference-small", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    rec, affine = _load(out)
    zero_filled = _load(deg)[0]
    assert rec.shape == clean.shape and np.allclose(affine, img.affine)
    assert _nmse(rec, clean) < 0.8 * _nmse(zero_filled, clean)


def test_kspace_input_refuses_nifti_only_options(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A k-space INPUT carries its own measurement: --kspace, --params and --resize are refused, as is a
    --regime that disagrees with lfmri's record; a NIfTI INPUT still needs --regime; a broken file is
    named."""
    src = _fastmri_file(tmp_path / "sc.h5", np.ones((2, 8, 8), np.float32), 1, None)
    out = tmp_path / "rec.nii.gz"
    for extra, named in ((["--kspace", str(files["kspace"])], "--kspace: not with a k-space file INPUT"),
                         (["--params", f"{files['deg']}.json"], "--params: not with a k-space file INPUT"),
                         (["--resize"], "--resize: not with a k-space file INPUT")):
        assert named in refused(_kspace_argv(files["ckpt"], src, out, *extra), capsys, out)
    deg, kspace = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    assert main(["degrade", str(files["square"]), str(deg), "--regime", "noise", "--acceleration", "2",
                 "--kspace-out", str(kspace)]) == 0
    capsys.readouterr()
    err = refused(_kspace_argv(files["ckpt"], kspace, out, "--regime", "noise_blur"), capsys, out)
    assert f"INPUT {kspace}: recorded regime 'noise' disagrees with --regime noise_blur" in err
    err = refused(["reconstruct", str(deg), str(out), "--ckpt", str(files["ckpt"]), "--regime", "noise",
                   *FAST, "--kspace", str(kspace)], capsys, out)
    assert f"--kspace {kspace}: a fastMRI-layout file (coils / undersampling): give it as INPUT" in err
    err = refused(["reconstruct", str(files["square"]), str(out), "--ckpt", str(files["ckpt"]), *FAST],
                  capsys, out)
    assert "--regime: required for a NIfTI INPUT" in err
    # several coils need a fully sampled centre ESPIRiT can calibrate on: too narrow (6 of 32 lines) is said
    # so, naming the file; 8 of 40 lines is enough (the kernel shrinks with the calibration width)
    for name, ok in (("square", False), ("rect", True)):
        assert main(["degrade", str(files[name]), str(deg), "--regime", "noise", "--coils", "4",
                     "--acceleration", "4", "--center-fraction", "0.2", "--kspace-out", str(kspace)]) == 0
        capsys.readouterr()
        if ok:
            assert main(_kspace_argv(files["ckpt"], kspace, out)) == 0 and out.is_file()
            out.unlink()
            capsys.readouterr()
            continue
        err = refused(_kspace_argv(files["ckpt"], kspace, out), capsys, out)
        assert f"INPUT {kspace}: " in err and "the fully sampled centre is 6 lines wide" in err, err
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.create_dataset("kspace", data=np.ones((2, 3, 8, 10), np.complex64))
        f.create_dataset("mask", data=np.ones(8, bool))
    assert f"INPUT {broken}: 'mask' has 8 entries" in refused(_kspace_argv(files["ckpt"], broken, out),
                                                                capsys, out)
