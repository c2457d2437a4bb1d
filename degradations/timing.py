"""Acquisition timing of a Cartesian 2D readout, shared by T2* decay and B0 off-resonance.

Frequency encoding (the readout) runs along the last dim `W`, phase encoding along `H`. Every k-space
column `kx` (index `j = 0 .. W-1`) is sampled at

    t(j) = te_ms + (j - W // 2) * readout_ms / W        [ms]

so the echo (`t = TE`) falls on the DC column `W // 2` (for even `W` this is `(j - W/2)`), the readout
lasts `readout_ms` and all rows (phase-encoding steps) share the same timing.

Default ranges (portable 0.05-0.5 T scanners): low-field systems trade bandwidth for SNR, with receiver
bandwidths of roughly 20-40 kHz over ~256 samples, i.e. readouts of about 6-12 ms; echo times of the
gradient-echo-like phase accrual modelled here are 5-20 ms.
"""

from __future__ import annotations

import torch

from ._random import check_range, uniform

__all__ = ["AcquisitionTiming", "sample_times_ms"]


def sample_times_ms(readout_ms: torch.Tensor, te_ms: torch.Tensor, width: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Acquisition time of each k-space column `[B, W]` (ms) from `readout_ms` and `te_ms` `[B]`."""
    j = torch.arange(width, device=readout_ms.device, dtype=dtype) - width // 2
    return te_ms.to(dtype)[:, None] + j[None, :] * (readout_ms.to(dtype)[:, None] / width)


class AcquisitionTiming:
    """Draws the readout duration `readout_ms` and echo time `te_ms` (ms) of each sample.

    Args:
        readout_ms_range: uniform range of the readout duration, ms (default 6-12 ms, see module docstring).
        te_ms_range: uniform range of the echo time, ms (default 5-20 ms).
        readout_ms, te_ms: fixed values that replace the draws.
    """

    def __init__(self, readout_ms_range: tuple[float, float] = (6.0, 12.0),
                 te_ms_range: tuple[float, float] = (5.0, 20.0),
                 readout_ms: float | None = None, te_ms: float | None = None) -> None:
        self.readout_ms_range = check_range("readout_ms_range", readout_ms_range, low=0.0)
        self.te_ms_range = check_range("te_ms_range", te_ms_range, low=0.0)
        self.readout_ms = readout_ms
        self.te_ms = te_ms

    def nominal(self, batch: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Deterministic timing (fixed values or range midpoints), used when no step depends on time."""
        readout = self.readout_ms if self.readout_ms is not None else sum(self.readout_ms_range) / 2
        te = self.te_ms if self.te_ms is not None else sum(self.te_ms_range) / 2
        return {"readout_ms": torch.full((batch,), float(readout), device=device),
                "te_ms": torch.full((batch,), float(te), device=device)}

    def sample_params(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`{"readout_ms": [B], "te_ms": [B]}` drawn with `generator`."""
        return {"readout_ms": uniform(batch, self.readout_ms_range, self.readout_ms, generator, device),
                "te_ms": uniform(batch, self.te_ms_range, self.te_ms, generator, device)}
