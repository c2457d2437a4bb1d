"""The measurement as one object: measured k-space, the operator that produced it and its noise level.

A `Measurement` is one stack of S slices of one matrix size `H x W` (readout along `W`, phase encoding along
`H`, the layout of `degradations`): the measured k-space `y` `[S, C, H, W]` (C receive coils, 1 for
single-coil data), the realised operator parameters, how the operator evaluates B0 (method, number of time
segments) and the k-space noise std `noise_sigma` with its origin. Every consumer takes one: the diffusion
reconstruction (`diffusion.inference.Reconstructor`), the classical baselines (`lfmri.baselines`); every
producer makes one: `lfmri reconstruct` (a user's files), the evaluation's and the validation callback's
simulated volumes (`Measurement.simulated`), `lfmri predict` (a user's NIfTI, noise estimated).

The operator. `build_operator` is the one function that builds `A` from realised parameters
(`ForwardOperator.from_params`): the simulator (`LowFieldDegradation.operator`) and `Measurement.operator`
both call it, so what is simulated and what is inverted cannot drift apart. With time-segmented B0 and no
`n_segments` given, a measurement takes one number of segments for its whole stack (`stack_segment_count`),
so a batch's operator does not depend on which slices share the batch.

Multi-coil and undersampled data (issue 24). `params` may hold a sampling `mask` float32 `[S, 1, H, W]` (0/1;
y is exactly 0 where it is 0) and coil `sensitivities` complex64 `[S, C, H, W]`. `from_kspace` resolves
them: with C > 1 and no sensitivities they are estimated per slice by ESPIRiT
(`degradations.coils.espirit_sensitivities`, from the fully sampled centre of k-space); a coil noise
covariance `[C, C]` (e.g. from a noise pre-scan, `degradations.coils.noise_covariance`) prewhitens y and the
sensitivities first (`whitening_matrix`: the mean noise variance per coil is kept), so the noise is white with
one std `noise_sigma` per slice on every coil. The degraded image is the coil-combined zero-filled image
`sum_c conj(s_c) ifft2c(M y_c)` `[S, 1, H, W]`, the prior's frame.

The noise level has one home, `noise_sigma` (std of the complex noise per k-space sample, units of `y`;
`params` never carry it), and one of three origins:
- "recorded": the simulation's known value (`lfmri degrade`'s records, the data module's degradation);
- "given": the caller asserts it (e.g. `lfmri reconstruct --noise-sigma`);
- "estimated": `degradations.estimate_noise_sigma` of each slice with its operator, decided when the
  measurement is made (multi-coil: each coil from its sampled samples; without a covariance the coils are
  first prewhitened with their estimated noise variances, `balance_coils`, and the slice's std is the RMS
  over its coils);
  a slice whose noise cannot be estimated (e.g. all zero) takes the median of the stack's other slices (one
  noise level per acquisition); InputError when no slice can be estimated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from lfmri_utils.errors import InputError

from .b0 import segment_count
from .coils import espirit_sensitivities, whitening_matrix
from .fourier import ifft2c
from .noise_estimate import estimate_coil_noise_sigma, estimate_noise_sigma
from .operator import ForwardOperator

if TYPE_CHECKING:
    from .compose import LowFieldDegradation

__all__ = ["DEFAULT_B0_METHOD", "POWER_ITERATIONS", "Measurement", "NoiseOrigin", "alias_energy",
           "balance_coils", "build_operator", "operator_norm_sq", "stack_noise_sigma", "stack_segment_count",
           "zero_filled_image"]

#: where a measurement's noise level comes from (module docstring)
NoiseOrigin = Literal["recorded", "given", "estimated"]
#: how A evaluates off-resonance where nothing else is said (`degradations.b0`)
DEFAULT_B0_METHOD = "segmented"
#: power iterations estimating ||A||^2 (`operator_norm_sq`)
POWER_ITERATIONS = 20


def build_operator(params: Mapping[str, Tensor], b0_method: str = DEFAULT_B0_METHOD,
                   n_segments: int | None = None) -> ForwardOperator:
    """The forward operator `A` of batched realised parameters (`fwhm_px`, `t2star_ms`, `t2star_gre`,
    `readout_ms`, `te_ms` `[B]`, `b0_map_hz` `[B,1,H,W]` in Hz; optional `mask` float32 `[B,1,H,W]` and
    `sensitivities` complex64 `[B,C,H,W]`) with the B0 `b0_method` / `n_segments` (`degradations.b0`): the
    one place `A` is built from parameters."""
    return ForwardOperator.from_params(dict(params), b0_method, n_segments)


def stack_segment_count(params: Mapping[str, Tensor], width: int, b0_method: str,
                        n_segments: int | None = None) -> int | None:
    """`n_segments`, or where it is None and the segmented B0 method has a field map, one number of B0
    time segments for the whole stack (readout length `width` samples), so a batch's operator does not
    depend on which slices share it."""
    if n_segments is None and b0_method == "segmented" and "b0_map_hz" in params \
            and bool((params["b0_map_hz"] != 0).any()):
        return segment_count(params["b0_map_hz"], params["readout_ms"], width)
    return n_segments


def stack_noise_sigma(y: Tensor, params: Mapping[str, Tensor], b0_method: str = DEFAULT_B0_METHOD,
                      n_segments: int | None = None) -> Tensor:
    """Estimated k-space noise std per slice, float32 `[S]` on y's device: `estimate_noise_sigma` of each
    slice of y complex `[S,C,H,W]` with its own operator (its mask: sampled samples only; coils: the RMS of
    the per-coil estimates); a slice that cannot be estimated (all zero) takes the median of the others.
    InputError when none can."""
    n = y.shape[0]
    sigma = torch.full((n,), math.nan)
    for i in range(n):
        try:
            operator = build_operator({k: v[i:i + 1] for k, v in params.items()}, b0_method, n_segments)
            sigma[i] = float(estimate_noise_sigma(y[i:i + 1], operator)[0])
        except ValueError:
            pass  # e.g. an all-zero slice: below, the median of the stack's other slices
    failed = torch.isnan(sigma)
    if bool(failed.all()):
        raise InputError("cannot estimate the k-space noise level of any slice (all empty?); give the "
                         "noise std (e.g. lfmri degrade's parameters) or a volume with signal")
    if bool(failed.any()):
        sigma[failed] = sigma[~failed].median()
    return sigma.to(y.device)


def balance_coils(y: Tensor, params: dict[str, Tensor], b0_method: str = DEFAULT_B0_METHOD,
                  n_segments: int | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Multi-coil data without a known covariance: `(y, params, noise_sigma)` with y `[S,C,H,W]` and the
    params' sensitivities prewhitened by the diagonal covariance of the coils' estimated noise variances
    (`estimate_coil_noise_sigma` per slice with its operator, the median over the stack per coil;
    `whitening_matrix`: coil c scaled by `sqrt(mean_c' v_c') / sqrt(v_c)`), so every coil carries the same
    noise, and the slice's std float32 `[S]`: the RMS over its coils' scaled estimates. A coil or slice that
    cannot be estimated (all zero) takes the mean variance of the others / the median of the other slices;
    InputError when nothing can be estimated."""
    n, n_coils = y.shape[:2]
    coil_sigma = torch.full((n, n_coils), math.nan)
    for i in range(n):
        try:
            operator = build_operator({k: v[i:i + 1] for k, v in params.items()}, b0_method, n_segments)
            coil_sigma[i] = estimate_coil_noise_sigma(y[i:i + 1], operator)[0].cpu()
        except ValueError:
            pass  # e.g. an all-zero slice: below, the median of the stack's other slices
    variance = coil_sigma.double().square().nanmedian(dim=0).values
    known = torch.isfinite(variance) & (variance > 0)
    if not bool(known.any()):
        raise InputError("cannot estimate the k-space noise level of any slice (all empty?); give the "
                         "noise std (e.g. lfmri degrade's parameters) or a volume with signal")
    variance = torch.where(known, variance, variance[known].mean())
    y, params = _prewhiten(y, params, np.diag(variance.numpy()))
    scale = (variance.mean() / variance).sqrt().float()
    sigma = (coil_sigma * scale).square().nanmean(dim=1).sqrt()
    failed = torch.isnan(sigma)
    if bool(failed.any()):
        sigma[failed] = sigma[~failed].median()
    return y, params, sigma.to(y.device)


