"""Lightning callbacks of lfmri: the finite-loss guard, the checkpoint on SIGINT / SIGTERM, the validation
sampler callback and the NIfTI prediction writer of `lfmri predict`."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torch.utils.data import default_collate

from datamodules.io import save_nifti_atomic
from degradations import REGIMES, Measurement
from diffusion.inference import Reconstructor
from diffusion.sampling.options import DCKind
from diffusion.sampling.samplers import SamplerOptions, magnitude
from lightning_modules.metric_classes import fastmri_collection


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or Inf; the message names the step."""


class FiniteLossGuard(Callback):
    """Stop a fit at the first NaN/Inf training loss, with a message naming the global step.

    The check runs before the backward pass, so neither the weights nor `last.ckpt` ever see the bad
    step: the run is stopped by raising `NonFiniteLossError` (no checkpoint is written on the way
    out), and `--ckpt_path last` restarts from the last good state.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach().float())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); stopping. The last good checkpoint is kept: resume with "
                "--ckpt_path last after lowering the learning rate or checking the data."
            )


class TrainingInterrupted(Exception):
    """A fit stopped by SIGINT / SIGTERM after writing a resumable checkpoint (`InterruptCheckpoint`).

    Attributes: `signum` (the signal), `path` (the checkpoint written), `step` (its global step).
    """

    def __init__(self, signum: int, path: str, step: int, hint: str = "last") -> None:
        self.signum, self.path, self.step = int(signum), str(path), int(step)
        super().__init__(f"interrupted by {signal.Signals(signum).name} at global step {step}; saved {path} "
                         f"(resume with --ckpt_path {hint})")


class InterruptCheckpoint(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM (e.g. SLURM pre-emption) during `fit`, finish the current training step,
    write a resumable `last.ckpt` and stop by raising `TrainingInterrupted`.

    The checkpoint is written at the same point of the step as `ModelCheckpoint`'s periodic one (the end of
    the training batch, `on_train_batch_end`), through the trainer's checkpoint IO (atomic with
    `lfmri.lightning_cli.AtomicCheckpointIO`), so it holds the same state (weights, optimiser, scheduler, EMA,
    callbacks, and the loop's state with the resumable data loader's position) and `--ckpt_path last` resumes
    bit for bit as from a periodic one. Where: the trainer's `ModelCheckpoint`'s last-checkpoint name in its
    `dirpath` (`last.ckpt`, or the file its `last_model_path` already names); without a ModelCheckpoint,
    `<default_root_dir>/checkpoints/last.ckpt`.

    The handlers are installed at `on_train_start` (they replace Lightning's SIGTERM handler, whose own stop
    writes nothing and exits with code 0) and removed at the end of the fit. A signal only sets a flag: the
    step in progress completes, so the state saved is consistent. A second Ctrl-C stops at once without
    saving, the way of the SIGINT handler in charge before the fit (`lfmri.cli.StopOnSignal`: exit code 130;
    Python's own: Lightning's KeyboardInterrupt shutdown). A validation run in progress inside the fit
    finishes first (the checkpoint is written at the next training step's end). Under DDP the ranks agree on
    stopping at each step (`reduce_boolean_decision`), so they all save at the same step; a run stopped at
    once by a signal (set-up, a second Ctrl-C) also stops the rank processes it launched.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, save nothing, the way of the handler
                previous = self._previous.get(signum)  # that was in charge before (lfmri's own command's)
                self._restore()
                if callable(previous):
                    previous(signum, frame)
                raise KeyboardInterrupt
            return
        self.requested = signum
        again = " (Ctrl-C again to stop at once without saving)" if signum == signal.SIGINT else ""
        # os.write, not print: a handler may run while sys.stderr is in the middle of a write
        os.write(2, f"\nlfmri: received {signal.Signals(signum).name}; saving a checkpoint at the end of the "
                    f"current training step{again}\n".encode())

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if previous is not None:
                    signal.signal(signum, previous)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a SIGTERM that arrived while the fit was set up (Lightning's handler was in charge) counts too
        self.requested = signal.SIGTERM if getattr(trainer, "received_sigterm", False) else None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
        launcher = trainer.strategy.launcher
        if not isinstance(exception, Exception) and launcher is not None:
            # stopped by a signal (`lfmri.cli.Interrupted`, KeyboardInterrupt): the processes this one
            # launched (DDP's other ranks) would wait for it; stop them, as Lightning does on its own Ctrl-C
            launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path, hint = self._save(trainer)
        raise TrainingInterrupted(self.requested or signal.SIGTERM, path, trainer.global_step, hint)

    @staticmethod
    def _save(trainer: Trainer) -> tuple[str, str]:
        """Write the checkpoint; returns (its path, what to pass to --ckpt_path to resume from it)."""
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
            trainer.save_checkpoint(path)
            return path, path
        path = callback.last_model_path
        if not path or os.path.dirname(path) != os.path.normpath(callback.dirpath):
            candidates = callback._monitor_candidates(trainer)
            path = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST)
            version = callback.STARTING_VERSION
            while getattr(callback, "_enable_version_counter", False) and os.path.lexists(path):
                path = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        if callback.save_last:
            callback.last_model_path = path  # part of the callback's saved state, as in a periodic save
        trainer.save_checkpoint(path)
        return path, "last"


class SamplerCallback(Callback):
    """Reconstruct a fixed subset of validation slices per regime; log SSIM / PSNR / NMSE and an image grid.

    Runs at the end of every `every_n_val`-th validation (epoch-based or step-based `val_check_interval`;
    never in the sanity check; also under `trainer.validate`), with the module's EMA weights
    (`pl_module.score_fn()`), through the one inference path (`diffusion.inference.Reconstructor`)
    with the sampler its `sampling` options name (`SamplerOptions`, as `lfmri reconstruct --sampling.*`) on
    the module's SDE (`pl_module.sde`, whatever its class: a family's VP, discrete VP or VE; None options: the
    sampler registry's defaults). Data consistency uses the regime's forward operator of each
    slice's realised parameters, its measured k-space `y` and its known noise level, at the slice's native
    matrix: `Measurement.simulated` of the val batch, so a data module with `regime_overrides`
    `acceleration` / `coils` gives an undersampled multi-coil measurement (y `[B, C, H, W]`, the realised
    `mask` and `sensitivities`), started from the coil-combined zero-filled image (the samples' `degraded`).

    Subset: the validation dataset (`LowFieldDataModule.val_dataset`, an `EvalSliceDataset` enumerating
    volume x slice x regime) is read directly, not through the (possibly limited or sharded) val loader:
    for each regime, `n_slices` of its entries evenly spaced over the dataset order (so over subjects), the
    same at every validation. The degradations are deterministic per (volume id, slice, regime, seed).

    Metrics (fastMRI definitions, `lfmri_utils.metrics`) on magnitude images against |clean|, in
    normalised units, computed PER SLICE with that slice's own data range (`ref.max()` of the slice: the
    subset mixes slices of different volumes, so there is no volume to take the range of), then averaged over
    the regime's slices: one torchmetrics `MetricCollection` per regime
    (`lightning_modules.metric_classes.fastmri_collection`), each slice an `update` as a volume of one slice.
    They track training; they are not the paper's per-subject volume numbers (`lfmri evaluate`). Logged as
    `val/ssim/<regime>`, `val/psnr/<regime>` (dB), `val/nmse/<regime>` (a fraction), identical on every
    rank.

    Distribution and determinism: the subset is cut into batches of at most `batch_size` slices of one
    regime and one volume (one matrix size); whole batches are dealt to the ranks
    (`batch j -> rank j % world_size`); the collections' `compute()` gathers every rank's per-slice values
    (torchmetrics' sync, gloo and NCCL) and sums them exactly (`math.fsum`), whatever their order. Each
    slice samples with its own generator seeded by (seed, its slice index), as in `lfmri reconstruct` and
    `lfmri evaluate`, so batches, noise and per-regime averages do not depend on the number of processes:
    1 and N processes give the same numbers (on the same hardware and thread count).

    Images: rows = regimes (the first slice of each, zero-padded to the largest of them), columns =
    degraded | reconstruction | reference | |error|, rendered with matplotlib on global rank 0 and sent to
    every W&B logger
    (`log_image(key="val/samples")`) and TensorBoard logger (`add_image("val/samples")`); with neither,
    written to `<trainer.log_dir>/samples/step_<global step>.png`.

    The default samplers need no gradients (they run under the validation loop's inference mode).

    Args:
        sampling: the sampler and its options (`SamplerOptions`: sampler, steps, t0, dc, dc_weight, dc_lambda,
            dc_floor, t0_ratio, stop_ratio; in YAML `init_args.sampling.dc_lambda`; None, or None fields: the
            sampler registry's defaults).
        every_n_val: run at every n-th validation (with `check_val_every_n_epoch = k` and no
            `val_check_interval`: every n*k epochs).
        regimes: regimes to reconstruct (default: all the validation dataset's).
        n_slices: slices per regime.
        seed: seeds the sampling noise.
        batch_size: slices per sampler call.
        log_images: log the image grid.
        sampler: deprecated, `sampling.sampler` (folded into `sampling` with a FutureWarning).
        steps: deprecated, `sampling.steps`.
        t0: deprecated, `sampling.t0`.
        dc: deprecated, `sampling.dc`.
        dc_weight: deprecated, `sampling.dc_weight`.
        dc_lambda: deprecated, `sampling.dc_lambda`.
        dc_floor: deprecated, `sampling.dc_floor`.
        t0_ratio: deprecated, `sampling.t0_ratio`.
        stop_ratio: deprecated, `sampling.stop_ratio`.
    """

    def __init__(self, sampling: SamplerOptions | None = None, every_n_val: int = 1,
                 regimes: list[str] | None = None, n_slices: int = 4, seed: int = 0, batch_size: int = 4,
                 log_images: bool = True, *, sampler: str | None = None, steps: int | None = None,
                 t0: float | None = None, dc: DCKind | None = None, dc_weight: float | None = None,
                 dc_lambda: float | None = None, dc_floor: float | None = None, t0_ratio: float | None = None,
                 stop_ratio: float | None = None) -> None:
        super().__init__()
        flat = {"sampler": sampler, "steps": steps, "t0": t0, "dc": dc, "dc_weight": dc_weight,
                "dc_lambda": dc_lambda, "dc_floor": dc_floor, "t0_ratio": t0_ratio, "stop_ratio": stop_ratio}
        self.sampling = fold_flat_sampler_options(sampling, flat)
        for name, value in (("every_n_val", every_n_val), ("n_slices", n_slices), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"SamplerCallback: {name} must be >= 1, got {value}")
        unknown = [r for r in regimes or [] if r not in REGIMES]
        if unknown:
            raise ValueError(f"SamplerCallback: unknown regime(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(REGIMES)}")
        self.sampler = self.sampling.build().name  # a bad configuration fails now
        self.every_n_val, self.n_slices = every_n_val, n_slices
        self.regimes = list(regimes) if regimes else None
        self.seed, self.batch_size, self.log_images = seed, batch_size, log_images
        self.n_validations = 0  # validations seen (sanity check excluded); kept in checkpoints
        self.last_metrics: dict[str, float] = {}  # the metrics logged by the last run

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_val=self.every_n_val, sampler=self.sampler, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"n_validations": self.n_validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_validations = int(state_dict["n_validations"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.n_validations += 1
        if self.n_validations % self.every_n_val == 0:
            self.run(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------
    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Reconstruct the subset (this rank's batches), gather, log; returns the metrics (all ranks)."""
        dataset = _val_dataset(trainer)
        subset = validation_subset([item[-1] for item in dataset.items], self.regimes, self.n_slices)
        regimes = list(subset)
        batches = [(r, b) for r, idx in subset.items() for b in _same_volume_batches(dataset, idx,
                                                                                     self.batch_size)]
        device = pl_module.device
        sampler = self.sampling.build(pl_module.sde)
        score_fn = pl_module.score_fn()
        # one collection per regime: val/ssim/<regime>, val/psnr/<regime>, val/nmse/<regime>
        collections = {r: fastmri_collection(prefix="val/", postfix=f"/{r}").to(device) for r in regimes}
        firsts = {r: dataset.sample_shape(dataset.items[idx[0]][0]) for r, idx in subset.items()}
        height, width = max(h for h, _ in firsts.values()), max(w for _, w in firsts.values())
        panels = torch.zeros(len(regimes), 4, height, width, device=device)  # summed across ranks
        for regime, idx in batches[trainer.global_rank::trainer.world_size]:
            batch = default_collate([dataset[i] for i in idx])
            reconstruct = Reconstructor(score_fn, sampler, len(idx), device, data_scale=pl_module.data_scale)
            measured = Measurement.simulated(batch.y, batch.params, dataset.degradations[regime])
            recon = reconstruct(measured, batch.degraded, batch.slice.tolist(),
                                seed=self.seed).mean.to(device)
            ref = magnitude(batch.clean.to(device))
            for j in range(len(idx)):  # each slice is scored as a volume of one slice
                collections[regime].update(recon[j], ref[j])
            if idx[0] == subset[regime][0]:  # the regime's first slice goes into the image grid
                h, w = ref.shape[-2:]
                panels[regimes.index(regime), :, :h, :w] = torch.stack([
                    magnitude(batch.degraded[:1].to(device))[0, 0], recon[0, 0], ref[0, 0],
                    (recon[0, 0] - ref[0, 0]).abs()])

        out: dict[str, float] = {}
        for regime in regimes:  # the same order on every rank: compute() gathers the slices of all ranks
            with warnings.catch_warnings():  # a rank that reconstructed none of the regime's slices
                warnings.filterwarnings("ignore", "The ``compute`` method of metric", UserWarning)
                values = collections[regime].compute()
            for name, value in values.items():
                out[name] = float(value)
                # the value is already identical on every rank: "max" keeps it bit-exact through the sync
                pl_module.log(name, value, sync_dist=True, reduce_fx="max")
        self.last_metrics = out
        if self.log_images:
            self._log_grid(trainer, regimes, panels)
        return out

    def _log_grid(self, trainer: Trainer, regimes: list[str], panels: Tensor) -> None:
        panels = trainer.strategy.reduce(panels, reduce_op="sum")
        image_loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        # trainer.log_dir broadcasts from rank 0: every rank must call it
        directory = None if image_loggers else Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if not trainer.is_global_zero:
            return
        image = render_grid(regimes, panels.float().cpu().numpy())
        step = trainer.global_step
        for logger in image_loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/samples", images=[image], step=step, caption=[" | ".join(COLUMNS)])
            else:
                logger.experiment.add_image("val/samples", image, step, dataformats="HWC")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            _save_png(directory / f"step_{step:06d}.png", image)


class NiftiPredictionWriter(BasePredictionWriter):
    """Writes `lfmri predict`'s reconstructions as NIfTI volumes, one per input volume.

    For every volume of the data module's `predict_dataset` (a `PredictSliceDataset`), the slices returned by
    `ScoreModel.predict_step` are put back into a volume in the input's units and geometry by the function
    `lfmri reconstruct` uses (the dataset's `MeasuredVolume.to_volume`, i.e.
    `datamodules.measured.volume_from_slices`: resized slices restored to their native shape, times the
    volume's normalisation scale, a k-space file's in-plane axes back in its output order, slices back along
    the slice axis) and written with the affine and header reconstruct writes (the input NIfTI's; a k-space
    file's recorded or header-derived affine), float32, to `<output_dir>/<input file stem>_recon.nii.gz`
    (the stem: the name without .nii.gz / .nii / .h5 / .hdf5), plus `_std.nii.gz` (the per-pixel std of the
    posterior samples) when `write_std`. Files are written atomically; a volume with a slice missing from the
    predictions (e.g. `limit_predict_batches`) is not written and named in a warning. Multi-process
    prediction (DDP) is refused: run `lfmri predict` on one device.

    Args:
        output_dir: the folder for the volumes (created if needed).
        write_std: also write the std map.
    """

    def __init__(self, output_dir: str, write_std: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.write_std = Path(output_dir), bool(write_std)
        self.written: list[Path] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.world_size > 1:
            raise RuntimeError("NiftiPredictionWriter: run lfmri predict on one device (--trainer.devices=1)")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        dataset = getattr(trainer.datamodule, "predict_dataset", None)
        if dataset is None or not hasattr(dataset, "measured_volume"):
            raise TypeError("NiftiPredictionWriter needs LowFieldDataModule's predict_dataset")
        slices: dict[tuple[str, int], dict[str, Tensor]] = {}
        for out in predictions:
            for j, vid in enumerate(out["volume_id"]):
                slices[(vid, int(out["slice"][j]))] = {k: out[k][j, 0] for k in ("reconstruction", "std")}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for v, info in enumerate(dataset.volumes):
            vid, path = info.record.volume_id, info.record.path
            missing = [s for s in info.slices if (vid, s) not in slices]
            if missing:
                warnings.warn(f"NiftiPredictionWriter: {path}: {len(missing)} slice(s) were not predicted; "
                              "not written", stacklevel=2)
                continue
            measured_volume = dataset.measured_volume(v)  # the volume reconstruct would write, read once
            name = Path(path).name
            stem = next((name[: -len(ext)] for ext in (".nii.gz", ".nii", ".h5", ".hdf5")
                         if name.lower().endswith(ext)), name)
            kinds = ("reconstruction", "std") if self.write_std else ("reconstruction",)
            for kind in kinds:
                first = slices[(vid, info.slices[0])][kind]
                images = torch.zeros(max(info.slices) + 1, 1, *first.shape)  # [S, 1, H, W], normalised
                for s in info.slices:
                    images[s, 0] = slices[(vid, s)][kind].float().cpu()
                target = self.output_dir / f"{stem}_{'recon' if kind == 'reconstruction' else 'std'}.nii.gz"
                save_nifti_atomic(measured_volume.to_volume(images), measured_volume.nifti, target)
                self.written.append(target)


def fold_flat_sampler_options(sampling: SamplerOptions | None, flat: dict[str, Any]) -> SamplerOptions:
    """`sampling` with the former flat `SamplerCallback` keywords set in `flat` (field name -> value; None:
    not given) folded in, one FutureWarning line naming them; ValueError for a field given both ways."""
    given = {name: value for name, value in flat.items() if value is not None}
    sampling = SamplerOptions() if sampling is None else sampling
    if not given:
        return sampling
    warnings.warn("SamplerCallback: " + ", ".join(given) + " are deprecated keywords; set them in the "
                  "sampling block (" + ", ".join(f"sampling.{name}" for name in given) + ")", FutureWarning,
                  stacklevel=3)
    both = [name for name in given if getattr(sampling, name) is not None]
    if both:
        raise ValueError(f"SamplerCallback: {', '.join(both)} given both as sampling.* and as the deprecated "
                         "flat keywords; keep sampling.*")
    return dataclasses.replace(sampling, **given)


#: the image grid's columns
COLUMNS = ("degraded", "reconstruction", "reference", "|error|")


def validation_subset(item_regimes: Sequence[str], regimes: Sequence[str] | None, n_slices: int,
                      ) -> dict[str, list[int]]:
    """regime -> `n_slices` dataset indices of that regime, evenly spaced over its entries (all if fewer).

    `item_regimes[i]` is the regime of dataset entry i; `regimes` None takes the dataset's, in order of first
    appearance. A requested regime missing from the dataset raises ValueError.
    """
    available = list(dict.fromkeys(item_regimes))
    missing = [r for r in regimes or [] if r not in available]
    if missing:
        raise ValueError(f"SamplerCallback: regime(s) {', '.join(missing)} not in the validation dataset "
                         f"(it has {', '.join(available)}); add them to the data module's eval_regimes")
    subset = {}
    for regime in regimes or available:
        entries = [i for i, r in enumerate(item_regimes) if r == regime]
        picks = np.unique(np.round(np.linspace(0, len(entries) - 1, min(n_slices, len(entries)))).astype(int))
        subset[regime] = [entries[p] for p in picks]
    return subset


def _same_volume_batches(dataset: Any, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive runs of `indices` from one volume (one matrix size), at most `batch_size` long."""
    batches: list[list[int]] = []
    for i in indices:
        same_volume = bool(batches) and dataset.items[batches[-1][0]][0] == dataset.items[i][0]
        if same_volume and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def render_grid(regimes: Sequence[str], panels: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] figure of `panels` [R, 4, h, w] (rows = regimes, columns = `COLUMNS`).

    The three magnitude images of a row share one grey scale (0 to the reference's max); |error| has its own.
    """
    # optional / heavy: imported on use (matplotlib, also via lightning_modules.figures)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lightning_modules.figures import Panel, image_grid

    cells = []
    for r in range(len(regimes)):
        vmax = float(panels[r, 2].max()) or None
        cells.append([Panel(panels[r, c], "magma" if c == len(COLUMNS) - 1 else "gray", 0.0,
                            (float(panels[r, c].max()) or None) if c == len(COLUMNS) - 1 else vmax,
                            title if r == 0 else "")
                      for c, title in enumerate(COLUMNS)])
    fig = image_grid(cells, list(regimes), cell_size=(2.0, 2.1))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _save_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 [H, W, 3] image as PNG."""
    import matplotlib.image  # optional / heavy: imported on use

    matplotlib.image.imsave(path, image)


def _val_dataset(trainer: Trainer) -> Any:
    """The validation dataset: the data module's `val_dataset`, else the first val loader's dataset."""
    dataset = getattr(trainer.datamodule, "val_dataset", None)
    if dataset is None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
    if not all(hasattr(dataset, a) for a in ("items", "degradations")):
        raise TypeError("SamplerCallback needs the validation dataset of LowFieldDataModule (an "
                        "EvalSliceDataset: .items, .degradations), "
                        f"got {type(dataset).__name__}")
    return dataset
