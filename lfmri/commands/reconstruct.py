"""`lfmri reconstruct`: reconstruct a low-field magnitude NIfTI volume slice by slice with the score prior.

    lfmri reconstruct INPUT OUTPUT --ckpt C --regime R [--kspace F.h5] [--params F.json] [--samples K]
                      [--std-out STD.nii.gz] [--sampler S] [--steps N] [--t0 T] [--dc proximal|gradient]
                      [--dc-lambda L] [--dc-floor F] [--dc-weight W] [--noise-sigma S] [--resize]
                      [--slice-axis 2]

Inputs. Slices are taken along `--slice-axis` with the in-plane axes in array order and the readout along the
last one (`datamodules.transforms.to_slices`), exactly as `lfmri degrade` writes its k-space and the data
module trains:
- with `--kspace F.h5` (from `lfmri degrade --kspace-out`): data consistency uses the measured k-space
  (dataset `kspace`, complex [S, H, W]), its noise std per slice (dataset `noise_sigma`) and the forward
  operator A of the realised parameters: the per-slice parameters of the params JSON (`--params`,
  default INPUT + ".json" when it exists) or else the file's attributes, and its field maps `b0_map_hz` when
  the regime has B0;
- without `--kspace`: y = fft2c of the input magnitude slices. A comes from the params JSON when there is one
  (its field maps are not in the JSON: B0 is then taken as zero); otherwise from the regime's mid-range
  parameters (blur FWHM and T2* at the middle of the regime's default ranges, nominal readout and TE, spin
  echo) with NO B0 (an unknown field map cannot be guessed); with regime `noise`, A = fft2c.
- the k-space noise std: `--noise-sigma` (input units), else the recorded one (k-space file, params JSON),
  else estimated per slice from the measured k-space (`degradations.estimate_noise_sigma`). The JSON printed
  at the end gives the value used (`noise_sigma`: the median over slices, input units) and its origin.

Processing. The volume is normalised like the data module (divided by the 99.5th percentile of |input|) and
every slice is reconstructed at its own matrix (the network pads to its multiple and crops back) by the one
inference path (`lightning_modules.inference.Reconstructor`): nothing is resampled. `--resize` instead takes
the former path: each slice is zero-padded to a square and resized to the model's training size, the measured
k-space is resampled the same way (y' = fft2c(resize(ifft2c(y)))), A is adapted to that grid (blur FWHM and
readout duration scale by image_size / max(H, W), field maps are resized), the noise level is re-estimated on
that grid, and the result is resized back. The reconstruction (the mean of the K posterior magnitudes) and the
uncertainty map (their per-pixel std, `--std-out`, K >= 2) are multiplied by the scale (input units) and
written with the input's affine and header (float32). Sampler defaults (steps, t0, DC kind and strength) are
the sampler registry's (`lightning_modules.sampling.samplers.SAMPLERS`). Batches of slices run on CUDA when
available, with a progress bar.

Bad input (a checkpoint that is not ours, a NIfTI and k-space file or params file that disagree in shape or
regime, NaN in the input, a volume whose noise cannot be estimated, ...) -> one line on stderr, exit code 2,
nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lfmri.commands.sampler_options import add_sampler_arguments, check_checkpoint_argument, sampler_from_args
from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_input_file, check_output_file
from lfmri_utils.seeding import check_seed
from lfmri_utils.volumes import check_volume

#: per-slice scalar parameters of the forward operator, as `lfmri degrade` records them
SCALAR_KEYS = ("fwhm_px", "t2star_ms", "t2star_gre", "readout_ms", "te_ms", "b0_max_hz")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `reconstruct` parser."""
    p = subparsers.add_parser(
        "reconstruct", help="reconstruct a low-field magnitude NIfTI volume with the score prior",
        description="Reconstruct each slice of a low-field magnitude NIfTI by posterior sampling with "
                    "k-space data consistency; writes the reconstruction (and optionally the std map) with "
                    "the input's affine, in the input's units.")
    p.add_argument("input", help="low-field magnitude NIfTI (.nii / .nii.gz), 3D")
    p.add_argument("output", help="reconstruction NIfTI path (.nii / .nii.gz)")
    p.add_argument("--ckpt", required=True,
                   help="lfmri (ScoreModel) Lightning checkpoint, or reference-small (the shipped prior)")
    p.add_argument("--regime", required=True,
                   help="noise | noise_blur | noise_blur_t2star | noise_blur_t2star_b0")
    p.add_argument("--kspace", default=None, help="measured k-space HDF5 from `lfmri degrade --kspace-out`")
    p.add_argument("--params", default=None,
                   help="realised parameters JSON from `lfmri degrade` (default: INPUT.json when it exists)")
    add_sampler_arguments(p)
    p.add_argument("--noise-sigma", type=float, default=None,
                   help="k-space noise std per complex sample, input units (default: recorded or estimated)")
    p.add_argument("--resize", action="store_true",
                   help="resample slices to the model's training size and back (the former path)")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples K per slice, 1 to 1000 (mean is written)")
    p.add_argument("--std-out", default=None, help="write the per-pixel std of the K samples here (K >= 2)")
    p.add_argument("--slice-axis", type=int, default=2, help="axis of the volume to slice along (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=8, help="slices sampled together")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (0 to 2^32 - 1)")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    """The checks that need no torch (numbers, outputs, input files, --ckpt): a mistyped path is reported
    before the model code is imported."""
    from datamodules.io import NIFTI_SUFFIXES

    for name in ("samples", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    check_seed(args.seed)
    if args.noise_sigma is not None and not (math.isfinite(args.noise_sigma) and args.noise_sigma >= 0):
        raise InputError(f"--noise-sigma: must be finite and >= 0, got {args.noise_sigma}")
    if args.std_out and args.samples < 2:
        raise InputError("--std-out: the std map needs --samples >= 2")
    # the outputs are checked now, before any computing: suffix, not a folder, not an input, writable folder
    inputs = (args.input, args.ckpt, args.kspace, args.params)
    output = check_output_file(args.output, "OUTPUT", NIFTI_SUFFIXES, inputs)
    if args.std_out and check_output_file(args.std_out, "--std-out", NIFTI_SUFFIXES, inputs).resolve() == \
            output.resolve():
        raise InputError(f"--std-out {args.std_out}: is the same file as OUTPUT")
    check_input_file(args.input)
    if args.kspace:
        check_input_file(args.kspace, "--kspace")
    if args.params:
        check_input_file(args.params, "--params")
    check_checkpoint_argument(args.ckpt)


def _validate_options(args: argparse.Namespace) -> None:
    """The checks that need the degradations' and samplers' registries (torch, but no model yet): regime,
    slice axis, sampler options and `--samples` against a point-estimate sampler."""
    from datamodules.transforms import check_slice_axis
    from degradations import REGIMES

    if args.regime not in REGIMES:
        raise InputError(f"--regime: unknown regime {args.regime!r}; valid regimes: {', '.join(REGIMES)}")
    check_slice_axis(args.slice_axis)
    try:
        sampler_from_args(args, None)
    except ValueError as err:
        raise InputError(str(err)) from None


def _check_regime(source: str, recorded: Any, regime: str) -> None:
    if recorded not in (None, "", regime):
        raise InputError(f"{source}: recorded regime {recorded!r} disagrees with --regime {regime}")


def read_kspace(path: str | Path, shape: tuple[int, int, int], regime: str) -> dict[str, Any]:
    """The measured k-space file -> {"kspace": complex64 [S,H,W], "b0_map_hz": float32 [S,H,W] | None,
    "noise_sigma": float64 [S] | None (input units), "attrs": dict}; InputError when it is unreadable, lacks
    `kspace`, disagrees with the NIfTI's slice stack `shape` or with the regime, or holds NaN / Inf."""
    import h5py

    path = check_input_file(path, "--kspace")  # missing, a folder, not a regular file: said so
    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f:
                raise InputError(f"--kspace {path}: no dataset 'kspace'")
            kspace = np.asarray(f["kspace"])
            b0 = np.asarray(f["b0_map_hz"], dtype=np.float32) if "b0_map_hz" in f else None
            sigma = np.asarray(f["noise_sigma"], dtype=np.float64) if "noise_sigma" in f else None
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except InputError:
        raise
    except Exception as err:
        reason = " ".join(str(err).split())
        raise InputError(f"--kspace {path}: not a readable HDF5 file ({type(err).__name__}"
                         f"{': ' + reason if reason else ''})") from None
    if tuple(kspace.shape) != tuple(shape):
        raise InputError(f"--kspace {path}: k-space shape {tuple(kspace.shape)} disagrees with the NIfTI's "
                         f"slices {tuple(shape)} (slices along --slice-axis first)")
    if b0 is not None and tuple(b0.shape) != tuple(shape):
        raise InputError(f"--kspace {path}: b0_map_hz shape {tuple(b0.shape)} disagrees with the NIfTI's "
                         f"slices {tuple(shape)}")
    if not np.iscomplexobj(kspace):
        raise InputError(f"--kspace {path}: 'kspace' must be complex, got {kspace.dtype}")
    check_volume(kspace, f"--kspace {path}", 0, kind="kspace")  # finite, slice size, not all zero
    if b0 is not None and not np.all(np.isfinite(b0)):
        raise InputError(f"--kspace {path}: 'b0_map_hz' holds NaN or Inf")
    if sigma is not None and (sigma.shape != (shape[0],) or not np.all(np.isfinite(sigma)) or
                              np.any(sigma <= 0)):
        raise InputError(f"--kspace {path}: 'noise_sigma' must be {shape[0]} finite values > 0 (one per "
                         "slice; a recorded 0 is not a measurement: drop the dataset to have it estimated, "
                         "or give --noise-sigma)")
    _check_regime(f"--kspace {path}", attrs.get("regime"), regime)
    return {"kspace": kspace.astype(np.complex64), "b0_map_hz": b0, "noise_sigma": sigma, "attrs": attrs}


def read_params(path: str | Path, n_slices: int, regime: str) -> dict[str, Any]:
    """`lfmri degrade`'s JSON -> {"scalars": {key: float64 [S]}, "b0_method": str | None, "noise_sigma":
    float64 [S] | None (input units)}; InputError when it is unreadable, has no per-slice parameters, or
    disagrees with the NIfTI's slice count or regime."""
    path = check_input_file(path, "--params")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--params {path}: not a readable JSON file ({type(err).__name__})") from None
    rows = record.get("slices") if isinstance(record, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"--params {path}: no per-slice parameters ('slices'); "
                         "expected lfmri degrade's JSON")
    if len(rows) != n_slices:
        raise InputError(f"--params {path}: {len(rows)} slices of parameters disagree with the NIfTI's "
                         f"{n_slices} slices")
    _check_regime(f"--params {path}", record.get("regime"), regime)
    scalars = {}
    for key in SCALAR_KEYS:
        values = [r.get(key, None) for r in rows]
        if key == "t2star_ms":  # null = no decay
            values = [math.inf if v is None else v for v in values]
        if any(v is None for v in values):
            if key in ("t2star_gre", "b0_max_hz"):
                continue
            raise InputError(f"--params {path}: parameter {key!r} is missing for some slices")
        scalars[key] = np.asarray(values, dtype=np.float64)
    check_scalars(f"--params {path}", scalars)
    sigma = [r.get("noise_sigma") for r in rows]
    noise_sigma = None
    if all(isinstance(v, (int, float)) for v in sigma):
        noise_sigma = np.asarray(sigma, dtype=np.float64)
        if not np.all(np.isfinite(noise_sigma)) or np.any(noise_sigma <= 0):
            raise InputError(f"--params {path}: 'noise_sigma' must be finite and > 0 for every slice (a "
                             "recorded 0 is not a measurement: give --noise-sigma to assert exact data)")
    return {"scalars": scalars, "b0_method": record.get("b0_method"), "noise_sigma": noise_sigma}


#: the physical range of each recorded operator parameter: (lowest, whether the lowest itself is allowed,
#: whether +inf is allowed); t2star_gre is a flag (0 spin echo, 1 gradient echo)
SCALAR_RANGES = {"fwhm_px": (0.0, True, False), "t2star_ms": (0.0, False, True),
                 "t2star_gre": (0.0, True, False), "readout_ms": (0.0, False, False),
                 "te_ms": (0.0, True, False), "b0_max_hz": (0.0, True, False)}


def check_scalars(where: str, scalars: dict[str, np.ndarray]) -> None:
    """InputError (naming `where`, the parameter and the first bad slice) when a recorded operator parameter
    is NaN or outside its physical range (`SCALAR_RANGES`; `t2star_gre` must be 0 or 1)."""
    for key, values in scalars.items():
        low, closed, inf_ok = SCALAR_RANGES[key]
        ok = (values >= low) if closed else (values > low)
        ok &= np.isfinite(values) | (inf_ok & (values == np.inf))
        if key == "t2star_gre":
            ok &= np.isin(values, (0.0, 1.0))
        if not ok.all():
            first = int(np.flatnonzero(~ok)[0])
            bound = f"{'>=' if closed else '>'} {low:g}" + (" (inf allowed)" if inf_ok else "")
            if key == "t2star_gre":
                bound = "0 (spin echo) or 1 (gradient echo)"
            raise InputError(f"{where}: {key} of slice {first} is {values[first]:g}; it must be {bound}")


def _attrs_params(attrs: dict[str, Any], n_slices: int, where: str) -> dict[str, np.ndarray] | None:
    """Per-volume scalars of the k-space file's attributes, repeated per slice (None when absent); checked
    (`check_scalars`)."""
    if not all(k in attrs for k in ("fwhm_px", "t2star_ms", "readout_ms", "te_ms")):
        return None
    scalars = {k: np.full(n_slices, float(attrs[k])) for k in SCALAR_KEYS if k in attrs}
    check_scalars(where, scalars)
    return scalars


def mid_range_params(regime: str, n_slices: int) -> dict[str, np.ndarray]:
    """The regime's mid-range scalars per slice: blur FWHM and T2* at their range midpoints (or fixed values),
    nominal readout and TE, spin echo; neutral for the steps the regime lacks; no B0."""
    from degradations import make_regime

    degradation = make_regime(regime)
    nominal = degradation.timing.nominal(1)
    out = {"fwhm_px": 0.0, "t2star_ms": math.inf, "t2star_gre": 0.0,
           "readout_ms": float(nominal["readout_ms"][0]), "te_ms": float(nominal["te_ms"][0])}
    if degradation.blur is not None:
        blur = degradation.blur
        out["fwhm_px"] = blur.fwhm_px if blur.fwhm_px is not None else sum(blur.fwhm_px_range) / 2
    if degradation.t2star is not None:
        t2 = degradation.t2star
        out["t2star_ms"] = t2.t2star_ms if t2.t2star_ms is not None else sum(t2.t2star_ms_range) / 2
        out["t2star_gre"] = 1.0 if t2.mode == "gradient_echo" else 0.0
    return {k: np.full(n_slices, float(v)) for k, v in out.items()}


def operator_params_on_grid(scalars: dict[str, np.ndarray], b0_map_hz: np.ndarray | None,
                            in_shape: tuple[int, int], size: int | None) -> dict[str, Any]:
    """Batched params (torch, [S] and b0_map_hz [S,1,H,W]) of A on the slices' own grid (`size` None) or,
    for `--resize`, on the model's size x size grid (FWHM and readout scaled, field maps resized)."""
    import torch

    from datamodules.transforms import fit_to_square
    from degradations import neutral_params

    n = len(next(iter(scalars.values())))
    height, width = in_shape if size is None else (size, size)
    params = neutral_params(n, height, width)
    for key, values in scalars.items():
        params[key] = torch.as_tensor(values, dtype=torch.float32)
    if b0_map_hz is not None:
        params["b0_map_hz"] = torch.from_numpy(b0_map_hz)[:, None].float()
    if size is not None:
        factor = size / max(in_shape)
        params["fwhm_px"] = params["fwhm_px"] * factor
        params["readout_ms"] = params["readout_ms"] * factor
        if b0_map_hz is not None:
            params["b0_map_hz"] = fit_to_square(params["b0_map_hz"], size)
    params.pop("noise_sigma")  # the noise level is the measurement's own (`Measurement.noise_sigma`)
    return params


def run(args: argparse.Namespace) -> int:
    """Run `lfmri reconstruct`; bad input raises InputError before anything is written."""
    _validate(args)
    _validate_options(args)
    import nibabel as nib
    import torch

    from datamodules.io import load_nifti, nifti_like
    from datamodules.transforms import fit_to_square, from_slices, restore_shape, robust_scale, to_slices
    from degradations import Measurement, complex_to_channels, fft2c, ifft2c, make_regime
    from lfmri.models import load_score_model, resolve_device
    from lightning_modules.inference import Reconstructor

    data, img = load_nifti(args.input)
    axis = args.slice_axis % 3
    check_volume(data, args.input, axis, kind="magnitude")
    stack = np.ascontiguousarray(to_slices(data, axis))  # [S, H, W], lfmri degrade's layout
    n_slices, height, width = stack.shape
    measured = read_kspace(args.kspace, stack.shape, args.regime) if args.kspace else None
    sidecar = Path(str(args.input) + ".json")
    params_path = args.params or (str(sidecar) if sidecar.is_file() else None)
    recorded = read_params(params_path, n_slices, args.regime) if params_path else None
    scale = robust_scale(np.abs(stack))
    if not scale > 0:
        raise InputError(f"{args.input}: the volume is empty (its 99.5th percentile is 0)")

    device = resolve_device(args.device)
    model = load_score_model(args.ckpt, device)
    try:
        sampler = sampler_from_args(args, model.sde)
    except ValueError as err:
        raise InputError(str(err)) from None

    if recorded is not None:
        scalars, b0_method = recorded["scalars"], recorded["b0_method"]
    elif measured is not None and _attrs_params(measured["attrs"], n_slices, f"--kspace {args.kspace}") \
            is not None:
        scalars = _attrs_params(measured["attrs"], n_slices, f"--kspace {args.kspace}")
        b0_method = measured["attrs"].get("b0_method")
    else:
        scalars, b0_method = mid_range_params(args.regime, n_slices), None
    b0_map = measured["b0_map_hz"] if measured is not None and "b0" in args.regime else None
    overrides = {"b0_method": b0_method} if b0_method not in (None, "", "none") and b0_map is not None else {}
    degradation = make_regime(args.regime, **overrides)

    # the noise std per complex k-space sample, input units, and where it comes from: given, recorded, or
    # None: estimated when the measurement is made (`where` says from what, for the printed JSON)
    sigma, origin, where = None, "estimated", "estimated from the measured k-space"
    if args.noise_sigma is not None:
        sigma, origin, where = np.full(n_slices, args.noise_sigma), "given", "--noise-sigma"
    elif measured is not None and measured["noise_sigma"] is not None:
        sigma, origin, where = measured["noise_sigma"], "recorded", f"recorded in {args.kspace}"
    elif recorded is not None and recorded["noise_sigma"] is not None and measured is not None:
        sigma, origin, where = recorded["noise_sigma"], "recorded", f"recorded in {params_path}"

    if measured is not None:
        x = ifft2c(torch.from_numpy(measured["kspace"])[:, None]) / scale
    else:
        x = torch.from_numpy(stack)[:, None].to(torch.complex64) / scale
    if args.resize:
        size = model.train_size
        params = operator_params_on_grid(scalars, b0_map, (height, width), size)
        x = fit_to_square(x, size)  # [S, 1, size, size]
        # resampling changes the noise: estimate it on the new grid
        sigma, origin, where = None, "estimated", "estimated from the resampled k-space"
    else:
        params = operator_params_on_grid(scalars, b0_map, (height, width), None)
    method, segments = degradation.b0_settings
    known = {} if sigma is None else {"noise_sigma": torch.from_numpy(sigma / scale).float(),
                                      "noise_origin": origin}
    # y on the device: an estimate of the noise runs where the reconstruction does
    measurement = Measurement.from_kspace(fft2c(x).to(device), params, **known, b0_method=method,
                                          n_segments=segments)
    reconstructor = Reconstructor(
        model.score_fn(), sampler, args.batch_size, device,
        progress=f"reconstruct ({sampler.name}, {sampler.expected_nfe} NFE)", data_scale=model.data_scale)
    result = reconstructor(measurement, complex_to_channels(x), list(range(n_slices)), seed=args.seed,
                           samples=args.samples)

    def to_volume(images: torch.Tensor) -> np.ndarray:
        images = images[:, 0]
        if args.resize:
            images = restore_shape(images, (height, width))
        back = images.clamp_min(0.0).numpy() * scale
        return np.ascontiguousarray(from_slices(back.astype(np.float32), axis))

    with contextlib.ExitStack() as stack_ctx:
        out_tmp = stack_ctx.enter_context(atomic_path(args.output))
        std_tmp = stack_ctx.enter_context(atomic_path(args.std_out)) if args.std_out else None
        nib.save(nifti_like(to_volume(result.mean), img), str(out_tmp))
        if std_tmp is not None:
            nib.save(nifti_like(to_volume(result.std), img), str(std_tmp))
    print(json.dumps({"input": str(args.input), "output": str(args.output), "std_out": args.std_out,
                      "regime": args.regime, "kspace": args.kspace, "params": params_path,
                      **sampler.settings(), "samples": args.samples, "nfe_per_slice": result.nfe,
                      "noise_sigma": float(result.noise_sigma.double().quantile(0.5)) * scale,
                      "noise_sigma_origin": where,
                      "resize": model.train_size if args.resize else None, "scale": scale,
                      "device": str(device)}, indent=2))
    return 0
