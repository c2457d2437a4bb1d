"""`lfmri degrade`: round trip on a small real NIfTI, reproducibility, the SNR it promises, bad inputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI

from degradations import ForwardOperator, fft2c, ifft2c, make_regime, neutral_params
from degradations.snr import foreground_mask
from lfmri.cli import main


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory):
    """A 64 x 72 x 6 block of the MNI152 T1 template (real MRI) with a non-trivial affine, uint8 on disk."""
    src = nib.load(str(MNI))
    data = np.asarray(src.dataobj)[60:124, 70:142, 90:96]
    affine = src.affine.copy()
    affine[:3, 3] += [5.0, -3.0, 2.0]
    path = tmp_path_factory.mktemp("in") / "brain.nii.gz"
    nib.save(nib.Nifti1Image(data, affine, src.header), str(path))
    return path


def degrade(*argv):
    return main(["degrade", *map(str, argv)])


def test_round_trip_writes_nifti_json_and_kspace(small_volume, tmp_path, capsys):
    out, h5 = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    rc = degrade(small_volume, out, "--regime", "noise_blur_t2star_b0", "--seed", "3", "--kspace-out", h5)
    assert rc == 0
    stdout = capsys.readouterr().out
    assert len(stdout.splitlines()) == 1  # one summary line; the per-slice record is in OUTPUT.json
    printed = json.loads(stdout)
    src, img = nib.load(str(small_volume)), nib.load(str(out))
    np.testing.assert_array_equal(img.affine, src.affine)
    assert img.shape == src.shape and img.get_data_dtype() == np.float32
    assert int(img.header["sform_code"]) == int(src.header["sform_code"])
    record = json.loads(Path(str(out) + ".json").read_text())
    assert printed == {**{k: v for k, v in record.items() if k != "slices"}, "n_slices": 6,
                       "parameters": str(Path(str(out) + ".json").resolve())}
    assert (record["regime"], record["seed"], record["slice_axis"]) == ("noise_blur_t2star_b0", 3, 2)
    assert record["input"] == str(small_volume.resolve()) and len(record["slices"]) == 6
    assert {"fwhm_px", "t2star_ms", "readout_ms", "te_ms", "b0_max_hz", "snr_db", "noise_sigma"} <= set(
        record["slices"][0])
    with h5py.File(h5) as f:
        kspace, b0_map = f["kspace"][()], f["b0_map_hz"][()]
        attrs = dict(f.attrs)
    assert kspace.shape == (6, 64, 72) and kspace.dtype == np.complex64
    assert b0_map.shape == (6, 64, 72) and b0_map.dtype == np.float32
    assert attrs["regime"] == "noise_blur_t2star_b0" and attrs["fwhm_px"] > 0
    # the NIfTI is the magnitude of the k-space's image, slices along axis 2
    magnitude = ifft2c(torch.from_numpy(kspace)).abs().numpy()
    np.testing.assert_allclose(np.moveaxis(magnitude, 0, 2), img.get_fdata(), rtol=1e-5, atol=1e-3)
    # the HDF5 carries what rebuilds A: y - A x is then pure noise at the reported level
    scalar_keys = ("fwhm_px", "t2star_ms", "t2star_gre", "readout_ms", "te_ms")
    params = {k: torch.full((6,), float(attrs[k])) for k in scalar_keys}
    params["b0_map_hz"] = torch.from_numpy(b0_map)[:, None]
    clean = torch.from_numpy(np.moveaxis(np.asarray(src.dataobj, dtype=np.float32), 2, 0)).to(torch.complex64)
    residual = torch.from_numpy(kspace)[:, None] - ForwardOperator.from_params(params).forward(clean[:, None])
    sigma = torch.tensor([s["noise_sigma"] for s in record["slices"]])  # per slice (the default)
    noise_var = (residual.abs() ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(noise_var, sigma.float() ** 2, rtol=0.06, atol=0.0)
    _assert_the_record_reproduces_the_outputs(np.asarray(src.dataobj), out, h5)


def measured_snr(clean, kspace, pooled):
    """Independent SNR measurement of y - fft2c(clean) (noise regime) with the lfmri definition."""
    x = torch.from_numpy(clean).to(torch.complex64)
    noise_var = ((torch.from_numpy(kspace) - fft2c(x)).abs() ** 2).mean(dim=(1, 2)).double()
    mask = foreground_mask(x)
    fg_sum = ((x.abs().double() ** 2) * mask).sum(dim=(1, 2))
    if pooled:
        return 10 * math.log10(fg_sum.sum() / mask.sum() / noise_var.mean())
    return 10 * torch.log10(fg_sum / mask.sum(dim=(1, 2)) / noise_var)


@pytest.mark.parametrize("noise_level", ["volume", "slice"])
def test_snr_of_the_written_kspace_equals_the_target(small_volume, tmp_path, noise_level):
    out, h5 = tmp_path / "deg.nii", tmp_path / "k.h5"
    assert degrade(small_volume, out, "--regime", "noise", "--snr-db", "5", "--kspace-out", h5,
                   "--noise-level", noise_level) == 0
    clean = np.moveaxis(np.asarray(nib.load(str(small_volume)).dataobj, dtype=np.float32), 2, 0)
    with h5py.File(h5) as f:
        kspace = f["kspace"][()]
    if noise_level == "volume":  # one noise level per acquisition: the volume's SNR is the target
        assert measured_snr(clean, kspace, pooled=True) == pytest.approx(5.0, abs=0.3)
    else:  # every slice at the target
        assert torch.all((measured_snr(clean, kspace, pooled=False) - 5.0).abs() < 0.3)


def test_same_seed_same_output_independent_of_batch_size(small_volume, tmp_path):
    outs = {}
    for name, extra in {"a": ["--batch-size", "1"], "b": ["--batch-size", "4"], "c": ["--seed", "1"]}.items():
        out = tmp_path / f"{name}.nii.gz"
        assert degrade(small_volume, out, "--regime", "noise_blur_t2star_b0", *extra) == 0
        outs[name] = nib.load(str(out)).get_fdata()
    np.testing.assert_allclose(outs["a"], outs["b"], rtol=1e-5, atol=1e-3)
    assert not np.allclose(outs["a"], outs["c"])


def test_slice_axis_selects_the_slicing_direction(tmp_path):
    # 8 slices of the MNI block (not small_volume's 6): along axis 0 they give 72 x 8 slices, at least the
    # 7 x 7 that lfmri takes
    data = np.asarray(nib.load(str(MNI)).dataobj)[60:124, 70:142, 88:96]
    slab, out, h5 = _write(tmp_path / "slab.nii.gz", data), tmp_path / "d.nii.gz", tmp_path / "k.h5"
    assert degrade(slab, out, "--regime", "noise", "--slice-axis", "0", "--kspace-out", h5) == 0
    with h5py.File(h5) as f:
        assert f["kspace"].shape == (64, 72, 8) and "b0_map_hz" not in f
        kspace, sigma = torch.from_numpy(f["kspace"][()]), torch.from_numpy(f["noise_sigma"][()])
    assert nib.load(str(out)).shape == (64, 72, 8)
    # k-space slice i is the noisy 2D FFT of data[i] (the 72 x 8 plane), not of a slice along another axis
    clean = torch.from_numpy(data.astype(np.float32)).to(torch.complex64)
    noise_var = (kspace - fft2c(clean)).abs().square().mean(dim=(1, 2))
    torch.testing.assert_close(noise_var, sigma.square(), rtol=0.2, atol=0.0)  # 576 samples a slice
    _assert_the_record_reproduces_the_outputs(data, out, h5)


def _write(path, data):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _bad_inputs(tmp_path, small_volume):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    nan = np.ones((8, 8, 3), np.float32)
    nan[2, 3, 1] = np.nan
    return {
        "missing": ([tmp_path / "missing.nii.gz", "--regime", "noise"], "missing.nii.gz"),
        "not a nifti": ([text, "--regime", "noise"], "notes.nii.gz"),
        "2D": ([_write(tmp_path / "flat.nii", np.ones((8, 8), np.float32)), "--regime", "noise"], "flat.nii"),
        "5D": ([_write(tmp_path / "five.nii", np.ones((4, 4, 4, 2, 2), np.float32)), "--regime", "noise"],
               "five.nii"),
        "NaN": ([_write(tmp_path / "nan.nii.gz", nan), "--regime", "noise"], "nan.nii.gz"),
        "regime": ([small_volume, "--regime", "noise_motion"], "--regime"),
        "snr": ([small_volume, "--regime", "noise", "--snr-db", "500"], "--snr-db"),
    }


def test_bad_inputs_exit_2_with_one_line_and_create_nothing(small_volume, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, small_volume)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for case, (args, named) in cases.items():
        out = outdir / "deg.nii.gz"
        rc = main(["degrade", str(args[0]), str(out), *map(str, args[1:]),
                   "--kspace-out", str(outdir / "k.h5")])
        err = capsys.readouterr().err
        assert rc == 2, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, (case, err)
        assert lines[0].startswith("lfmri degrade: error:"), case
        assert list(outdir.iterdir()) == [], case  # no output, no JSON, no HDF5, no temporary file


@pytest.mark.slow
@pytest.mark.e2e
def test_installed_console_script(small_volume, tmp_path):
    script = Path(sys.executable).with_name("lfmri")
    out = tmp_path / "deg.nii.gz"
    done = subprocess.run([str(script), "degrade", str(small_volume), str(out), "--regime", "noise_blur",
                           "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["regime"] == "noise_blur"
    assert out.exists() and Path(str(out) + ".json").exists()


def test_empty_slices_get_the_volume_noise_level(tmp_path, capsys):
    data = np.zeros((16, 16, 3), np.float32)
    data[4:12, 4:12, 0] = 100.0
    data[2:14, 2:14, 2] = 50.0  # slice 1 stays all zero
    src = _write(tmp_path / "v.nii", data)
    rc = degrade(src, tmp_path / "d.nii", "--regime", "noise", "--snr-db", "5", "--noise-level", "slice")
    assert rc == 0
    rows = json.loads((tmp_path / "d.nii.json").read_text())["slices"]
    assert rows[1]["snr_db"] is None  # no signal, yet the scanner's noise: the volume's level
    assert rows[0]["snr_db"] == pytest.approx(5.0) and rows[2]["snr_db"] == pytest.approx(5.0)
    # the volume's noise level: its foreground power (the union of the slices' foregrounds) at the target SNR
    x = torch.from_numpy(np.moveaxis(data, 2, 0)).to(torch.complex64)
    mask = foreground_mask(x)
    power_volume = float((x.abs().double().square() * mask).sum() / mask.sum())
    assert rows[1]["noise_sigma"] == pytest.approx(math.sqrt(power_volume / 10 ** 0.5), rel=1e-5)
    for i in (0, 2):  # the others at their own power: slice 0 (8 x 8 at 100) has twice slice 2's amplitude
        power = float((x[i].abs().double().square() * mask[i]).sum() / mask[i].sum())
        assert rows[i]["noise_sigma"] == pytest.approx(math.sqrt(power / 10 ** 0.5), rel=1e-5)


@pytest.mark.parametrize("name", ["in.nii", "k.txt"])
def test_kspace_out_is_an_hdf5_name_and_never_the_input(small_volume, tmp_path, capsys, name):
    src = _write(tmp_path / "in.nii", np.ones((8, 8, 3), np.float32))
    before = src.read_bytes()
    argv = ["degrade", str(src), str(tmp_path / "out.nii"), "--regime", "noise",
            "--kspace-out", str(tmp_path / name)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--kspace-out {tmp_path / name}: must end with .h5 or .hdf5" in err
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.nii"]


def test_the_shortest_readout_is_degraded_with_b0(tmp_path, capsys):
    # slices of 24 x 7: the fewest readout samples lfmri takes (slices under 7x7 are refused, see
    # test_measurement_rules.py); B0 time segmentation on so short a readout is not an error
    data = np.zeros((24, 7, 3), np.float32)
    data[6:18] = 100.0
    path = tmp_path / "line.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    out, h5 = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    assert degrade(path, out, "--regime", "noise_blur_t2star_b0", "--seed", "1", "--kspace-out", h5) == 0, \
        capsys.readouterr().err
    img = nib.load(str(out))
    assert img.shape == data.shape and np.all(np.isfinite(img.get_fdata()))
    _assert_the_record_reproduces_the_outputs(data, out, h5)


def _reapply(volume: np.ndarray, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The degraded k-space [S, H, W] and field maps [S, H, W] rebuilt from OUTPUT.json alone: the regime's
    `LowFieldDegradation.apply` on each clean slice with the slice's recorded parameters and its own generator
    (seeded from (seed, i + 1)), which draws the slice's field map (B0 regimes), then its noise."""
    degradation = make_regime(record["regime"])
    slices = np.moveaxis(volume.astype(np.float32), record["slice_axis"], 0)
    height, width = slices.shape[1:]
    ys, maps = [], []
    for i, row in enumerate(record["slices"]):
        assert row["slice"] == i
        # the documented seeding (not the command's function: a change to it must fail here)
        seed = int(np.random.SeedSequence([record["seed"], i + 1]).generate_state(1, dtype=np.uint64)[0])
        g = torch.Generator().manual_seed(seed)
        params = neutral_params(1, height, width)  # a step the regime lacks is recorded as null: neutral
        params.update({k: torch.tensor([float(v)]) for k, v in row.items()
                       if k not in ("slice", "snr_db") and v is not None})
        if degradation.b0 is not None:
            params["b0_map_hz"] = degradation.sample_map(params["b0_max_hz"], height, width, g)
        x = torch.from_numpy(slices[i]).to(torch.complex64)[None, None]
        ys.append(degradation.apply(x, params, g)[0, 0])
        maps.append(params["b0_map_hz"][0, 0])
    return torch.stack(ys), torch.stack(maps)


