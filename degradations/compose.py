"""Composition of the degradations into named low-field regimes.

A regime adds steps in the physical order blur -> T2* -> B0 -> (coils -> undersampling) -> noise. The signal
equation evaluates them as

    y = A x + n,    (A x)_c = M(k) * MTF(k) * T2*(t(kx)) * E_B0(s_c x)

(the MTF and the T2* envelope weight every sample produced by the off-resonance encoding `E_B0`, which is
`fft2c` without B0) and `n` is complex Gaussian noise whose level is set against the noise-free image
`ifft2c(A x)` entering the noise stage. `apply` is exactly `build_operator(params, *b0_settings)(x) + n`
(`degradations.measurement.build_operator`, the one place A is built, which measurements use too).

Multi-coil and undersampled acquisitions (`make_regime(..., acceleration=4, coils=8)`): the coil step
(`degradations.coils.CoilSensitivities`, birdcage maps `s_c` with `sum_c |s_c|^2 = 1`) and the mask step
(`degradations.masks.UndersamplingMask`, `M` 0/1) can be added to every regime; then `y` is `[B, C, H, W]`,
0 where not sampled (noise drawn on the whole grid, then masked). The noise level stays the one of the fully
sampled single-coil noise-free image (`ForwardOperator.noise_free_image`), so the same SNR gives the same
`noise_sigma` with or without them, and the coil-combined fully sampled image has that SNR. Without these two
steps everything (parameters, random draws, `y`) is as before, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .b0 import B0PhaseCorruption
from .blur import GaussianBlur
from .coils import CoilSensitivities
from .masks import UndersamplingMask
from .measurement import DEFAULT_B0_METHOD, build_operator
from .noise import ComplexGaussianNoise
from .operator import ForwardOperator
from .t2star import T2StarDecay
from .timing import AcquisitionTiming

__all__ = ["LowFieldDegradation", "make_regime", "REGIMES", "PARAM_KEYS", "neutral_params",
           "params_to_jsonable", "regime_label", "acquisition_summary"]

#: the four regimes of the paper, in its order (the one list every module, command and script uses)
REGIMES = ("noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0")


def regime_label(regime: str) -> str:
    """`noise_blur_t2star_b0` -> `noise + blur + T2* + B0` (the paper's row names)."""
    names = {"t2star": "T2*", "b0": "B0"}
    return " + ".join(names.get(part, part) for part in regime.split("_"))

_REGIME_STEPS = {
    "noise": ("noise",),
    "noise_blur": ("blur", "noise"),
    "noise_blur_t2star": ("blur", "t2star", "noise"),
    "noise_blur_t2star_b0": ("blur", "t2star", "b0", "noise"),
}
#: override name -> (component, constructor argument)
_OVERRIDES = {
    "fwhm_px": ("blur", "fwhm_px"), "fwhm_px_range": ("blur", "fwhm_px_range"),
    "t2star_ms": ("t2star", "t2star_ms"), "t2star_ms_range": ("t2star", "t2star_ms_range"),
    "t2star_mode": ("t2star", "mode"),
    "readout_ms": ("timing", "readout_ms"), "readout_ms_range": ("timing", "readout_ms_range"),
    "te_ms": ("timing", "te_ms"), "te_ms_range": ("timing", "te_ms_range"),
    "b0_max_hz": ("b0", "b0_max_hz"), "b0_max_hz_range": ("b0", "b0_max_hz_range"),
    "b0_poly_degree": ("b0", "poly_degree"), "b0_method": ("b0", "method"),
    "n_segments": ("b0", "n_segments"),
    "snr_db": ("noise", "snr_db"), "snr_db_range": ("noise", "snr_db_range"),
    "acceleration": ("mask", "acceleration"), "center_fraction": ("mask", "center_fraction"),
    "mask": ("mask", "kind"), "coils": ("coils", "n_coils"),
}
#: the mask kind `make_regime` uses when only an acceleration is given (fastMRI's RandomMaskFunc)
DEFAULT_MASK_KIND = "random"
#: the full, flat params key set (every regime returns all of them)
PARAM_KEYS = ("fwhm_px", "t2star_ms", "t2star_gre", "readout_ms", "te_ms", "b0_map_hz", "b0_max_hz", "snr_db",
              "noise_sigma")


def neutral_params(batch: int, height: int, width: int,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The full key set with neutral values (`A = fft2c`, no noise): `fwhm_px` 0, `t2star_ms` inf,
    zero field map, `snr_db` inf, `noise_sigma` 0; `readout_ms` / `te_ms` are the timing defaults."""
    params = {"fwhm_px": torch.zeros(batch, device=device),
              "t2star_ms": torch.full((batch,), math.inf, device=device),
              "t2star_gre": torch.zeros(batch, device=device)}
    params.update(AcquisitionTiming().nominal(batch, device))
    params.update({"b0_map_hz": torch.zeros(batch, 1, height, width, device=device),
                   "b0_max_hz": torch.zeros(batch, device=device),
                   "snr_db": torch.full((batch,), math.inf, device=device),
                   "noise_sigma": torch.zeros(batch, device=device)})
    return params


class LowFieldDegradation:
    """An ordered composition of low-field degradations (blur -> T2* -> B0 -> coils -> undersampling ->
    noise); any step may be absent.

    Args:
        name: regime name.
        blur, t2star, b0, noise: the steps (`None` = absent).
        timing: readout / echo timing shared by T2* and B0 (default `AcquisitionTiming`).
        coils: receive coils (`None` = one coil with `s = 1`).
        mask: k-space undersampling (`None` = fully sampled).
    """

    def __init__(self, name: str, blur: GaussianBlur | None = None, t2star: T2StarDecay | None = None,
                 b0: B0PhaseCorruption | None = None, noise: ComplexGaussianNoise | None = None,
                 timing: AcquisitionTiming | None = None, coils: CoilSensitivities | None = None,
                 mask: UndersamplingMask | None = None) -> None:
        self.name = name
        self.blur, self.t2star, self.b0, self.noise = blur, t2star, b0, noise
        self.coils, self.mask = coils, mask
        self.timing = timing if timing is not None else AcquisitionTiming()

    @property
    def steps(self) -> tuple[Any, ...]:
        """The present steps, in physical order."""
        return tuple(s for s in (self.blur, self.t2star, self.b0, self.coils, self.mask, self.noise)
                     if s is not None)

    def __repr__(self) -> str:
        return f"LowFieldDegradation({self.name!r}, steps={[type(s).__name__ for s in self.steps]})"

    # -- parameters ----------------------------------------------------------------------------------------
    def sample_scalars(self, batch: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """All scalar params `[B]` except `noise_sigma` (which needs the image): `fwhm_px`,
        `t2star_ms`, `t2star_gre`, `readout_ms`, `te_ms`, `b0_max_hz`, `snr_db` (target). Neutral
        where absent; the timing is drawn only when T2* or B0 is present (otherwise it is irrelevant and set
        to nominal)."""
        neutral = neutral_params(batch, 1, 1, device)
        out = {k: neutral[k] for k in ("fwhm_px", "t2star_ms", "t2star_gre")}
        if self.blur is not None:
            out.update(self.blur.sample_params(batch, generator, device))
        if self.t2star is not None:
            out.update(self.t2star.sample_params(batch, generator, device))
        if self.t2star is not None or self.b0 is not None:
            out.update(self.timing.sample_params(batch, generator, device))
        else:
            out.update(self.timing.nominal(batch, device))
        out["b0_max_hz"] = self.b0.sample_max(batch, generator, device) if self.b0 is not None \
            else neutral["b0_max_hz"]
        out["snr_db"] = self.noise.sample_snr(batch, generator, device) if self.noise is not None \
            else neutral["snr_db"]
        return out

    def sample_map(self, b0_max_hz: torch.Tensor, height: int, width: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Field maps `[B, 1, H, W]` in Hz for the maxima `b0_max_hz` `[B]` (zeros without B0)."""
        if self.b0 is None:
            return torch.zeros(b0_max_hz.shape[0], 1, height, width, device=b0_max_hz.device)
        return self.b0.sample_map(b0_max_hz, height, width, generator)

    @property
    def b0_settings(self) -> tuple[str, int | None]:
        """`(b0_method, n_segments)`: how this regime evaluates off-resonance (`degradations.b0`), the B0
        step's settings, or the defaults without B0 (where they change nothing); the one place a regime's
        choice is read, by the simulator and by every measurement of it (`Measurement.simulated`)."""
        if self.b0 is None:
            return DEFAULT_B0_METHOD, None
        return self.b0.method, self.b0.n_segments

    def operator(self, params: dict[str, torch.Tensor]) -> ForwardOperator:
        """The forward operator `A` of `params` with this regime's B0 settings (`build_operator`)."""
        return build_operator(params, *self.b0_settings)

    def sample_acquisition(self, batch: int, height: int, width: int,
                           generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The coil and undersampling parameters: `sensitivities` complex64 `[B, C, H, W]` (with coils) and
        `mask` float32 `[B, 1, H, W]` (with undersampling), drawn with `generator` in that order; `{}`
        without these steps (nothing drawn)."""
        out: dict[str, torch.Tensor] = {}
        if self.coils is not None:
            out.update(self.coils.sample_params(batch, height, width, generator, device))
        if self.mask is not None:
            out.update(self.mask.sample_params(batch, height, width, generator, device))
        return out

    def sample_params(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      signal_power: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All parameters for the complex images `x` `[B, 1, H, W]`: the full key set `PARAM_KEYS`, then
        `mask` / `sensitivities` where the regime has these steps (`sample_acquisition`, drawn last).

        `noise_sigma` is set from the target `snr_db` and the noise-free image `ifft2c(A x)` of the fully
        sampled single-coil operator (or the given `signal_power` `[B]`, e.g. a volume's, see
        `ComplexGaussianNoise`).
        """
        batch, _, height, width = x.shape
        params = self.sample_scalars(batch, generator, x.device)
        params["b0_map_hz"] = self.sample_map(params["b0_max_hz"], height, width, generator)
        if self.noise is None:
            params["noise_sigma"] = torch.zeros(batch, device=x.device)
        else:
            x_in = self.operator(params).noise_free_image(x)
            params["noise_sigma"] = self.noise.sigma_for(x_in, params["snr_db"], signal_power)
        out = {key: params[key] for key in PARAM_KEYS}
        out.update(self.sample_acquisition(batch, height, width, generator, x.device))
        return out

    # -- application ---------------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor],
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Measured k-space `y = A x + n` (complex `[B, C, H, W]`, `C = 1` without coils; 0 where not
        sampled) of the complex images `x` `[B, 1, H, W]`."""
        k = self.operator(params).forward(x)
        return k if self.noise is None else self.noise.apply(k, params, generator)

    def __call__(self, x: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(y, params)`: draw the parameters, then apply them (both with `generator`)."""
        params = self.sample_params(x, generator)
        return self.apply(x, params, generator), params


def make_regime(name: str, **overrides: Any) -> LowFieldDegradation:
    """The named regime (one of `REGIMES`) with default ranges, optionally overridden.

    `overrides` fix a parameter (`snr_db=5.0`) or set a range (`snr_db_range=(2.0, 7.0)`); the names are
    `fwhm_px[_range]`, `t2star_ms[_range]`, `t2star_mode`, `readout_ms[_range]`, `te_ms[_range]`,
    `b0_max_hz[_range]`, `b0_poly_degree`, `b0_method`, `n_segments`, `snr_db[_range]`.
    Overrides of a step the regime lacks are ignored, so one set of overrides serves every regime.
    Every regime takes the acquisition steps: `acceleration` (> 1 adds `UndersamplingMask`; None or 1: fully
    sampled) with `mask` (its kind, "random" (default), "equispaced" or "poisson") and `center_fraction`
    (default `UndersamplingMask`'s), and `coils` (> 1 adds `CoilSensitivities` with that many birdcage coils;
    None or 1: one coil with `s = 1`). A None value is the same as leaving the override out.
    Unknown regime or override, or `mask` / `center_fraction` without an acceleration > 1 -> `ValueError`.
    """
    if name not in _REGIME_STEPS:
        raise ValueError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown degradation parameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(_OVERRIDES)}")
    kwargs: dict[str, dict[str, Any]] = {"blur": {}, "t2star": {}, "b0": {}, "noise": {}, "timing": {},
                                         "mask": {}, "coils": {}}
    for key, value in overrides.items():
        component, arg = _OVERRIDES[key]
        if component in ("mask", "coils") and value is None:
            continue
        kwargs[component][arg] = tuple(value) if key.endswith("_range") else value
    classes = {"blur": GaussianBlur, "t2star": T2StarDecay, "b0": B0PhaseCorruption,
               "noise": ComplexGaussianNoise}
    steps = {step: classes[step](**kwargs[step]) for step in _REGIME_STEPS[name]}
    return LowFieldDegradation(name, timing=AcquisitionTiming(**kwargs["timing"]), **steps,
                               coils=_coil_step(kwargs["coils"]), mask=_mask_step(kwargs["mask"]))


def _coil_step(kwargs: dict[str, Any]) -> CoilSensitivities | None:
    """The coil step of `make_regime`'s `coils` override (None for none or one coil)."""
    n_coils = kwargs.get("n_coils")
    if n_coils is None or n_coils == 1:
        return None
    if isinstance(n_coils, bool) or not isinstance(n_coils, int) or n_coils < 1:
        raise ValueError(f"coils must be an integer >= 1, got {n_coils!r}")
    return CoilSensitivities(n_coils)


def _mask_step(kwargs: dict[str, Any]) -> UndersamplingMask | None:
    """The undersampling step of `make_regime`'s `acceleration` / `mask` / `center_fraction` overrides
    (None when fully sampled)."""
    acceleration = kwargs.pop("acceleration", None)
    if acceleration is None or acceleration == 1:
        if kwargs:
            raise ValueError(f"{' and '.join(sorted('mask' if k == 'kind' else k for k in kwargs))} "
                             "need(s) an acceleration > 1")
        return None
    return UndersamplingMask(kwargs.pop("kind", DEFAULT_MASK_KIND), acceleration, **kwargs)


def params_to_jsonable(params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One dict of Python scalars per sample (non-finite -> `None`; per-pixel maps omitted). The big
    acquisition tensors are summarised (`acquisition_summary`): a `mask` as `acceleration` / `n_lines`, the
    `sensitivities` as `n_coils`; without them the rows are as before."""
    scalars = {key: value.detach().cpu().double() for key, value in params.items()
               if torch.is_tensor(value) and value.dim() == 1}
    scalars.update(acquisition_summary(params))
    batch = next(iter(scalars.values())).shape[0] if scalars else 0
    out = []
    for i in range(batch):
        row = {}
        for key, value in scalars.items():
            v = float(value[i])
            row[key] = v if math.isfinite(v) else None
        out.append(row)
    return out


def acquisition_summary(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample scalars float64 `[B]` of the optional acquisition keys: with `mask` `[B,1,H,W]` the
    realised `acceleration` (`H W / sampled samples`, inf for an empty mask) and `n_lines` (sampled rows of a
    Cartesian mask, constant along W; NaN for a 2D mask such as Poisson disc), with `sensitivities`
    `[B,C,H,W]` `n_coils`; `{}` without them."""
    out = {}
    mask = params.get("mask")
    if mask is not None:
        sampled = mask.detach().cpu().double().expand(mask.shape[0], 1, *mask.shape[-2:])[:, 0] > 0
        count = sampled.flatten(1).sum(1).double()
        out["acceleration"] = sampled[0].numel() / count
        cartesian = (sampled == sampled[..., :1]).flatten(1).all(1)
        out["n_lines"] = torch.where(cartesian, sampled[..., 0].sum(1).double(), math.nan)
    sensitivities = params.get("sensitivities")
    if sensitivities is not None:
        out["n_coils"] = torch.full((sensitivities.shape[0],), float(sensitivities.shape[1]),
                                    dtype=torch.float64)
    return out
