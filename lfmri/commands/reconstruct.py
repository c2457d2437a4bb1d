"""`lfmri reconstruct`: reconstruct a low-field magnitude NIfTI volume, or a k-space file, slice by slice with
the score prior.

    lfmri reconstruct INPUT OUTPUT --ckpt C --regime R [--kspace F.h5] [--params F.json] [--samples K]
                      [--std-out STD.nii.gz] [--sampling.sampler S] [--sampling.steps N] [--sampling.t0 T]
                      [--sampling.dc proximal|gradient|none] [--sampling.dc_lambda L] [--sampling.dc_floor F]
                      [--sampling.dc_weight W] [--sampling.t0_ratio R] [--sampling.stop_ratio R]
                      [--noise-sigma S] [--resize] [--slice-axis 2]
    lfmri reconstruct K.h5 OUTPUT --ckpt C [--regime R] [--noise-sigma S] [--slice-axis A] ...

The `--sampling.*` options are `diffusion.sampling.options.SamplerOptions`' fields, as in
`lfmri predict`; the former spellings (`--steps`, `--dc-lambda`, ...) still work, with a deprecation note.

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
- INPUT a k-space HDF5 file (`.h5` / `.hdf5`: fastMRI's layout `kspace` [slices, coils, H_f, W_f] or
  [slices, H_f, W_f] with readout along H_f, as fastMRI's and M4Raw's files and `lfmri degrade --coils /
  --acceleration` write it; or `lfmri degrade`'s legacy single-coil file): read by
  `datamodules.kspace_files.read_kspace_file` (in-plane axes transposed to lfmri's: phase encoding along H);
  the sampling mask is the file's `mask` (else the all-zero phase-encoding lines); for several coils the
  sensitivities are estimated by ESPIRiT from the fully sampled centre (at least 8 lines, in practice about
  12: 8 of 40 lines gave no maps, 13 of 64 did; a slice without maps is refused); A is the file's
  recorded operator (lfmri's files), else `--regime`'s mid-range one, else (no `--regime`) no low-field
  effects: A = mask * F * coils. `--regime` is optional (default: the recorded one, else `noise`), `--kspace`,
  `--params` and `--resize` are refused. The output has the slices along `--slice-axis` (default: the
  recorded one, else 2), the in-plane axes in the original NIfTI's order for lfmri's files and in the file's
  own order (H_f, W_f) for foreign ones, and the recorded NIfTI affine (lfmri's files), else the ISMRMRD
  header's voxel sizes, else an identity affine. The image is scaled by the 99.5th percentile of the
  zero-filled coil-combined magnitude (y and the noise std with it); `--noise-sigma` is in the file's k-space
  units. The printed JSON adds `coils` and `sampled_fraction`.
- the k-space noise std: `--noise-sigma` (input units), else the recorded one (k-space file, params JSON),
  else estimated per slice from the measured k-space (`degradations.estimate_noise_sigma`). The JSON printed
  at the end gives the value used (`noise_sigma`: the median over slices, input units) and its origin.

Processing. The volume is normalised like the data module (divided by the 99.5th percentile of |input|) and
every slice is reconstructed at its own matrix (the network pads to its multiple and crops back) by the one
inference path (`diffusion.inference.Reconstructor`): nothing is resampled. `--resize` instead takes
the former path: each slice is zero-padded to a square and resized to the model's training size, the measured
k-space is resampled the same way (y' = fft2c(resize(ifft2c(y)))), A is adapted to that grid (blur FWHM and
readout duration scale by image_size / max(H, W), field maps are resized), the noise level is re-estimated on
that grid, and the result is resized back. The reconstruction (the mean of the K posterior magnitudes) and the
uncertainty map (their per-pixel std, `--std-out`, K >= 2) are multiplied by the scale (input units) and
written with the input's affine and header (float32). Sampler defaults (steps, t0, DC kind and strength) are
the sampler registry's (`diffusion.sampling.samplers.SAMPLERS`). Batches of slices run on CUDA when
available, with a progress bar.

Below the argument checks, this is `lfmri predict`'s path too: the input and its measurement are prepared by
`datamodules.measured.load_measured_volume` (and `MeasuredVolume.resized`), reconstructed by the
`Reconstructor`, and put back in the input's geometry by `datamodules.measured.volume_from_slices`.

Bad input (a checkpoint that is not ours, a NIfTI and k-space file or params file that disagree in shape or
regime, NaN in the input, a volume whose noise cannot be estimated, ...) -> one line on stderr, exit code 2,
nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

from lfmri.commands import sampler_options
from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_input_file, check_output_file
from lfmri_utils.seeding import check_seed

HELP = "reconstruct a low-field magnitude NIfTI volume or a k-space file with the score prior"
DESCRIPTION = ("Reconstruct each slice of a low-field magnitude NIfTI, or of a k-space HDF5 file (fastMRI's "
               "layout, single- or multi-coil, undersampled or not), with the score prior and k-space data "
               "consistency; writes the reconstruction (and optionally the std map) as NIfTI, in the input's "
               "units.")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `reconstruct` parser."""
    p = subparsers.add_parser("reconstruct", help=HELP, description=DESCRIPTION)
    p.add_argument("input", help="low-field magnitude NIfTI (.nii / .nii.gz), 3D, or a k-space HDF5 file "
                                 "(.h5 / .hdf5: fastMRI's layout, lfmri degrade --kspace-out)")
    p.add_argument("output", help="reconstruction NIfTI path (.nii / .nii.gz)")
    p.add_argument("--ckpt", required=True,
                   help="lfmri (ScoreModel) Lightning checkpoint, or reference-small (the shipped prior)")
    p.add_argument("--regime", default=None,
                   help="noise | noise_blur | noise_blur_t2star | noise_blur_t2star_b0 (required for a NIfTI "
                        "INPUT; a k-space INPUT: default the recorded one, else noise)")
    p.add_argument("--kspace", default=None, help="measured k-space HDF5 from `lfmri degrade --kspace-out`")
    p.add_argument("--params", default=None,
                   help="realised parameters JSON from `lfmri degrade` (default: INPUT.json when it exists)")
    sampler_options.add_sampler_arguments(p)
    p.add_argument("--noise-sigma", type=float, default=None,
                   help="k-space noise std per complex sample, input units (default: recorded or estimated)")
    p.add_argument("--resize", action="store_true",
                   help="resample slices to the model's training size and back (the former path)")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples K per slice, 1 to 1000 (mean is written)")
    p.add_argument("--std-out", default=None, help="write the per-pixel std of the K samples here (K >= 2)")
    p.add_argument("--slice-axis", type=int, default=None,
                   help="axis of the volume to slice along (default 2; a k-space INPUT: the recorded one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=8, help="slices sampled together")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (0 to 2^32 - 1)")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    """The checks that need no torch (numbers, outputs, input files, --ckpt): a mistyped path is reported
    before the model code is imported."""
    from datamodules.io import NIFTI_SUFFIXES

    for name in ("samples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    sampler_options.check_sampler_arguments(args)
    check_seed(args.seed)
    if args.noise_sigma is not None and not (math.isfinite(args.noise_sigma) and args.noise_sigma >= 0):
        raise InputError(f"--noise-sigma: must be finite and >= 0, got {args.noise_sigma}")
    if args.std_out and args.samples < 2:
        raise InputError("--std-out: the std map needs --samples >= 2")
    from datamodules.kspace_files import is_kspace_input

    if is_kspace_input(args.input):
        for flag, value in (("--kspace", args.kspace), ("--params", args.params), ("--resize", args.resize)):
            if value:
                raise InputError(f"{flag}: not with a k-space file INPUT ({args.input}), which carries its "
                                 "own measurement, record and matrix")
    elif args.regime is None:
        raise InputError("--regime: required for a NIfTI INPUT (noise | noise_blur | noise_blur_t2star | "
                         "noise_blur_t2star_b0)")
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
    sampler_options.check_checkpoint_argument(args.ckpt)


def _validate_options(args: argparse.Namespace) -> None:
    """The checks that need the degradations' and samplers' registries (torch, but no model yet): regime,
    slice axis, sampler options and `--samples` against a point-estimate sampler."""
    from datamodules.transforms import check_slice_axis
    from degradations import REGIMES

    if args.regime is not None and args.regime not in REGIMES:
        raise InputError(f"--regime: unknown regime {args.regime!r}; valid regimes: {', '.join(REGIMES)}")
    if args.slice_axis is not None:
        check_slice_axis(args.slice_axis)
    try:
        sampler_options.sampler_from_args(args, None)
    except ValueError as err:
        raise InputError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    """Run `lfmri reconstruct`; bad input raises InputError before anything is written."""
    _validate(args)
    _validate_options(args)
    import nibabel as nib

    from datamodules.io import nifti_like
    from datamodules.measured import load_measured_volume
    from degradations import complex_to_channels
    from diffusion.inference import Reconstructor
    from lfmri.models import load_score_model, resolve_device

    volume = load_measured_volume(args.input, args.regime, args.slice_axis, kspace=args.kspace,
                                  params=args.params, noise_sigma=args.noise_sigma)
    device = resolve_device(args.device)
    model = load_score_model(args.ckpt, device)
    try:
        sampler = sampler_options.sampler_from_args(args, model.sde)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.resize:
        volume = volume.resized(model.train_size)
    # y on the device: an estimate of the noise runs where the reconstruction does
    measurement = volume.measurement(device=device)
    running = sampler.for_measurement(measurement.mask is not None)  # what the Reconstructor runs
    reconstructor = Reconstructor(
        model.score_fn(), sampler, args.batch_size, device,
        progress=f"reconstruct ({running.name}, {running.expected_nfe} NFE)", data_scale=model.data_scale)
    result = reconstructor(measurement, complex_to_channels(volume.image), list(range(len(volume))),
                           seed=args.seed, samples=args.samples)

    with contextlib.ExitStack() as stack_ctx:
        out_tmp = stack_ctx.enter_context(atomic_path(args.output))
        std_tmp = stack_ctx.enter_context(atomic_path(args.std_out)) if args.std_out else None
        nib.save(nifti_like(volume.to_volume(result.mean), volume.nifti), str(out_tmp))
        if std_tmp is not None:
            nib.save(nifti_like(volume.to_volume(result.std), volume.nifti), str(std_tmp))
    print(json.dumps({"input": str(args.input), "output": str(args.output), "std_out": args.std_out,
                      "regime": volume.regime, "kspace": args.kspace, "params": volume.params_path,
                      "coils": measurement.n_coils,
                      "sampled_fraction": 1.0 if measurement.mask is None else float(measurement.mask.mean()),
                      **result.settings, "samples": args.samples, "nfe_per_slice": result.nfe,
                      "noise_sigma": float(result.noise_sigma.double().quantile(0.5)) * volume.scale,
                      "noise_sigma_origin": volume.noise_source, "resize": volume.size, "scale": volume.scale,
                      "device": str(device)}, indent=2))
    return 0
