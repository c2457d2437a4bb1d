"""A user's measured low-field volume, ready for reconstruction: the one path below the argument parsing of
`lfmri reconstruct` and `lfmri predict` (numpy, torch, nibabel, h5py; no Lightning, no CLI).

- `load_measured_volume` reads a magnitude NIfTI into its stack of slices [S, H, W] (`transforms.to_slices`
  along `slice_axis`), normalises it like the data module (divided by `transforms.robust_scale`, the 99.5th
  percentile of |input|) and decides the volume's measurement:
  - the forward operator A's parameters: those of `lfmri degrade`'s parameters JSON (`read_params`; given, or
    INPUT + ".json" when it exists), else the k-space file's attributes, else the regime's mid-range
    parameters (`mid_range_params`: with regime `noise`, or no regime, A = fft2c); field maps only from a
    k-space file, for a regime with B0;
  - the measured k-space: the k-space file's (`read_kspace`), else fft2c of the magnitude slices;
  - the k-space noise std: given, else recorded in the k-space file (or in the parameters JSON beside one),
    else None: estimated when the measurement is made (`degradations.Measurement.from_kspace`).
- a k-space file as INPUT or `predict.path` (`.h5` / `.hdf5`: fastMRI's layout, M4Raw's, lfmri degrade's,
  read by `datamodules.kspace_files.read_kspace_file` into [S, C, H, W], phase encoding along H) takes the
  same path (`load_measured_volume` dispatches on the suffix): A's parameters are the file's record, else the
  regime's mid-range ones (regime `noise`, the default for a foreign file: no low-field effects), plus the
  file's sampling mask ("mask"); the coil sensitivities are estimated by ESPIRiT (`Measurement.from_kspace`,
  C > 1) when the file is read; the noise std is given, recorded, or estimated. The scale is the 99.5th
  percentile of the zero-filled coil-combined magnitude (`Measurement.degraded`), y and the noise std are
  divided by it; the output's in-plane axes are the original NIfTI's for lfmri's files and the file's own
  order (H_f, W_f) for foreign ones; the output affine is the recorded NIfTI's, else the ISMRMRD header's
  voxel sizes, else identity.
- `MeasuredVolume.resized(size)` is the explicit resize: slices zero-padded to a square and resized to
  size x size (`transforms.fit_to_square`), A adapted to that grid (blur FWHM and readout duration scaled by
  size / max(H, W), field maps resized) and the noise level re-estimated there.
- `MeasuredVolume.measurement(sl, device)` is the `degradations.Measurement` of some of its slices (the
  whole stack for `lfmri reconstruct`; `lfmri predict`'s data set serves the slices one by one and
  `ScoreModel.predict_step` makes the same measurement of a batch of them).
- `volume_from_slices` turns reconstructed slices back into a volume in the input's units and geometry
  (resized slices restored, slices back along their axis), for both commands' NIfTI outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from datamodules.io import load_nifti
from datamodules.kspace_files import (
    FASTMRI_LAYOUT,
    SCALAR_KEYS,
    SCALAR_RANGES,
    KSpaceFile,
    attrs_scalars,
    check_scalars,
    is_kspace_input,
    read_hdf5_datasets,
    read_kspace_file,
)
from datamodules.transforms import fit_to_square, from_slices, restore_shape, robust_scale, to_slices
from degradations import REGIMES, Measurement, fft2c, ifft2c, make_regime, neutral_params
from degradations.measurement import NoiseOrigin, stack_segment_count
from lfmri_utils.errors import InputError
from lfmri_utils.files import check_input_file
from lfmri_utils.volumes import check_volume

__all__ = ["SCALAR_KEYS", "SCALAR_RANGES", "MeasuredVolume", "check_scalars", "load_measured_volume",
           "mid_range_params", "operator_params", "read_kspace", "read_params", "volume_from_slices",
           "load_kspace_volume"]


def _check_regime(source: str, recorded: Any, regime: str | None) -> None:
    """InputError when a file's recorded regime disagrees with the one asked for (None: any)."""
    if regime is not None and recorded not in (None, "", regime):
        raise InputError(f"{source}: recorded regime {recorded!r} disagrees with --regime {regime}")


