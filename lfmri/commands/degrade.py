"""`lfmri degrade`: simulate a portable low-field acquisition of each 2D slice of a magnitude NIfTI volume.

Each slice (in the order of `--slice-axis`; the `H, W` plane is the other two axes in array order, readout
along `W`, the volume's last remaining axis) is a real image in the input's own intensity units (no
normalisation), degraded in k-space by the regime's physics (`degradations`) and written back as the
magnitude `|ifft2c(y)|`. This is the one slice layout of lfmri (`datamodules.transforms.to_slices`): the
data module trains and evaluates on it and `lfmri reconstruct` reads it, so T2* and B0 artefacts run along the
same anatomical axis everywhere.

The acquisition parameters (blur FWHM, T2*, readout, TE, max off-resonance, target SNR) are drawn once per
volume; each slice gets its own smooth field map. With `--noise-level slice` (default) the noise std per
complex sample is set per slice from that slice's own foreground power, so every slice's SNR equals the target
as in the data module's on-the-fly degradations (the SNR convention the model is trained and evaluated with;
slices with an empty foreground, i.e. all zero, use `P_vol`). With `--noise-level volume` one noise std
serves the whole acquisition, as on a scanner: `10 log10(P_vol / sigma^2)` equals the target, `P_vol` the
mean `|x|^2` over the union of the per-slice foregrounds (`degradations.foreground_mask`) of the
noise-free degraded slices, and slices with less tissue get a lower SNR of their own. The realised per-slice
SNR (`null` for an empty slice) and sigma are reported either way.

Randomness: a volume generator seeded from `(seed, 0)` draws the acquisition parameters; slice `i` has
its own generator seeded from `(seed, i + 1)` (`numpy.random.SeedSequence`) for its field map and noise,
so the output does not depend on `--batch-size`.

Input: a 3D magnitude volume that passes lfmri's input rule (`lfmri_utils.volumes.check_volume`): finite,
not all zero (the SNR of an empty volume is undefined), no negative voxel, and slices along `--slice-axis` of
at least 7x7 (SSIM's window: a smaller slice could not be scored); anything else is refused before any work.

Outputs (each written to a temporary file, then renamed; nothing is created on error):

* `OUTPUT` (`.nii` / `.nii.gz`): float32 magnitude with the input's affine and header;
* `OUTPUT.json`: input, output, regime, seed, slice axis, noise level, target SNR, volume signal power, and
  the realised parameters of every slice (stdout gets one line: the same record without the per-slice list,
  its slice count and where the file is, `parameters`);
* `--kspace-out F.h5`: dataset `kspace` complex64 `[slices, H, W]` (the degraded k-space, centred
  orthonormal FFT); `noise_sigma` and `snr_db` float32 `[slices]`; `b0_map_hz` float32
  `[slices, H, W]` when the regime has B0; attributes: the volume's scalar parameters (`fwhm_px`,
  `t2star_ms`, `t2star_gre`, `readout_ms`, `te_ms`, `b0_max_hz`, `snr_db_target`), `b0_method`,
  `regime`, `seed`, `slice_axis`, `noise_level`, `input`. With these `degradations.build_operator`
  rebuilds `A` per slice (`t2star_ms = inf` means no decay).

Several coils and undersampling (`--coils N`, `--acceleration R`, `--center-fraction F`, `--mask
random|equispaced|poisson`; defaults 1 coil, R = 1 = fully sampled, F = 0.08, equispaced): the regime gets
these steps (`degradations.make_regime(..., coils=, acceleration=, center_fraction=, mask=)`): simulated
birdcage coil maps (`degradations.birdcage_sensitivities`, sum_c |s_c|^2 = 1) and ONE sampling mask for the
whole volume, drawn from the volume generator (fastMRI's Cartesian line masks along the phase-encoding axis H,
or SigPy's 2D Poisson disc; `degradations.masks`). y = M (A_c x + n) per coil: exact zeros where not sampled,
the noise only on sampled samples, its std set by the SNR of the fully sampled single-coil image (so the SNR
numbers keep their meaning). Giving any of these four options (even at its default value) needs
`--kspace-out` (the measurement lives only there; a NIfTI alone would be read back as fully sampled
single-coil data) and changes two outputs:
* `OUTPUT` is the coil-combined ZERO-FILLED magnitude `|sum_c conj(s_c) ifft2c(y_c)|` (aliased where
  undersampled), and `OUTPUT.json` also records `coils`, `acceleration`, `center_fraction`, `mask` and the
  `sampled_fraction`;
* `--kspace-out` is written in fastMRI's layout (`datamodules.kspace_files.write_kspace_file`): `kspace`
  complex64 `[slices, coils, H_f, W_f]` (`[slices, H_f, W_f]` for one coil) with the readout along H_f (the
  NIfTI slice's W) and phase encoding along W_f, zeros where unsampled, `mask` float32 `[W_f]` (2D
  `[H_f, W_f]` for Poisson), an `ismrmrd_header`, `noise_sigma`, `snr_db`, `b0_map_hz` (transposed the same
  way), the attributes above plus `acceleration`, `center_fraction`, `mask_kind`, `n_coils`, `nifti_affine`
  and `lfmri_layout` / `lfmri_inplane` (the in-plane axes are the NIfTI's, transposed). `lfmri reconstruct
  K.h5 OUT.nii.gz --ckpt C` reconstructs it (for several coils ESPIRiT needs a fully sampled centre of at
  least 8 lines, in practice about 12: round(H * F), which must also stay below H / R).
Without these options every output is what it was (byte for byte).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_output_file
from lfmri_utils.seeding import check_seed
from lfmri_utils.volumes import check_volume

SNR_DB_LIMITS = (-10.0, 60.0)
NOISE_LEVELS = ("volume", "slice")
KSPACE_SUFFIXES = (".h5", ".hdf5")  # --kspace-out is HDF5: the name says so
MASK_KINDS = ("random", "equispaced", "poisson")
MAX_COILS = 64
#: the acquisition options and their defaults (`--coils` ...); any given -> the fastMRI-layout outputs
ACQUISITION_DEFAULTS = {"coils": 1, "acceleration": 1.0, "center_fraction": 0.08, "mask": "equispaced"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `degrade` parser."""
    p = subparsers.add_parser(
        "degrade", help="degrade a NIfTI volume with a low-field physics regime",
        description="Degrade each 2D slice of a magnitude NIfTI volume with a portable low-field MRI regime "
                    "(blur, T2*, B0, complex k-space noise) and write the magnitude NIfTI, the realised "
                    "parameters (OUTPUT.json) and optionally the degraded k-space (HDF5).")
    p.add_argument("input", help="magnitude NIfTI volume (.nii / .nii.gz), 3D")
    p.add_argument("output", help="output NIfTI path (.nii / .nii.gz); parameters go to OUTPUT.json")
    p.add_argument("--regime", required=True,
                   help="noise | noise_blur | noise_blur_t2star | noise_blur_t2star_b0")
    p.add_argument("--snr-db", type=float, default=None,
                   help=f"target SNR in dB, {SNR_DB_LIMITS[0]:g} to {SNR_DB_LIMITS[1]:g} "
                        "(default: drawn from the regime's 2-7 dB range)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0 to 2^32 - 1); same seed, same output")
    p.add_argument("--slice-axis", type=int, default=2, help="axis of the volume to slice along (default 2)")
    p.add_argument("--kspace-out", default=None, help="also write the degraded k-space to this HDF5 file")
    p.add_argument("--batch-size", type=int, default=16, help="slices processed together (speed only)")
    p.add_argument("--noise-level", default="slice",
                   help="slice (every slice's SNR = target, default) or volume (one noise std per volume)")
    p.add_argument("--coils", type=int, default=None,
                   help=f"receive coils, 1 to {MAX_COILS} (simulated birdcage maps; default 1); needs "
                        "--kspace-out")
    p.add_argument("--acceleration", type=float, default=None,
                   help="undersampling factor R >= 1 (default 1: fully sampled); needs --kspace-out")
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fraction of fully sampled centre lines, 0 < F < 1 (default 0.08); needs "
                        "--kspace-out")
    p.add_argument("--mask", default=None,
                   help="random | equispaced | poisson (default equispaced); needs --kspace-out")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    from degradations import REGIMES

    if args.regime not in REGIMES:
        raise InputError(f"--regime: unknown regime {args.regime!r}; valid regimes: {', '.join(REGIMES)}")
    lo, hi = SNR_DB_LIMITS
    if args.snr_db is not None and not (math.isfinite(args.snr_db) and lo <= args.snr_db <= hi):
        raise InputError(f"--snr-db: {args.snr_db:g} dB is outside the supported range [{lo:g}, {hi:g}] dB")
    from datamodules.transforms import check_slice_axis

    check_slice_axis(args.slice_axis)
    check_seed(args.seed)
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.noise_level not in NOISE_LEVELS:
        raise InputError(f"--noise-level: unknown value {args.noise_level!r}; choose volume or slice")
    acquisition = _acquisition(args)
    if acquisition is not None:
        _check_acquisition(acquisition, args.kspace_out)
    from datamodules.io import NIFTI_SUFFIXES

    # the outputs (the NIfTI, its JSON, the k-space file), before any work: the shared checks
    output = check_output_file(args.output, "OUTPUT", NIFTI_SUFFIXES, (args.input,))
    check_output_file(str(args.output) + ".json", "OUTPUT.json", (), (args.input,))
    if args.kspace_out:
        kspace = check_output_file(args.kspace_out, "--kspace-out", KSPACE_SUFFIXES, (args.input,))
        if kspace.resolve() == output.resolve():
            raise InputError(f"--kspace-out: {args.kspace_out} is the same file as the output")


