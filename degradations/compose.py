"""Composition of the degradations into named low-field regimes.

A regime adds steps in the physical order blur -> T2* -> B0 -> noise. The signal equation evaluates them as

    y = A x + n,    A x = MTF(k) * T2*(t(kx)) * E_B0(x)

(the MTF and the T2* envelope weight every sample produced by the off-resonance encoding `E_B0`, which is
`fft2c` without B0) and `n` is complex Gaussian noise whose level is set against the noise-free image
`ifft2c(A x)` entering the noise stage. `apply` is exactly `build_operator(params, *b0_settings)(x) + n`
(`degradations.measurement.build_operator`, the one place A is built, which measurements use too).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .b0 import B0PhaseCorruption
from .blur import GaussianBlur
from .measurement import DEFAULT_B0_METHOD, build_operator
from .noise import ComplexGaussianNoise
from .operator import ForwardOperator
from .t2star import T2StarDecay
from .timing import AcquisitionTiming

__all__ = ["LowFieldDegradation", "make_regime", "REGIMES", "PARAM_KEYS", "neutral_params",
           "params_to_jsonable", "regime_label"]

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
}
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
    """An ordered composition of low-field degradations (blur -> T2* -> B0 -> noise); any step may be absent.

    Args:
        name: regime name.
        blur, t2star, b0, noise: the steps (`None` = absent).
        timing: readout / echo timing shared by T2* and B0 (default `AcquisitionTiming`).
    """

    def __init__(self, name: str, blur: GaussianBlur | None = None, t2star: T2StarDecay | None = None,
                 b0: B0PhaseCorruption | None = None, noise: ComplexGaussianNoise | None = None,
                 timing: AcquisitionTiming | None = None) -> None:
        self.name = name
        self.blur, self.t2star, self.b0, self.noise = blur, t2star, b0, noise
        self.timing = timing if timing is not None else AcquisitionTiming()

    @property
    def steps(self) -> tuple[Any, ...]:
        """The present steps, in physical order."""
        return tuple(s for s in (self.blur, self.t2star, self.b0, self.noise) if s is not None)

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

    def sample_params(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      signal_power: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All parameters for the complex images `x` `[B, 1, H, W]`: the full key set `PARAM_KEYS`.

        `noise_sigma` is set from the target `snr_db` and the noise-free image `ifft2c(A x)` (or the
        given `signal_power` `[B]`, e.g. a volume's, see `ComplexGaussianNoise`).
        """
        batch, _, height, width = x.shape
        params = self.sample_scalars(batch, generator, x.device)
        params["b0_map_hz"] = self.sample_map(params["b0_max_hz"], height, width, generator)
        if self.noise is None:
            params["noise_sigma"] = torch.zeros(batch, device=x.device)
        else:
            x_in = self.operator(params).noise_free_image(x)
            params["noise_sigma"] = self.noise.sigma_for(x_in, params["snr_db"], signal_power)
        return {key: params[key] for key in PARAM_KEYS}

    # -- application ---------------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor],
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Measured k-space `y = A x + n` (complex `[B, 1, H, W]`) of the complex images `x`."""
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
    Unknown regime or override -> `ValueError`.
    """
    if name not in _REGIME_STEPS:
        raise ValueError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown degradation parameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(_OVERRIDES)}")
    kwargs: dict[str, dict[str, Any]] = {"blur": {}, "t2star": {}, "b0": {}, "noise": {}, "timing": {}}
    for key, value in overrides.items():
        component, arg = _OVERRIDES[key]
        kwargs[component][arg] = tuple(value) if key.endswith("_range") else value
    classes = {"blur": GaussianBlur, "t2star": T2StarDecay, "b0": B0PhaseCorruption,
               "noise": ComplexGaussianNoise}
    steps = {step: classes[step](**kwargs[step]) for step in _REGIME_STEPS[name]}
    return LowFieldDegradation(name, timing=AcquisitionTiming(**kwargs["timing"]), **steps)


def params_to_jsonable(params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One dict of Python scalars per sample (non-finite -> `None`; per-pixel maps omitted)."""
    scalars = {key: value.detach().cpu().double() for key, value in params.items()
               if torch.is_tensor(value) and value.dim() == 1}
    batch = next(iter(scalars.values())).shape[0] if scalars else 0
    out = []
    for i in range(batch):
        row = {}
        for key, value in scalars.items():
            v = float(value[i])
            row[key] = v if math.isfinite(v) else None
        out.append(row)
    return out
