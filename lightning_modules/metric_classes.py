"""torchmetrics `Metric`s of fastMRI's volume SSIM / PSNR / NMSE: the functions of `lfmri_utils.metrics`
accumulated over volumes, synchronised across processes by torchmetrics.

Each `update(pred, target)` scores one VOLUME (`[S, H, W]`, `[S, 1, H, W]`, or one `[H, W]` slice as a volume
of one slice) with its `lfmri_utils.metrics` function (`ssim_volume`, `psnr_volume`, `nmse_volume`: the
data range is that volume's reference maximum) and keeps the value; `compute()` is the mean over the volumes
seen by every process. The state is the list of per-volume values (`dist_reduce_fx="cat"`): torchmetrics
gathers it from all ranks (a rank that saw no volume contributes none), and the mean is summed exactly
(`math.fsum`, correctly rounded), so it does not depend on the order of the volumes nor on how they were dealt
to the processes: 1 and N processes give the same float64 number.

They live apart from `lfmri_utils.metrics` so that the functions (`lfmri metrics`) import without
torchmetrics (several seconds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from lfmri_utils.metrics import nmse_volume, psnr_volume, ssim_volume

__all__ = ["FASTMRI_METRICS", "VolumeMetric", "VolumeNMSE", "VolumePSNR", "VolumeSSIM", "fastmri_collection",
           "volume_metrics"]


class VolumeMetric(Metric):
    """The mean over volumes of a per-volume metric (`volume_fn`, a `lfmri_utils.metrics` function).

    States: `values`, float64 `[N]` once gathered, one entry per volume (`dist_reduce_fx="cat"`).
    `compute()`: their mean, float64 (NaN before any update); the correctly rounded sum of finite values
    (`math.fsum`), so the same on any number of processes; with a non-finite value (a perfect PSNR is inf),
    torch's mean (inf or NaN, whatever the order).
    """

    is_differentiable = False
    full_state_update = False
    #: the metric of one volume: `fn(pred, target) -> float`
    volume_fn: ClassVar[Callable[[Tensor | np.ndarray, Tensor | np.ndarray], float]]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    @property
    def dtype(self) -> torch.dtype:
        """float64, whatever `.to()` did: in a sync, a rank without volumes sends torchmetrics' empty tensor
        of this dtype, which must be that of the other ranks' values."""
        return torch.float64

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Score one volume `pred` against its reference `target` (same shape)."""
        value = type(self).volume_fn(pred, target)
        self.values.append(torch.tensor([value], dtype=torch.float64, device=self.device))

    def compute(self) -> Tensor:
        """The mean over the volumes (all processes' after a sync), float64."""
        if isinstance(self.values, list) and not self.values:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        values = dim_zero_cat(self.values)
        if not bool(torch.isfinite(values).all()):
            return values.mean()
        return torch.tensor(math.fsum(values.tolist()) / values.numel(), dtype=torch.float64,
                            device=self.device)


class VolumeSSIM(VolumeMetric):
    """Mean fastMRI volume SSIM (`metrics.ssim_volume`: skimage's 7x7 uniform window per slice, data range =
    the reference volume's max, averaged over slices)."""

    higher_is_better = True
    volume_fn = staticmethod(ssim_volume)


class VolumePSNR(VolumeMetric):
    """Mean fastMRI volume PSNR in dB (`metrics.psnr_volume`: data range = the reference volume's max)."""

    higher_is_better = True
    volume_fn = staticmethod(psnr_volume)


class VolumeNMSE(VolumeMetric):
    """Mean fastMRI volume NMSE, a fraction (`metrics.nmse_volume`: `||pred - ref||^2 / ||ref||^2`)."""

    higher_is_better = False
    volume_fn = staticmethod(nmse_volume)


#: fastMRI's three metrics by name
FASTMRI_METRICS: dict[str, type[VolumeMetric]] = {"ssim": VolumeSSIM, "psnr": VolumePSNR, "nmse": VolumeNMSE}


def fastmri_collection(prefix: str | None = None, postfix: str | None = None) -> MetricCollection:
    """`FASTMRI_METRICS` as one `MetricCollection`, keys `<prefix><name><postfix>` (e.g. `prefix="val/",
    postfix="/noise"`: `val/ssim/noise`); one `update(pred, target)` scores a volume with all three."""
    return MetricCollection({name: cls() for name, cls in FASTMRI_METRICS.items()}, prefix=prefix,
                            postfix=postfix, compute_groups=False)


def volume_metrics(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> dict[str, float]:
    """`FASTMRI_METRICS` of ONE volume, {"ssim", "psnr", "nmse"}: what a collection's `update` adds."""
    return {name: cls.volume_fn(pred, target) for name, cls in FASTMRI_METRICS.items()}