def _assert_the_record_reproduces_the_outputs(volume: np.ndarray, out: Path, h5: Path) -> None:
    """OUTPUT.json's parameters and seed give back the written k-space, field maps and magnitude."""
    record = json.loads(Path(str(out) + ".json").read_text())
    y, maps = _reapply(volume, record)
    with h5py.File(h5) as f:
        kspace, b0_map = torch.from_numpy(f["kspace"][()]), f.get("b0_map_hz")
        b0_map = None if b0_map is None else torch.from_numpy(b0_map[()])
    scale = float(kspace.abs().max())
    torch.testing.assert_close(y, kspace, rtol=0, atol=1e-5 * scale)
    if b0_map is not None:
        torch.testing.assert_close(maps, b0_map, rtol=0, atol=1e-4)
    magnitude = np.moveaxis(ifft2c(y).abs().numpy(), 0, record["slice_axis"])
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), magnitude, rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------- coils and undersampling (issue 24)
BAD_ACQUISITION = {
    "no coils": (["--coils", "0"], "--coils: must be 1 to 64, got 0"),
    "too many coils": (["--coils", "65"], "--coils: must be 1 to 64, got 65"),
    "acceleration": (["--acceleration", "0.5"], "--acceleration: must be >= 1"),
    "acceleration nan": (["--acceleration", "nan"], "--acceleration: must be >= 1"),
    "no centre": (["--center-fraction", "0"], "--center-fraction: must be between 0 and 1"),
    "all centre": (["--center-fraction", "1"], "--center-fraction: must be between 0 and 1"),
    "mask": (["--mask", "radial"], "--mask: unknown kind 'radial'"),
    "centre too wide": (["--acceleration", "4", "--center-fraction", "0.5"], "--center-fraction"),
}


