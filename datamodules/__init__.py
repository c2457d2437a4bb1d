"""Volume sources, subject splits, slice datasets, their sample types (`SliceSample`, `MeasuredSample`)
and the LightningDataModule that degrades on the fly.

Exports are loaded lazily (PEP 562), so `import datamodules` does not import Lightning. The project-wide
helpers (InputError, atomic writes, option checks, `stable_hash`) are in `lfmri_utils`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LowFieldDataModule": "datamodules.datamodule",
    "EvalVolume": "datamodules.datamodule",
    "BundledSource": "datamodules.sources",
    "NiftiDirSource": "datamodules.sources",
    "FastMRISource": "datamodules.sources",
    "VolumeSource": "datamodules.sources",
    "VolumeRecord": "datamodules.sources",
    "make_source": "datamodules.sources",
    "Split": "datamodules.splits",
    "hash_split": "datamodules.splits",
    "load_split_file": "datamodules.splits",
    "TrainSliceDataset": "datamodules.dataset",
    "EvalSliceDataset": "datamodules.dataset",
    "PredictSliceDataset": "datamodules.dataset",
    "SliceSample": "datamodules.samples",
    "MeasuredSample": "datamodules.samples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
