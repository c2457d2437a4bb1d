"""T2*-like exponential damping of k-space along the readout."""

from __future__ import annotations

import torch

from ._random import check_range, uniform
from .timing import sample_times_ms

__all__ = ["T2StarDecay", "t2star_weights", "T2STAR_MODES"]

T2STAR_MODES = ("spin_echo", "gradient_echo")


def t2star_weights(t2star_ms: torch.Tensor, readout_ms: torch.Tensor, te_ms: torch.Tensor, width: int,
                   gradient_echo: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Readout damping weights `[B, 1, 1, W]` (broadcast over the phase-encoding dim `H`).

    With `t(kx)` the acquisition time of column `kx` (see `degradations.timing`):

    * spin echo (default): `exp(-|t - TE| / T2*)` -- the refocusing pulse rebuilds the signal towards the
      echo, so the envelope is symmetric about the echo (a Lorentzian-like blur along the readout);
    * gradient echo (`gradient_echo` true for that sample): `exp(-(t - TE) / T2*)` -- free decay through
      the readout, normalised to 1 at the echo (samples before the echo are weighted > 1), which is
      asymmetric and adds a phase-free but non-Hermitian weighting (a shift-like asymmetric blur).

    The weight is 1 at the echo; `t2star_ms = inf` gives the identity.
    """
    dt = sample_times_ms(readout_ms, te_ms, width, dtype) - te_ms.to(dtype)[:, None]
    if gradient_echo is None:
        gradient_echo = torch.zeros_like(t2star_ms)
    gre = gradient_echo.to(dtype)[:, None] > 0.5
    exponent = torch.where(gre, dt, dt.abs())
    w = torch.exp(-exponent / t2star_ms.to(dtype)[:, None])
    return w[:, None, None, :]


class T2StarDecay:
    """Exponential k-space damping from the acquisition time of each readout sample.

    Portable scanners use permanent (e.g. Halbach) magnets whose residual inhomogeneity (tens of ppm)
    rather than tissue T2 (~80-100 ms at low field) limits T2*; T2* of 15-60 ms is the default range,
    comparable to the 6-12 ms readouts, so the edge of k-space is damped by `exp(-readout / 2 / T2*)`
    ~ 0.6-0.95.

    Args:
        t2star_ms_range: uniform range of T2*, ms.
        t2star_ms: fixed T2* that replaces the draw (`inf` = no decay).
        mode: `"spin_echo"` (symmetric about the echo, default) or `"gradient_echo"` (asymmetric),
            see `t2star_weights`. Recorded in the params as `t2star_gre` (0.0 or 1.0).
    """

    def __init__(self, t2star_ms_range: tuple[float, float] = (15.0, 60.0), t2star_ms: float | None = None,
                 mode: str = "spin_echo") -> None:
        self.t2star_ms_range = check_range("t2star_ms_range", t2star_ms_range, low=1e-6)
        if t2star_ms is not None and not t2star_ms > 0:
            raise ValueError(f"t2star_ms must be > 0, got {t2star_ms}")
        if mode not in T2STAR_MODES:
            raise ValueError(f"unknown T2* mode {mode!r}; valid modes: {', '.join(T2STAR_MODES)}")
        self.t2star_ms = t2star_ms
        self.mode = mode

    def sample_params(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`{"t2star_ms": [B], "t2star_gre": [B]}` drawn with `generator`."""
        gre = 1.0 if self.mode == "gradient_echo" else 0.0
        return {"t2star_ms": uniform(batch, self.t2star_ms_range, self.t2star_ms, generator, device),
                "t2star_gre": torch.full((batch,), gre, device=device)}

    @staticmethod
    def kspace_weights(params: dict[str, torch.Tensor], width: int) -> torch.Tensor | None:
        """The k-space weights this step contributes to `A`: the readout damping `[B, 1, 1, W]` (float32,
        see `t2star_weights`) from `t2star_ms`, `readout_ms`, `te_ms` and optional `t2star_gre`
        `[B]` (spin echo without it), or `None` when no sample decays (all `t2star_ms = inf`)."""
        t2star = params["t2star_ms"]
        if not bool(torch.isfinite(t2star).any()):
            return None
        return t2star_weights(t2star, params["readout_ms"], params["te_ms"], width, params.get("t2star_gre"))