def read_kspace(path: str | Path, shape: tuple[int, int, int], regime: str | None) -> dict[str, Any]:
    """The measured k-space file -> {"kspace": complex64 [S,H,W], "b0_map_hz": float32 [S,H,W] | None,
    "noise_sigma": float64 [S] | None (input units), "attrs": dict}; InputError when it is unreadable, lacks
    `kspace`, disagrees with the NIfTI's slice stack `shape` or with the regime (None: not checked), or holds
    NaN / Inf."""
    path = check_input_file(path, "--kspace")  # missing, a folder, not a regular file: said so
    data, attrs = read_hdf5_datasets(path, f"--kspace {path}")
    kspace, b0, sigma = data["kspace"], data["b0_map_hz"], data["noise_sigma"]
    if attrs.get("lfmri_layout") == FASTMRI_LAYOUT:
        raise InputError(f"--kspace {path}: a fastMRI-layout file (coils / undersampling): give it as INPUT "
                         f"(lfmri reconstruct {path} OUTPUT ...), without the NIfTI")
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


def read_params(path: str | Path, n_slices: int, regime: str | None) -> dict[str, Any]:
    """`lfmri degrade`'s JSON -> {"scalars": {key: float64 [S]}, "b0_method": str | None, "noise_sigma":
    float64 [S] | None (input units), "regime": the recorded regime | None}; InputError when it is unreadable,
    has no per-slice parameters, or disagrees with the NIfTI's slice count or the regime (None: not
    checked)."""
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
    return {"scalars": scalars, "b0_method": record.get("b0_method"), "noise_sigma": noise_sigma,
            "regime": record.get("regime") or None}


def mid_range_params(regime: str, n_slices: int) -> dict[str, np.ndarray]:
    """The regime's mid-range scalars per slice: blur FWHM and T2* at their range midpoints (or fixed values),
    nominal readout and TE, spin echo; neutral for the steps the regime lacks; no B0."""
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


def operator_params(scalars: dict[str, np.ndarray], b0_map_hz: np.ndarray | None,
                    shape: tuple[int, int]) -> dict[str, Tensor]:
    """Batched params (torch, [S] and b0_map_hz [S,1,H,W], zero without field maps) of A on the slices'
    grid `shape` (H, W): the neutral ones (`degradations.neutral_params`) with `scalars` and the field maps,
    without `noise_sigma` (the measurement's own, `Measurement.noise_sigma`)."""
    params = neutral_params(len(next(iter(scalars.values()))), *shape)
    for key, values in scalars.items():
        params[key] = torch.as_tensor(values, dtype=torch.float32)
    if b0_map_hz is not None:
        params["b0_map_hz"] = torch.from_numpy(b0_map_hz)[:, None].float()
    params.pop("noise_sigma")
    return params


def volume_from_slices(images: Tensor, scale: float, shape: tuple[int, int], size: int | None,
                       axis: int) -> np.ndarray:
    """Reconstructed magnitude slices [S, 1, H, W] (normalised units, on the reconstruction grid) -> the
    float32 volume in the input's units and geometry: slices resized back to `shape` (h, w) when they were
    resized (`size`), negatives clamped to 0, times `scale`, the slices back along `axis`."""
    images = images[:, 0]
    if size is not None:
        images = restore_shape(images, shape)
    back = images.clamp_min(0.0).numpy() * scale
    return np.ascontiguousarray(from_slices(back.astype(np.float32), axis))