def _acquisition(args: argparse.Namespace) -> dict[str, Any] | None:
    """The acquisition options with their defaults filled in, or None when none was given."""
    given = {key: getattr(args, key, None) for key in ACQUISITION_DEFAULTS}
    if all(value is None for value in given.values()):
        return None
    return {key: ACQUISITION_DEFAULTS[key] if value is None else value for key, value in given.items()}


def _check_acquisition(acquisition: dict[str, Any], kspace_out: str | None) -> None:
    """InputError (one line naming the option) for an acquisition option out of range, or without
    `--kspace-out`."""
    coils, acceleration = acquisition["coils"], acquisition["acceleration"]
    fraction = acquisition["center_fraction"]
    if not 1 <= coils <= MAX_COILS:
        raise InputError(f"--coils: must be 1 to {MAX_COILS}, got {coils}")
    if not (math.isfinite(acceleration) and acceleration >= 1):
        raise InputError(f"--acceleration: must be >= 1 (1 = fully sampled), got {acceleration:g}")
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise InputError(f"--center-fraction: must be between 0 and 1 (exclusive), got {fraction:g}")
    if acquisition["mask"] not in MASK_KINDS:
        raise InputError(f"--mask: unknown kind {acquisition['mask']!r}; choose {', '.join(MASK_KINDS)}")
    if not kspace_out:
        raise InputError("--coils / --acceleration / --center-fraction / --mask: need --kspace-out (the "
                         "multi-coil or undersampled measurement is written only there)")


