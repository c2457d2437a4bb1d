"""DDP on CPU: `lfmri fit --trainer.strategy=ddp --trainer.devices=2` (2 gloo processes) trains, checkpoints,
and each rank gets its own shard of the training data."""

import os
import subprocess

import pytest
import torch
from helpers import LFMRI, QUICKSTART, REPO, TINY_QUICKSTART_ARGS

from datamodules.resumable import resumable_loader

#: a callback for the subprocess (on PYTHONPATH): each rank writes the (volume id, slice) of its samples
RECORDER = '''
from lightning.pytorch import Callback


class Seen(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            for volume_id, s in zip(batch.volume_id, batch.slice.tolist()):
                f.write(f"{volume_id}:{s}\\n")
'''


@pytest.mark.slow
@pytest.mark.e2e
def test_two_process_cpu_ddp_fit(tmp_path):
    (tmp_path / "seen_cb.py").write_text(RECORDER)
    root = tmp_path / "run"
    cmd = [str(LFMRI), "fit", "--config", str(QUICKSTART),
           "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2",
           "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
           "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={root}",
           "--trainer.callbacks+=seen_cb.Seen", f"--trainer.callbacks.path={tmp_path / 'seen'}",
           *TINY_QUICKSTART_ARGS]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    seen = [(tmp_path / f"seen.{rank}").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3 * 2  # 3 steps of batch 2 on each rank
    assert not set(seen[0]) & set(seen[1])  # disjoint shards (Lightning kept our distributed sampler)


def test_sampler_shards_cover_the_epoch_once():
    data = list(range(11))
    shards = []
    for rank in (0, 1):
        loader = resumable_loader(data, batch_size=2, seed=3, num_replicas=2, rank=rank)
        loader.sampler.set_epoch(1)
        shards.append([i for batch in loader for i in batch.tolist()])
    assert len(shards[0]) == len(shards[1]) == 6  # padded to equal length, as DistributedSampler does
    assert set(shards[0]) | set(shards[1]) == set(data)
    assert len(set(shards[0]) & set(shards[1])) <= 1  # only the padding sample repeats
