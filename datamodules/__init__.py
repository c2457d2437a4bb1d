"""Volume sources, subject splits, slice datasets, their sample types (`SliceSample`, `MeasuredSample`)
and the LightningDataModule that degrades on the fly.

Exports are loaded lazily (PEP 562), so `import datamodules` does not import Lightning. The project-wide
helpers (InputError, atomic writes, option checks, `stable_hash`) are in `lfmri_utils`.
"""

from __future__ import annotations

from lfmri_utils.lazy import lazy_exports

_EXPORTS = {
    "LowFieldDataModule": "datamodules.datamodule",
    "EvalVolume": "datamodules.datamodule",
    "LoaderOptions": "datamodules.datamodule",
    "SliceOptions": "datamodules.dataset",
    "PredictOptions": "datamodules.dataset",
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

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