@dataclass(frozen=True)
class MeasuredVolume:
    """A user's measured volume, normalised and on the reconstruction grid (see the module docstring).

    Attributes:
        image: the measured complex image, complex64 [S, 1, H, W], normalised (input units / `scale`): the
            sampler's warm start, and fft2c of it the measured k-space y.
        params: A's parameters per slice on that grid (`operator_params`; no `noise_sigma`).
        noise_sigma: the k-space noise std per slice, float32 [S] (normalised units), or None: estimated
            when the measurement is made.
        noise_origin: "given", "recorded" or "estimated".
        noise_source: where the noise std comes from, in words (for the commands' reports).
        b0_method, n_segments: how A evaluates off-resonance (the regime's settings; `measurement` takes one
            segment count for the whole stack).
        regime: the regime A belongs to (the one asked for, else the files' record, else "noise").
        scale: the normalisation (input units per normalised unit).
        shape: the slices' native (h, w); `size`: the side of the resized grid (`resized`), None at the
            native matrix.
        axis: the slice axis of the input volume (0, 1 or 2).
        params_path: the parameters JSON read, if any.
        nifti: the input image (its affine and header for the outputs; for a k-space INPUT an empty image
            carrying the output's affine).
        kspace: the measured k-space of a k-space INPUT, complex64 [S, C, H, W], normalised (its params then
            hold "mask" and, C > 1, "sensitivities"); None: y = fft2c(image).
        transposed: the output's in-plane axes are (W, H) (a foreign k-space file: its own order).
    """

    image: Tensor
    params: dict[str, Tensor]
    noise_sigma: Tensor | None
    noise_origin: NoiseOrigin
    noise_source: str
    b0_method: str
    n_segments: int | None
    regime: str
    scale: float
    shape: tuple[int, int]
    size: int | None
    axis: int
    params_path: str | None
    nifti: nib.spatialimages.SpatialImage
    kspace: Tensor | None = None
    transposed: bool = False

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def measurement(self, sl: slice = slice(None), device: torch.device | str = "cpu") -> Measurement:
        """The `Measurement` of the slices `sl`, y = the k-space INPUT's or fft2c(image), on `device` (where
        an estimate of the noise then runs), with the volume's parameters, noise std (or an estimate) and B0
        settings."""
        known = {} if self.noise_sigma is None else {"noise_sigma": self.noise_sigma[sl],
                                                     "noise_origin": self.noise_origin}
        n_segments = stack_segment_count(self.params, self.image.shape[-1], self.b0_method, self.n_segments)
        y = fft2c(self.image[sl]) if self.kspace is None else self.kspace[sl]
        return Measurement.from_kspace(y.to(device),
                                       {k: v[sl] for k, v in self.params.items()}, **known,
                                       b0_method=self.b0_method, n_segments=n_segments)

    def resized(self, size: int) -> MeasuredVolume:
        """The volume on a size x size grid (module docstring); its noise level is then estimated. InputError
        for a k-space INPUT (coils and masks are not resampled)."""
        if self.kspace is not None:
            raise InputError("--resize: a k-space file INPUT is reconstructed at its own matrix (its coils "
                             "and sampling mask cannot be resampled)")
        factor = size / max(self.shape)
        params = {**self.params, "fwhm_px": self.params["fwhm_px"] * factor,
                  "readout_ms": self.params["readout_ms"] * factor,
                  "b0_map_hz": fit_to_square(self.params["b0_map_hz"], size)}
        return dataclasses.replace(self, image=fit_to_square(self.image, size), params=params,
                                   noise_sigma=None, noise_origin="estimated",
                                   noise_source="estimated from the resampled k-space", size=size)

    def to_volume(self, images: Tensor) -> np.ndarray:
        """Reconstructed slices [S, 1, H, W] of this volume -> the output volume (`volume_from_slices`),
        in-plane axes swapped back when `transposed`."""
        if self.transposed:
            return volume_from_slices(images.transpose(-1, -2), self.scale, self.shape[::-1], self.size,
                                      self.axis)
        return volume_from_slices(images, self.scale, self.shape, self.size, self.axis)