@pytest.mark.parametrize("case", sorted(BAD_ACQUISITION))
def test_acquisition_options_are_checked_and_create_nothing(small_volume, tmp_path, capsys, case):
    extra, problem = BAD_ACQUISITION[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = main(["degrade", str(small_volume), str(outdir / "d.nii.gz"), "--regime", "noise", *extra,
               "--kspace-out", str(outdir / "k.h5")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and problem in err, err
    assert list(outdir.iterdir()) == []


def test_acquisition_options_need_kspace_out(small_volume, tmp_path, capsys):
    """The multi-coil / undersampled measurement lives only in the k-space file: without --kspace-out the
    options are refused (a NIfTI alone would be reconstructed as fully sampled single-coil data)."""
    rc = main(["degrade", str(small_volume), str(tmp_path / "d.nii.gz"), "--regime", "noise", "--coils", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "need --kspace-out" in err and list(tmp_path.iterdir()) == []


def test_multicoil_undersampled_kspace_in_fastmri_layout(small_volume, tmp_path, capsys):
    """`--coils 4 --acceleration 4`: fastMRI's layout on disk ([S, C, H_f, W_f] = [6, 4, 72, 64], readout
    along H_f = the NIfTI slice's W), an equispaced 1D mask over W_f with the centre lines, exact zeros where
    unsampled; y - M A_c x on the sampled samples is noise at the recorded level (the SNR of the fully
    sampled single-coil image); the NIfTI is the coil-combined zero-filled magnitude."""
    from datamodules.kspace_files import read_kspace_file
    from degradations import birdcage_sensitivities

    out, h5 = tmp_path / "deg.nii.gz", tmp_path / "k.h5"
    common = ("--regime", "noise_blur", "--seed", "2", "--snr-db", "10")
    assert degrade(small_volume, out, *common, "--coils", "4", "--acceleration", "4", "--center-fraction",
                   "0.16", "--kspace-out", h5) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["coils"], summary["acceleration"], summary["mask"]) == (4, 4.0, "equispaced")
    with h5py.File(h5) as f:
        raw, mask, attrs = f["kspace"][()], f["mask"][()], dict(f.attrs)
        sigma = f["noise_sigma"][()]
        assert "ismrmrd_header" in f
    assert raw.shape == (6, 4, 72, 64) and raw.dtype == np.complex64
    assert mask.shape == (64,) and mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    assert mask[27:37].all() and 0.2 < mask.mean() < 0.4  # 10 centre lines (fastMRI's placement)
    assert summary["sampled_fraction"] == pytest.approx(mask.mean())
    assert not raw[..., mask == 0].any() and raw[..., mask == 1].all()
    assert (attrs["n_coils"], attrs["acceleration"], attrs["mask_kind"]) == (4, 4.0, "equispaced")
    assert attrs["lfmri_inplane"] == "transposed" and attrs["regime"] == "noise_blur"

    k = read_kspace_file(h5)  # lfmri's order again: [S, C, H, W] = [6, 4, 64, 72], rows masked
    y = torch.from_numpy(k.kspace)
    src = nib.load(str(small_volume))
    clean = torch.from_numpy(np.moveaxis(np.asarray(src.dataobj, np.float32), 2, 0)).to(torch.complex64)
    maps = birdcage_sensitivities(4, 64, 72)[None].expand(6, -1, -1, -1)
    params = {key: torch.full((6,), float(attrs[key])) for key in ("fwhm_px", "t2star_ms", "readout_ms",
                                                                  "te_ms")}
    params.update(b0_map_hz=torch.zeros(6, 1, 64, 72), sensitivities=maps,
                  mask=torch.from_numpy(k.mask).expand(6, 1, 64, 72))
    residual = y - ForwardOperator.from_params(params).forward(clean[:, None])
    sampled = torch.from_numpy(mask).bool()
    noise_var = residual[:, :, sampled].abs().square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(noise_var, torch.from_numpy(sigma) ** 2, rtol=0.1, atol=0.0)
    # the noise level of the same acquisition with one coil, fully sampled (the SNR's definition)
    single = tmp_path / "single.h5"
    assert degrade(small_volume, tmp_path / "single.nii.gz", *common, "--kspace-out", single) == 0
    with h5py.File(single) as f:
        np.testing.assert_array_equal(f["noise_sigma"][()], sigma)
        assert float(f.attrs["fwhm_px"]) == attrs["fwhm_px"]
    combined = (maps.conj() * ifft2c(y)).sum(1).abs().numpy()
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), np.moveaxis(combined, 0, 2), rtol=1e-4,
                               atol=1e-4 * combined.max())


def test_poisson_mask_is_written_2d_and_read_back(small_volume, tmp_path, capsys):
    """`--mask poisson` (2D phase encoding): a 2D mask [H_f, W_f] on disk, zeros where it is 0; read back
    into lfmri's [1, 1, H, W] order; one coil keeps fastMRI's single-coil layout [S, H_f, W_f]."""
    from datamodules.kspace_files import read_kspace_file

    h5 = tmp_path / "k.h5"
    assert degrade(small_volume, tmp_path / "d.nii.gz", "--regime", "noise", "--acceleration", "3", "--mask",
                   "poisson", "--center-fraction", "0.2", "--kspace-out", h5) == 0
    with h5py.File(h5) as f:
        raw, mask = f["kspace"][()], f["mask"][()]
    assert raw.shape == (6, 72, 64) and mask.shape == (72, 64)
    assert not (mask == mask[:, :1]).all() and not raw[:, mask == 0].any() and raw[:, mask == 1].all()
    k = read_kspace_file(h5)
    np.testing.assert_array_equal(k.mask[0, 0], mask.T)
    assert json.loads(capsys.readouterr().out)["sampled_fraction"] == pytest.approx(mask.mean())