def zero_filled_image(y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """The coil-combined zero-filled image `sum_c conj(s_c) ifft2c(M y_c)`, complex `[S, 1, H, W]`, of k-space
    y `[S, C, H, W]` with the optional `mask` `[S, 1, H, W]` and `sensitivities` `[S, C, H, W]` of `params`
    (`ifft2c(y)` for one coil without maps and mask): a `Measurement`'s `degraded`, and the data module's
    degraded image of a simulated sample without making a measurement of it."""
    mask, maps = params.get("mask"), params.get("sensitivities")
    image = ifft2c(y if mask is None else y * mask)
    return image if maps is None else (maps.conj() * image).sum(dim=1, keepdim=True)


def alias_energy(y: Tensor, mask: Tensor | None, noise_sigma: Tensor) -> Tensor:
    """Estimated energy of the k-space a mask skipped, float64 `[S]` (units of y squared): the energy of the
    aliasing the zero-filled coil-combined image holds (`||S^H F^H (1 - M) F S x||^2 <= ||(1 - M) F S x||^2`
    with `sum_c |s_c|^2 <= 1`; 0 without a mask).

    Per slice of y complex `[S, C, H, W]`: the signal energy per sampled k-space sample, `sum_c |y_c|^2`
    less the noise's `C sigma^2` (`noise_sigma` `[S]`, complex std per sample and coil), averaged along each
    phase-encoding row (H) over its sampled samples; rows with no sample take the log-linear interpolation of
    their sampled neighbours (k-space energy falls off roughly exponentially from the centre; the ends hold
    the outermost sampled row's value); the sum over every row of (its unsampled samples x its energy per
    sample). Made for Cartesian masks (whole rows); for a 2D mask a row's mean over its sampled samples
    stands for its unsampled ones too.
    """
    n, n_coils, height, width = y.shape
    out = torch.zeros(n, dtype=torch.float64)
    if mask is None:
        return out
    power = y.detach().abs().double().square().sum(dim=1).cpu()  # [S, H, W]
    sampled = (mask.detach()[:, 0].cpu() > 0).expand(n, height, width)
    noise = n_coils * noise_sigma.detach().double().cpu().square()
    rows = np.arange(height)
    for i in range(n):
        count = sampled[i].sum(dim=1).double()  # sampled samples per row
        have = count > 0
        if not bool(have.any()):
            raise ValueError("the mask samples nothing")
        per_sample = (power[i] * sampled[i]).sum(dim=1)[have] / count[have] - float(noise[i])
        floor = max(float(noise[i]), 1e-30) * 1e-3  # a row at the noise level: a small, finite log
        log_energy = np.interp(rows, rows[have.numpy()], np.log(per_sample.clamp_min(floor).numpy()))
        out[i] = float(((width - count).numpy() * np.exp(log_energy)).sum())
    return out


def operator_norm_sq(operator: ForwardOperator, like: Tensor, iterations: int = POWER_ITERATIONS,
                     seed: int = 0) -> Tensor:
    """Per-slice estimate of `||A||^2` (largest eigenvalue of `A^H A`) by power iteration, float32 `[B]`.

    `like`: a complex image `[B, 1, H, W]` (the operator's input, also for multi-coil k-space `[B, C, H, W]`)
    giving shape, dtype and device. The start vector is drawn from a
    generator seeded by `seed` (deterministic). An estimate from below: it approaches `||A||^2` as the
    iterations grow.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=torch.complex128).to(like.device, like.dtype)
    norm = torch.ones(like.shape[0], device=like.device)
    for _ in range(iterations):
        v = v / v.abs().pow(2).flatten(1).sum(1).sqrt().clamp_min(1e-30)[:, None, None, None]
        w = operator.adjoint(operator.forward(v))
        norm = torch.real((v.conj() * w).flatten(1).sum(1)).float()
        v = w
    return norm


def _check_kspace_and_params(y: Tensor, params: Mapping[str, Tensor], resolved: bool = True) -> None:
    """ValueError unless y is complex `[S,C,H,W]`, `params` hold no noise level (it has one home), a `mask`
    is `[S or 1,1,H,W]` and, where `resolved` (every field final), C is the sensitivities' (`[S,C,H,W]`) or
    1 without them."""
    if not y.is_complex() or y.dim() != 4:
        raise ValueError(f"y must be complex [S,C,H,W], got {tuple(y.shape)} {y.dtype}")
    if "noise_sigma" in params:
        raise ValueError("params must not hold noise_sigma: the noise level is the measurement's "
                         "noise_sigma (pass it to from_kspace, or use Measurement.simulated)")
    n, n_coils, height, width = y.shape
    mask = params.get("mask")
    if mask is not None and (mask.dim() != 4 or mask.shape[0] not in (1, n) or mask.shape[1] != 1
                             or tuple(mask.shape[-2:]) != (height, width) or mask.is_complex()):
        raise ValueError(f"mask must be real [S,1,H,W] = [{n},1,{height},{width}], got {tuple(mask.shape)}")
    maps = params.get("sensitivities")
    if maps is not None and (not maps.is_complex() or tuple(maps.shape) != (n, n_coils, height, width)):
        raise ValueError(f"sensitivities must be complex [S,C,H,W] = {(n, n_coils, height, width)} (y's), "
                         f"got {tuple(maps.shape)} {maps.dtype}")
    if resolved and maps is None and n_coils != 1:
        raise ValueError(f"y has {n_coils} coils but params hold no sensitivities "
                         "(from_kspace estimates them)")


def _prewhiten(y: Tensor, params: dict[str, Tensor],
               noise_covariance: Tensor | np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
    """y `[S,C,H,W]` and the params' sensitivities `[S,C,H,W]` (where present) prewhitened over the coil axis
    with `whitening_matrix(noise_covariance)`; InputError unless the covariance is a `[C, C]` Hermitian
    positive definite matrix."""
    cov = noise_covariance.detach().cpu().numpy() if torch.is_tensor(noise_covariance) \
        else np.asarray(noise_covariance)
    n_coils = y.shape[1]
    if cov.shape != (n_coils, n_coils):
        raise InputError(f"noise covariance: expected [C, C] = [{n_coils}, {n_coils}] (y's coils), "
                         f"got shape {cov.shape}")
    white = torch.from_numpy(whitening_matrix(cov)).to(y.device)

    def apply(v: Tensor) -> Tensor:
        return torch.einsum("ij,sjhw->sihw", white, v.to(torch.complex128)).to(torch.complex64)

    params = dict(params)
    if "sensitivities" in params:
        params["sensitivities"] = apply(params["sensitivities"])
    return apply(y), params


@dataclass(frozen=True)
class Measurement:
    """One stack of S measured slices of one matrix size (see the module docstring).

    Make one with `from_kspace` (a measurement and its parameters; the noise level given, recorded or
    estimated) or `simulated` (the data module's degradation of a volume); the constructor checks the
    fields but resolves nothing.

    Attributes:
        y: measured k-space, complex64 `[S, C, H, W]` (centred orthonormal FFT; the slices' units; C coils,
            prewhitened; exactly 0 where not sampled).
        params: realised operator parameters, batched (`fwhm_px`, `t2star_ms`, `t2star_gre`, `readout_ms`,
            `te_ms` `[S]`, `b0_map_hz` `[S, 1, H, W]`; optional `mask` float32 `[S, 1, H, W]` and
            `sensitivities` complex64 `[S, C, H, W]`, present whenever C > 1; other keys of
            `LowFieldDegradation.sample_params` such as `snr_db` may ride along), never `noise_sigma`.
        noise_sigma: std of the complex k-space noise per sample and coil, float32 `[S]` (units of y), finite,
            >= 0.
        noise_origin: "recorded", "given" or "estimated".
        b0_method, n_segments: how A evaluates off-resonance (`degradations.b0`); `n_segments` one number for
            the whole stack (resolved by `from_kspace`).
    """

    y: Tensor
    params: dict[str, Tensor]
    noise_sigma: Tensor
    noise_origin: NoiseOrigin
    b0_method: str = DEFAULT_B0_METHOD
    n_segments: int | None = None

    def __post_init__(self) -> None:
        y = self.y
        _check_kspace_and_params(y, self.params)
        if self.noise_origin not in get_args(NoiseOrigin):
            raise ValueError(f"noise_origin must be one of {', '.join(get_args(NoiseOrigin))}, "
                             f"got {self.noise_origin!r}")
        if tuple(self.noise_sigma.shape) != (y.shape[0],):
            raise ValueError(f"noise_sigma must be [S] = [{y.shape[0]}], got {tuple(self.noise_sigma.shape)}")

    @classmethod
    def from_kspace(cls, y: Tensor, params: Mapping[str, Tensor], noise_sigma: Tensor | float | None = None,
                    noise_origin: Literal["recorded", "given"] = "given", b0_method: str = DEFAULT_B0_METHOD,
                    n_segments: int | None = None,
                    noise_covariance: Tensor | np.ndarray | None = None) -> Measurement:
        """A measurement of k-space y complex `[S,C,H,W]` and its realised operator parameters `params`.

        `noise_covariance` `[C, C]` (complex, Hermitian positive definite; None: the coils' noise is taken
        as white): y and given sensitivities are prewhitened with `whitening_matrix` first. With C > 1 and no
        `sensitivities` in params they are estimated per slice by ESPIRiT (`espirit_sensitivities`, on the
        CPU, after any prewhitening). A `mask` `[1 or S,1,H,W]` is kept as float32 `[S,1,H,W]`.
        `noise_sigma` (`[S]` or one value for all slices, units of the prewhitened y) is taken as it is,
        with origin `noise_origin` ("given" or "recorded"); None: estimated from y with each slice's operator
        (origin "estimated", see the module docstring), on y's device; multi-coil data without a covariance
        are then prewhitened with the coils' estimated (diagonal) noise variances (`balance_coils`), before
        ESPIRiT. `n_segments` None with the segmented B0 method: one number for the stack
        (`stack_segment_count`). The tensors stay on y's device
        (detached; y as complex64). InputError when a noise std is negative or not finite, or none can be
        estimated, for a bad covariance, or when ESPIRiT has too small a fully sampled centre.
        """
        _check_kspace_and_params(y, params, resolved=False)
        y = y.detach().to(torch.complex64)
        params = {k: v.detach().to(y.device) for k, v in params.items()}
        if "mask" in params:
            params["mask"] = params["mask"].to(torch.float32).expand(y.shape[0], -1, -1, -1).contiguous()
        if "sensitivities" in params:
            params["sensitivities"] = params["sensitivities"].to(torch.complex64)
        if noise_covariance is not None:
            y, params = _prewhiten(y, params, noise_covariance)
        n_segments = stack_segment_count(params, y.shape[-1], b0_method, n_segments)
        n = y.shape[0]
        if noise_sigma is None and y.shape[1] > 1 and noise_covariance is None:
            y, params, sigma = balance_coils(y, params, b0_method, n_segments)
            origin = "estimated"
        elif noise_sigma is None:
            sigma, origin = stack_noise_sigma(y, params, b0_method, n_segments), "estimated"
        else:
            if noise_origin not in ("recorded", "given"):
                raise ValueError(f"a known noise level is 'recorded' or 'given', got {noise_origin!r}")
            sigma = torch.as_tensor(noise_sigma, dtype=torch.float32).detach().to(y.device).reshape(-1)
            if sigma.numel() not in (1, n):
                raise ValueError(f"noise_sigma must be one value or [S] = [{n}], got {sigma.numel()} values")
            sigma, origin = sigma.expand(n).clone(), noise_origin
            if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
                raise InputError(f"noise_sigma must be finite and >= 0, got {sigma.tolist()}")
        if y.shape[1] > 1 and "sensitivities" not in params:
            params["sensitivities"] = torch.stack([
                torch.from_numpy(espirit_sensitivities(y[i].cpu().numpy())) for i in range(y.shape[0])
            ]).to(y.device)
        return cls(y, params, sigma, origin, b0_method, n_segments)

    @classmethod
    def simulated(cls, y: Tensor, params: Mapping[str, Tensor],
                  degradation: LowFieldDegradation) -> Measurement:
        """The measurement of a simulated degradation: k-space y `[S,C,H,W]` and the full parameters of
        `degradation.sample_params` (their `noise_sigma` `[S]` is the recorded noise level; the simulated
        `mask` and `sensitivities` where the regime has these steps), its operator
        evaluating B0 as the regime simulates it (`LowFieldDegradation.b0_settings`)."""
        b0_method, n_segments = degradation.b0_settings
        operator_params = {k: v for k, v in params.items() if k != "noise_sigma"}
        return cls.from_kspace(y, operator_params, params["noise_sigma"], "recorded", b0_method, n_segments)

    # -- geometry and the degraded image -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_coils(self) -> int:
        """`C`, the number of (prewhitened) receive coils of y (1 for single-coil data)."""
        return int(self.y.shape[1])

    @property
    def mask(self) -> Tensor | None:
        """The sampling mask, float32 `[S, 1, H, W]` (1 = sampled), or None (fully sampled)."""
        return self.params.get("mask")

    @property
    def matrix(self) -> tuple[int, int]:
        """The slices' matrix `(H, W)`: phase encoding along H, readout along W."""
        return int(self.y.shape[-2]), int(self.y.shape[-1])

    def to(self, device: torch.device | str) -> Measurement:
        """The same measurement with its tensors on `device`."""
        return dataclasses.replace(self, y=self.y.to(device), noise_sigma=self.noise_sigma.to(device),
                                   params={k: v.to(device) for k, v in self.params.items()})

    @property
    def degraded(self) -> Tensor:
        """The degraded complex image, complex64 `[S, 1, H, W]`: the coil-combined zero-filled image
        `sum_c conj(s_c) ifft2c(M y_c)` (`ifft2c(y)` for one coil without maps and mask)."""
        return zero_filled_image(self.y, self.params)

    @property
    def image_sigma(self) -> np.ndarray:
        """Noise std per real channel of the image, `noise_sigma / sqrt(2)` (orthonormal FFT), float64
        `[S]`: that of the fully sampled degraded image (coil-combined with `sum_c |s_c|^2 = 1`); a
        zero-filled undersampled image holds less noise (the sampled fraction of its variance) and
        aliasing."""
        return self.noise_sigma.double().cpu().numpy() / math.sqrt(2.0)

    @property
    def alias_sigma(self) -> Tensor:
        """Estimated std of the aliasing per pixel of the zero-filled degraded image, float32 `[S]` (complex
        std, units of y; 0 without a mask): `alias_energy` spread over the `H x W` pixels. Undersampled data
        start the sampler at the level of noise and aliasing together (`diffusion.inference`)."""
        height, width = self.matrix
        return (alias_energy(self.y, self.mask, self.noise_sigma) / (height * width)).sqrt().float()

    @property
    def support(self) -> Tensor | None:
        """Where the coil maps see the object, bool `[S, 1, H, W]` (`sum_c |s_c|^2 > 0`; ESPIRiT's maps are 0
        outside it), or None without maps: the data say nothing of the image outside it."""
        maps = self.params.get("sensitivities")
        return None if maps is None else (maps.abs().square().sum(dim=1, keepdim=True) > 0)

    def magnitude(self) -> np.ndarray:
        """The degraded magnitude image, float64 `[S, H, W]`."""
        return self.degraded[:, 0].abs().double().cpu().numpy()

    def complex_image(self) -> np.ndarray:
        """The degraded complex image, complex128 `[S, H, W]`."""
        return self.degraded[:, 0].to(torch.complex128).cpu().numpy()

    # -- the operator --------------------------------------------------------------------------------------
    def operator(self, sl: slice = slice(None), device: torch.device | str | None = None) -> ForwardOperator:
        """The forward operator A of the slices `sl` (`forward`: image `[s,1,H,W]` -> k-space, `adjoint`
        back), built on `device` (default: where the parameters are) with the measurement's B0 settings."""
        params = {k: v[sl] if device is None else v[sl].to(device) for k, v in self.params.items()}
        return build_operator(params, self.b0_method, self.n_segments)

    def data_term(self, sl: slice, device: torch.device | str,
                  scale: Tensor | None = None) -> tuple[ForwardOperator, Tensor, Tensor]:
        """What a data-consistency step of the slices `sl` needs (`ProximalDC(A, y, noise_sigma)`), on
        `device`: A, y complex64 `[s,C,H,W]` and the noise std `[s]`, y and the std multiplied by `scale`
        `[s]` where given (a prior's data range; A is linear and unitless, so it is unchanged)."""
        y, sigma = self.y[sl].to(device, torch.complex64), self.noise_sigma[sl].to(device)
        if scale is not None:
            y, sigma = y * scale[:, None, None, None], sigma * scale
        return self.operator(sl, device), y, sigma

    def operator_norm_sq(self, sl: slice = slice(None), iterations: int = POWER_ITERATIONS) -> Tensor:
        """`||A||^2` of each slice of `sl` by power iteration (`operator_norm_sq`), float32 `[s]`: the
        Lipschitz constant of the data term's gradient (first-order solvers' step sizes)."""
        return operator_norm_sq(self.operator(sl), self.y[sl, :1], iterations)