def load_measured_volume(path: str | Path, regime: str | None = None, slice_axis: int | None = 2, *,
                         kspace: str | Path | None = None, params: str | Path | None = None,
                         noise_sigma: float | None = None, size: int | None = None,
                         label: str = "INPUT", default_axis: int = 2) -> MeasuredVolume:
    """Read a magnitude NIfTI and its optional files, or a k-space file (`is_kspace_input`:
    `load_kspace_volume`), into a `MeasuredVolume` (module docstring).

    Args:
        path: the magnitude NIfTI (3D), or a k-space HDF5 file.
        regime: the degradation regime of A (`degradations.REGIMES`); None: the one the parameters JSON or
            k-space file records, else `noise` (A = fft2c).
        slice_axis: the volume's axis to slice along (0, 1 or 2; None: a k-space file's recorded one, else
            `default_axis`; a NIfTI's axis 2).
        kspace: the measured k-space HDF5 (`lfmri degrade --kspace-out`).
        params: the parameters JSON (default: `path` + ".json" when it exists).
        noise_sigma: the k-space noise std in input units (origin "given").
        size: resize every slice to size x size (`MeasuredVolume.resized`; None: the native matrix).
        label: how a k-space file's messages name it ("INPUT" for `lfmri reconstruct`, "predict.path").
        default_axis: a k-space file's slice axis when `slice_axis` is None and the file records none.

    Raises InputError for an input that breaks lfmri's rules (`check_volume`), an empty volume, or files that
    disagree with it (`read_kspace`, `read_params`).
    """
    if is_kspace_input(path):
        if kspace or params:
            raise InputError(f"{'--kspace' if kspace else '--params'}: a k-space INPUT ({path}) carries its "
                             "own measurement and record; give --kspace / --params only with a NIfTI INPUT")
        volume = load_kspace_volume(path, regime, slice_axis, noise_sigma, label, default_axis)
        return volume if size is None else volume.resized(size)
    data, img = load_nifti(path)
    axis = 2 if slice_axis is None else slice_axis % 3
    check_volume(data, str(path), axis, kind="magnitude")
    stack = np.ascontiguousarray(to_slices(data, axis))  # [S, H, W], lfmri degrade's layout
    n_slices, height, width = stack.shape
    measured = read_kspace(kspace, stack.shape, regime) if kspace else None
    sidecar = Path(str(path) + ".json")
    params_path = str(params) if params else (str(sidecar) if sidecar.is_file() else None)
    recorded = read_params(params_path, n_slices, regime) if params_path else None
    scale = robust_scale(np.abs(stack))
    if not scale > 0:
        raise InputError(f"{path}: the volume is empty (its 99.5th percentile is 0)")
    if regime is None:  # the files' record, else plain Fourier sampling
        regime = ((recorded["regime"] if recorded is not None else None)
                  or (measured["attrs"].get("regime") if measured is not None else None) or "noise")
        if regime not in REGIMES:
            raise InputError(f"{params_path or kspace}: unknown recorded regime {regime!r}")

    file_scalars = attrs_scalars(measured["attrs"], n_slices, f"--kspace {kspace}") \
        if measured is not None and recorded is None else None
    if recorded is not None:
        scalars, b0_method = recorded["scalars"], recorded["b0_method"]
    elif file_scalars is not None:
        scalars, b0_method = file_scalars, measured["attrs"].get("b0_method")
    else:
        scalars, b0_method = mid_range_params(regime, n_slices), None
    b0_map = measured["b0_map_hz"] if measured is not None and "b0" in regime else None
    overrides = {"b0_method": b0_method} if b0_method not in (None, "", "none") and b0_map is not None else {}
    method, segments = make_regime(regime, **overrides).b0_settings

    # the noise std per complex k-space sample, input units, and where it comes from: given, recorded, or
    # None: estimated when the measurement is made
    sigma, origin, source = None, "estimated", "estimated from the measured k-space"
    if noise_sigma is not None:
        sigma, origin, source = np.full(n_slices, noise_sigma), "given", "--noise-sigma"
    elif measured is not None and measured["noise_sigma"] is not None:
        sigma, origin, source = measured["noise_sigma"], "recorded", f"recorded in {kspace}"
    elif recorded is not None and recorded["noise_sigma"] is not None and measured is not None:
        sigma, origin, source = recorded["noise_sigma"], "recorded", f"recorded in {params_path}"

    if measured is not None:
        x = ifft2c(torch.from_numpy(measured["kspace"])[:, None]) / scale
    else:
        x = torch.from_numpy(stack)[:, None].to(torch.complex64) / scale
    volume = MeasuredVolume(
        image=x, params=operator_params(scalars, b0_map, (height, width)),
        noise_sigma=None if sigma is None else torch.from_numpy(sigma / scale).float(),
        noise_origin=origin, noise_source=source, b0_method=method, n_segments=segments, regime=regime,
        scale=scale, shape=(height, width), size=None, axis=axis, params_path=params_path, nifti=img)
    return volume if size is None else volume.resized(size)


def _output_image(kfile: KSpaceFile, axis: int) -> nib.Nifti1Image:
    """An empty NIfTI carrying the output's affine: the recorded NIfTI's (lfmri's files), else the header's
    voxel sizes (the output's in-plane axes are the file's (H_f, W_f)), else identity."""
    affine = kfile.attrs.get("nifti_affine")
    if affine is not None and np.shape(affine) == (4, 4) and np.all(np.isfinite(affine)):
        return nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.asarray(affine, dtype=np.float64))
    zooms = [1.0, 1.0, 1.0]
    if kfile.voxel_mm is not None:
        in_plane = list(kfile.voxel_mm[:2]) if not kfile.nifti_order else list(kfile.voxel_mm[1::-1])
        zooms = in_plane[:axis] + [kfile.voxel_mm[2]] + in_plane[axis:]
    return nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.diag([*zooms, 1.0]))


