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
    from datamodules.io import NIFTI_SUFFIXES

    # the outputs (the NIfTI, its JSON, the k-space file), before any work: the shared checks
    output = check_output_file(args.output, "OUTPUT", NIFTI_SUFFIXES, (args.input,))
    check_output_file(str(args.output) + ".json", "OUTPUT.json", (), (args.input,))
    if args.kspace_out:
        kspace = check_output_file(args.kspace_out, "--kspace-out", KSPACE_SUFFIXES, (args.input,))
        if kspace.resolve() == output.resolve():
            raise InputError(f"--kspace-out: {args.kspace_out} is the same file as the output")


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
                            args.noise_level)
    record = {"input": str(Path(args.input).resolve()), "output": str(Path(args.output).resolve()),
              "kspace_out": str(Path(args.kspace_out).resolve()) if args.kspace_out else None,
              "regime": args.regime, "seed": args.seed, "slice_axis": args.slice_axis % 3,
              "shape": list(result["kspace"].shape), **result["summary"], "slices": result["slices"]}
    _write_outputs(args, img, result, record)
    summary = {k: v for k, v in record.items() if k != "slices"}
    print(json.dumps({**summary, "n_slices": len(record["slices"]),
                      "parameters": str(Path(str(args.output) + ".json").resolve())}))
    return 0


def degrade_volume(data: np.ndarray, regime: str, seed: int, slice_axis: int, snr_db: float | None,
                   batch_size: int, noise_level: str = "slice") -> dict[str, Any]:
    """Degrade every slice of a 3D volume; see the module docstring for the model and the seeding.

    Returns a dict with `magnitude` (float32, same shape as `data`), `kspace` complex64 `[S, H, W]`,
    `b0_map_hz` float32 `[S, H, W]` or `None`, `noise_sigma` / `snr_db` float32 `[S]`, `scalars`
    (the volume's parameters), `summary` and `slices` (JSON-ready).
    """
    import torch

    from degradations import ComplexGaussianNoise, ifft2c, make_regime, params_to_jsonable
    from degradations.snr import foreground_power_sums, sigma_for_power, snr_db_for_power

    degradation = make_regime(regime, **({} if snr_db is None else {"snr_db": snr_db}))
    slices = np.ascontiguousarray(np.moveaxis(data, slice_axis, 0), dtype=np.float32)
    n_slices, height, width = slices.shape
    x_all = torch.from_numpy(slices).to(torch.complex64)[:, None]
    scalars = degradation.sample_scalars(1, torch.Generator().manual_seed(slice_seed(seed, 0)))
    generators = [torch.Generator().manual_seed(slice_seed(seed, i + 1)) for i in range(n_slices)]

    k0 = torch.empty_like(x_all)
    b0_maps = torch.zeros(n_slices, 1, height, width) if degradation.b0 is not None else None
    fg_sum = torch.zeros(n_slices, dtype=torch.float64)
    fg_count = torch.zeros(n_slices, dtype=torch.float64)
    with torch.inference_mode(), tqdm(total=n_slices, desc=f"degrade ({regime})", unit="slice",
                                      file=sys.stderr) as bar:
        for start in range(0, n_slices, batch_size):
            stop = min(start + batch_size, n_slices)
            params = {key: value.expand(stop - start) for key, value in scalars.items()}
            params["b0_map_hz"] = torch.zeros(stop - start, 1, height, width)
            if b0_maps is not None:
                b0_max = scalars["b0_max_hz"]
                b0_maps[start:stop] = torch.cat([degradation.sample_map(b0_max, height, width, g)
                                                 for g in generators[start:stop]])
                params["b0_map_hz"] = b0_maps[start:stop]
            operator = degradation.operator(params)
            k0[start:stop] = operator.forward(x_all[start:stop])
            x_in = operator.noise_free_image(x_all[start:stop], k0[start:stop])
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
        magnitude = ifft2c(y).abs()[:, 0].numpy()

    realised = torch.where(fg_count > 0, snr_db_for_power(power_slice, sigma.double() ** 2),
                           torch.tensor(math.nan, dtype=torch.float64)).to(torch.float32)
    per_slice = {key: value.expand(n_slices) for key, value in scalars.items()}
    per_slice.update({"snr_db": realised, "noise_sigma": sigma})
    rows = [{"slice": i, **row} for i, row in enumerate(params_to_jsonable(per_slice))]
    summary = {"noise_level": noise_level, "snr_db_target": target, "signal_power_volume": power_volume,
               "noise_sigma_volume": float(sigma[0]) if noise_level == "volume" else None,
               "b0_method": degradation.b0.method if degradation.b0 is not None else None}
    return {"magnitude": np.moveaxis(magnitude, 0, slice_axis), "kspace": y[:, 0].numpy(),
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
        if h5_tmp is not None:
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
