"""Helper of test_sampler_callback.py (not a test): validate a checkpoint with SamplerCallback on CPU.

    python ddp_validate.py CKPT DEVICES SETTINGS_JSON OUT_DIR

SETTINGS_JSON: {"callback": SamplerCallback kwargs but its sampler, "sampling": SamplerOptions kwargs (the
callback's sampler), "data": LowFieldDataModule kwargs but its source,
"bundled": BundledSource kwargs (the data module's source)}. With DEVICES > 1 the
Trainer runs DDP (gloo), re-launching this script once per extra rank. Every rank writes the callback's
metrics to OUT_DIR/rank<global rank>.json; the CSV logger writes under OUT_DIR/logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from datamodules import BundledSource, LowFieldDataModule
from diffusion.sampling.samplers import SamplerOptions
from lightning_modules.callbacks import SamplerCallback
from lightning_modules.module import ScoreModel


def main(ckpt: str, devices: int, settings: dict, out_dir: Path) -> None:
    callback = SamplerCallback(SamplerOptions(**settings["sampling"]), **settings["callback"])
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         limit_val_batches=1, logger=CSVLogger(out_dir, name="logs"), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False)
    datamodule = LowFieldDataModule(BundledSource(**settings["bundled"]), **settings["data"])
    trainer.validate(ScoreModel.load_from_checkpoint(ckpt), datamodule=datamodule, verbose=False)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(callback.last_metrics))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4]))