def slice_seed(seed: int, index: int) -> int:
    """Seed of stream `index` (0: the volume, `i + 1`: slice `i`) derived from the user's `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def run(args: argparse.Namespace) -> int:
    """Run `lfmri degrade`; bad input raises `InputError`."""
    _validate(args)
    from datamodules.io import load_nifti

    data, img = load_nifti(args.input)
    check_volume(data, args.input, args.slice_axis, kind="magnitude")  # before any work
    result = degrade_volume(data, args.regime, args.seed, args.slice_axis % 3, args.snr_db, args.batch_size,
                            args.noise_level, _acquisition(args))
    record = {"input": str(Path(args.input).resolve()), "output": str(Path(args.output).resolve()),
              "kspace_out": str(Path(args.kspace_out).resolve()) if args.kspace_out else None,
              "regime": args.regime, "seed": args.seed, "slice_axis": args.slice_axis % 3,
              "shape": list(result["kspace"].shape), **result["summary"], "slices": result["slices"]}
    _write_outputs(args, img, result, record)
    summary = {k: v for k, v in record.items() if k != "slices"}
    print(json.dumps({**summary, "n_slices": len(record["slices"]),
                      "parameters": str(Path(str(args.output) + ".json").resolve())}))
    return 0


def _acquisition_steps(regime: str, overrides: dict[str, Any], acquisition: dict[str, Any]) -> Any:
    """`make_regime` with the acquisition options (the mask's kind and centre only when undersampled);
    InputError for options the mask steps refuse."""
    from degradations import make_regime

    overrides = {**overrides, "coils": acquisition["coils"], "acceleration": acquisition["acceleration"]}
    if acquisition["acceleration"] > 1:
        overrides.update(mask=acquisition["mask"], center_fraction=acquisition["center_fraction"])
    try:
        return make_regime(regime, **overrides)
    except ValueError as err:
        raise InputError(f"--coils / --acceleration / --center-fraction / --mask: {err}") from None


def _acquisition_params(degradation: Any, height: int, width: int, generator: Any) -> dict[str, Any]:
    """The volume's coil maps (complex64 [1, C, H, W]; none for one coil) and sampling mask (float32
    [1, 1, H, W], drawn with the volume `generator`; none when fully sampled); InputError when the mask
    cannot be drawn for this matrix (e.g. a centre wider than H / R)."""
    try:
        return degradation.sample_acquisition(1, height, width, generator)
    except ValueError as err:
        raise InputError(f"--acceleration / --center-fraction / --mask: {err} (phase-encoding lines "
                         f"H = {height})") from None


def degrade_volume(data: np.ndarray, regime: str, seed: int, slice_axis: int, snr_db: float | None,
                   batch_size: int, noise_level: str = "slice",
                   acquisition: dict[str, Any] | None = None) -> dict[str, Any]:
    """Degrade every slice of a 3D volume; see the module docstring for the model and the seeding.

    `acquisition`: the coils and undersampling (`--coils`, ...: `ACQUISITION_DEFAULTS`' keys), or None.
    Returns a dict with `magnitude` (float32, same shape as `data`; with `acquisition` the coil-combined
    zero-filled one), `kspace` complex64 `[S, H, W]` (with `acquisition` `[S, C, H, W]`), `mask` float32
    `[1, 1, H, W]` or None, `b0_map_hz` float32 `[S, H, W]` or `None`, `noise_sigma` / `snr_db` float32 `[S]`,
    `scalars` (the volume's parameters), `summary` and `slices` (JSON-ready).
    """
    import torch

    from degradations import ComplexGaussianNoise, ifft2c, make_regime, params_to_jsonable
    from degradations.snr import foreground_power_sums, sigma_for_power, snr_db_for_power

    overrides: dict[str, Any] = {} if snr_db is None else {"snr_db": snr_db}
    degradation = make_regime(regime, **overrides) if acquisition is None else \
        _acquisition_steps(regime, overrides, acquisition)
    slices = np.ascontiguousarray(np.moveaxis(data, slice_axis, 0), dtype=np.float32)
    n_slices, height, width = slices.shape
    x_all = torch.from_numpy(slices).to(torch.complex64)[:, None]
    volume_generator = torch.Generator().manual_seed(slice_seed(seed, 0))
    scalars = degradation.sample_scalars(1, volume_generator)
    generators = [torch.Generator().manual_seed(slice_seed(seed, i + 1)) for i in range(n_slices)]
    extra = {} if acquisition is None else _acquisition_params(degradation, height, width, volume_generator)
    maps = extra.get("sensitivities")

    k0 = torch.empty(n_slices, 1 if maps is None else maps.shape[1], height, width, dtype=torch.complex64)
    b0_maps = torch.zeros(n_slices, 1, height, width) if degradation.b0 is not None else None
    fg_sum = torch.zeros(n_slices, dtype=torch.float64)
    fg_count = torch.zeros(n_slices, dtype=torch.float64)
    with torch.inference_mode(), tqdm(total=n_slices, desc=f"degrade ({regime})", unit="slice",
                                      file=sys.stderr) as bar:
        for start in range(0, n_slices, batch_size):
            stop = min(start + batch_size, n_slices)
            params = {key: value.expand(stop - start) for key, value in scalars.items()}
            params.update({key: value.expand(stop - start, *value.shape[1:]) for key, value in extra.items()})
            params["b0_map_hz"] = torch.zeros(stop - start, 1, height, width)
            if b0_maps is not None:
                b0_max = scalars["b0_max_hz"]
                b0_maps[start:stop] = torch.cat([degradation.sample_map(b0_max, height, width, g)
                                                 for g in generators[start:stop]])
                params["b0_map_hz"] = b0_maps[start:stop]
            operator = degradation.operator(params)
            k0[start:stop] = operator.forward(x_all[start:stop])
            # the SNR's image: the fully sampled single-coil one (k0 gives it only without coils and mask)
            x_in = operator.noise_free_image(x_all[start:stop], None if extra else k0[start:stop])
            fg_sum[start:stop], fg_count[start:stop] = foreground_power_sums(x_in)
            bar.update(stop - start)

        power_volume = float(fg_sum.sum() / fg_count.sum())
        power_slice = torch.where(fg_count > 0, fg_sum / fg_count.clamp_min(1.0), torch.tensor(power_volume))
        target = float(scalars["snr_db"][0])
        power_for_sigma = power_slice if noise_level == "slice" else torch.full((n_slices,), power_volume)
        sigma = sigma_for_power(power_for_sigma, target).to(torch.float32)
        noise = torch.cat([ComplexGaussianNoise.draw(k0[i:i + 1], sigma[i:i + 1], generators[i])
                           for i in range(n_slices)])
        y = k0 + noise
        if "mask" in extra:
            y = y * extra["mask"]  # exact zeros where not sampled: the noise only on sampled samples
        images = ifft2c(y)
        if maps is not None:  # coil-combined zero-filled image
            images = (maps.conj() * images).sum(dim=1, keepdim=True)
        magnitude = images.abs()[:, 0].numpy()

    realised = torch.where(fg_count > 0, snr_db_for_power(power_slice, sigma.double() ** 2),
                           torch.tensor(math.nan, dtype=torch.float64)).to(torch.float32)
    per_slice = {key: value.expand(n_slices) for key, value in scalars.items()}
    per_slice.update({"snr_db": realised, "noise_sigma": sigma})
    rows = [{"slice": i, **row} for i, row in enumerate(params_to_jsonable(per_slice))]
    summary = {"noise_level": noise_level, "snr_db_target": target, "signal_power_volume": power_volume,
               "noise_sigma_volume": float(sigma[0]) if noise_level == "volume" else None,
               "b0_method": degradation.b0.method if degradation.b0 is not None else None}
    mask = extra["mask"].numpy() if "mask" in extra else None
    if acquisition is not None:
        summary.update({**acquisition, "sampled_fraction": 1.0 if mask is None else float(mask.mean())})
    return {"magnitude": np.moveaxis(magnitude, 0, slice_axis),
            "kspace": y.numpy() if acquisition is not None else y[:, 0].numpy(), "mask": mask,
            "b0_map_hz": None if b0_maps is None else b0_maps[:, 0].numpy(),
            "noise_sigma": sigma.numpy(), "snr_db": realised.numpy(),
            "scalars": {key: float(value[0]) for key, value in scalars.items()},
            "summary": summary, "slices": rows}


def _write_outputs(args: argparse.Namespace, img: Any, result: dict[str, Any],
                   record: dict[str, Any]) -> None:
    """Write the NIfTI, the JSON and the optional HDF5 via temporary files renamed only when all succeeded."""
    import nibabel as nib

    from datamodules.io import nifti_like

    with contextlib.ExitStack() as stack:
        nii_tmp = stack.enter_context(atomic_path(args.output))
        json_tmp = stack.enter_context(atomic_path(str(args.output) + ".json"))
        h5_tmp = stack.enter_context(atomic_path(args.kspace_out)) if args.kspace_out else None
        nib.save(nifti_like(result["magnitude"], img), str(nii_tmp))
        json_tmp.write_text(json.dumps(record, indent=2) + "\n")
        if h5_tmp is not None and "coils" in record:
            _write_fastmri_kspace(h5_tmp, result, record, img)
        elif h5_tmp is not None:
            _write_kspace(h5_tmp, result, record)


def _write_kspace(path: Path, result: dict[str, Any], record: dict[str, Any]) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=result["kspace"].astype(np.complex64))
        f.create_dataset("noise_sigma", data=result["noise_sigma"].astype(np.float32))
        f.create_dataset("snr_db", data=result["snr_db"].astype(np.float32))
        if result["b0_map_hz"] is not None:
            f.create_dataset("b0_map_hz", data=result["b0_map_hz"].astype(np.float32))
        for key, value in result["scalars"].items():
            f.attrs["snr_db_target" if key == "snr_db" else key] = value
        for key in ("regime", "seed", "slice_axis", "noise_level", "input"):
            f.attrs[key] = record[key]
        f.attrs["b0_method"] = record["b0_method"] or "none"
        f.attrs["fft"] = "centred orthonormal 2D FFT over (H, W); readout along W"


def _write_fastmri_kspace(path: Path, result: dict[str, Any], record: dict[str, Any], img: Any) -> None:
    """The multi-coil / undersampled k-space in fastMRI's layout (module docstring)."""
    from datamodules.kspace_files import write_kspace_file

    axis = record["slice_axis"]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    rows, readout = (a for a in range(3) if a != axis)  # the slice's H (phase encoding) and W (readout)
    scalars = {("snr_db_target" if key == "snr_db" else key): value
               for key, value in result["scalars"].items()}
    attrs = {key: record[key] for key in ("regime", "seed", "slice_axis", "noise_level", "input")}
    attrs.update({"b0_method": record["b0_method"] or "none", "acceleration": record["acceleration"],
                  "center_fraction": record["center_fraction"], "mask_kind": record["mask"]})
    write_kspace_file(path, result["kspace"], mask=result["mask"], noise_sigma=result["noise_sigma"],
                      b0_map_hz=result["b0_map_hz"], scalars=scalars, attrs=attrs,
                      datasets={"snr_db": result["snr_db"].astype(np.float32)},
                      voxel_mm=(zooms[readout], zooms[rows], zooms[axis]), affine=np.asarray(img.affine))