def load_kspace_volume(path: str | Path, regime: str | None = None, slice_axis: int | None = None,
                       noise_sigma: float | None = None, label: str = "INPUT",
                       default_axis: int = 2) -> MeasuredVolume:
    """A k-space file INPUT (`datamodules.kspace_files.read_kspace_file`) as a `MeasuredVolume` (module
    docstring): y [S, C, H, W] with A's parameters (the file's record or the regime's mid-range ones, its
    mask, ESPIRiT sensitivities for C > 1) and the noise std (given in the file's units, recorded, or None:
    estimated), all normalised by the 99.5th percentile of the zero-filled coil-combined magnitude.

    `slice_axis` None: the axis lfmri recorded, else `default_axis`. InputError (one line starting with
    `label` and the file: "INPUT" for `lfmri reconstruct`, "predict.path" for `lfmri predict`) for a broken
    file, a regime that disagrees with the record, or an empty zero-filled image.
    """
    kfile = read_kspace_file(path, label)
    where = f"{label} {kfile.path}"
    n_slices, _, height, width = kfile.kspace.shape
    recorded_axis = kfile.attrs.get("slice_axis") if kfile.nifti_order else None
    axis = (slice_axis if slice_axis is not None else recorded_axis if recorded_axis in (0, 1, 2)
            else default_axis) % 3
    _check_regime(where, kfile.regime, regime)
    regime = regime or kfile.regime or "noise"
    if regime not in REGIMES:
        raise InputError(f"{where}: unknown recorded regime {regime!r}")
    scalars = kfile.scalars if kfile.scalars is not None else mid_range_params(regime, n_slices)
    b0_map = kfile.b0_map_hz if "b0" in regime else None
    b0_method = kfile.attrs.get("b0_method")
    overrides = {"b0_method": b0_method} if b0_method not in (None, "", "none") and b0_map is not None else {}
    method, segments = make_regime(regime, **overrides).b0_settings
    params = operator_params(scalars, b0_map, (height, width))
    if kfile.mask is not None:
        params["mask"] = torch.from_numpy(kfile.mask).expand(n_slices, 1, height, width)

    sigma, origin, source = None, "estimated", "estimated from the measured k-space"
    if noise_sigma is not None:
        sigma, origin, source = np.full(n_slices, noise_sigma), "given", "--noise-sigma"
    elif kfile.noise_sigma is not None:
        sigma, origin, source = kfile.noise_sigma, "recorded", f"recorded in {kfile.path}"
    # the coil-combined zero-filled image (ESPIRiT maps for C > 1) sets the scale; the noise level does not
    # enter it, so a placeholder std avoids estimating it twice
    y = torch.from_numpy(kfile.kspace)
    try:
        first = Measurement.from_kspace(y, params, torch.ones(n_slices), "given", method, segments)
    except InputError as err:  # e.g. too few fully sampled centre lines for ESPIRiT
        raise InputError(f"{where}: {err}") from None
    maps = first.params.get("sensitivities") if kfile.n_coils > 1 else None
    if maps is not None and not bool(maps.flatten(1).abs().amax(1).gt(0).all()):
        empty = int(torch.nonzero(maps.flatten(1).abs().amax(1) == 0)[0, 0])
        raise InputError(f"{where}: ESPIRiT found no coil sensitivity in slice {empty} (its fully sampled "
                         "k-space centre is too small or too noisy; sample more centre lines)")
    combined = first.degraded
    scale = robust_scale(combined.abs().numpy())
    if not scale > 0:
        raise InputError(f"{where}: the zero-filled image is empty (its 99.5th percentile is 0)")
    return MeasuredVolume(
        image=combined / scale, params=dict(first.params),
        noise_sigma=None if sigma is None else torch.from_numpy(np.asarray(sigma) / scale).float(),
        noise_origin=origin, noise_source=source, b0_method=method, n_segments=segments, regime=regime,
        scale=scale, shape=(height, width), size=None, axis=axis, params_path=None,
        nifti=_output_image(kfile, axis), kspace=y / scale, transposed=not kfile.nifti_order)
