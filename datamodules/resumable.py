"""A training DataLoader that resumes mid-epoch with the exact batch sequence of an uninterrupted run.

Training is a pure function of (seed, epoch, batch position, rank), so `--ckpt_path last` after a crash
continues exactly where the checkpoint was written:

- `ResumableSampler` (a `DistributedSampler`, so Lightning keeps it under DDP instead of injecting its own):
  a permutation seeded by (seed, epoch), sharded over the ranks, minus the samples already consumed; it passes
  the epoch to the dataset, whose samples are a function of (seed, epoch, index) alone
  (`datamodules.dataset.TrainSliceDataset.generator`): not of the worker count or of any global RNG.
- `ResumableDataLoader`: counts the batches it hands to the training loop; `state_dict()` /
  `load_state_dict()` (Lightning saves them in the checkpoint's loop state, see
  `lightning.pytorch.loops.fit_loop`) hold {epoch, batches}. Before each batch it reseeds torch's global RNG
  from (seed, global seed, epoch, batch, rank), so the model's own draws (DSM noise, diffusion times,
  dropout) repeat after a resume too, without storing per-rank RNG states.

Worker processes (also the evaluation loaders') ignore SIGINT and SIGTERM (`IgnoreStopSignals`): a terminal's
Ctrl-C and SLURM's pre-emption signal every process of the job, and a worker killed by it would make the main
process fail mid-step instead of saving its checkpoint (`lightning_modules.callbacks.InterruptCheckpoint`).
The workers still stop with the loader, or when the main process is gone (PyTorch's worker watchdog).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lfmri_utils.seeding import SEED_MOD, stable_hash


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (permutation seeded by seed + epoch, padded and sharded over `num_replicas`) that
    skips the first `start` samples of this rank's share once, after a restore."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch cancels a pending skip."""
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        indices = list(super().__iter__())
        return iter(indices[start:])


class IgnoreStopSignals:
    """A DataLoader `worker_init_fn`: ignore SIGINT / SIGTERM in the worker, then run the user's own one."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class ResumableDataLoader(DataLoader):
    """DataLoader over a `ResumableSampler` with Lightning's `state_dict` / `load_state_dict` protocol.

    State: {"epoch": int, "batches": int} = batches of that epoch already handed to the training loop.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        kwargs["worker_init_fn"] = IgnoreStopSignals(kwargs.get("worker_init_fn"))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.global_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._epoch = sampler.epoch
        self._batches = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs (no worker starts, no index is drawn) until the first batch is asked for,
        # i.e. after Lightning's set_epoch for the epoch.
        sampler: ResumableSampler = self.sampler
        self._epoch, self._batches = sampler.epoch, 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == sampler.epoch:
                self._batches = batches
                sampler.start = batches * self.batch_size
        for batch in super().__iter__():
            torch.manual_seed(
                stable_hash("step", sampler.seed, self.global_seed, self._epoch, self._batches, sampler.rank)
                % SEED_MOD
            )
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batches"}: the position of the training loop in the data."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state` on the next iteration (if that epoch is resumed; a new one starts at 0)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self._resume = (epoch, batches)
        self.sampler.set_epoch(epoch)


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                     **kwargs: Any) -> ResumableDataLoader:
    """A shuffled training loader over `dataset` (seeded; sharded over `num_replicas`, this one `rank`); the
    sampler passes each epoch to the dataset's `set_epoch`, whose samples are a function of (seed, epoch,
    index) (`datamodules.dataset.TrainSliceDataset.generator`)."""
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(dataset, sampler, batch_size=batch_size, **kwargs)
