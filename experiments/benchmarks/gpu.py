"""All that one lent GPU session measures, in one run under a time budget: sampling speed of the 34.4M prior,
its training-step time, and a short training of it on the bundled data, scored beside BM3D.

    # the GPU session (one H100, 9 minutes in all; $OUT comes back: at most 8 files of <= 16 MiB)
    PYTHONUNBUFFERED=1 .venv/bin/python experiments/benchmarks/gpu.py --out $OUT --budget-s 540 \
        2>&1 | tee $OUT/gpu.log
    # the same code paths shrunk to a CPU run of well under a minute (the test runs this)
    .venv/bin/python experiments/benchmarks/gpu.py --out /tmp/gpu_tiny --tiny

Stages, in this order; each is timed (with `torch.cuda.synchronize` on a GPU, plain wall time on a CPU) and
guarded: one that fails records its error (type, message, the end of its traceback) and the next still runs.
`gpu.json` and `gpu.md` are rewritten after every stage, so a run cut off from outside still returns what it
finished.

1. `sampling_fp32`, `sampling_bf16`: the 34.4M DDPM (`DDPMConfig(image_size=256, num_channels=2)`, nf 128
   defaults; its parameter count is checked against 34,425,602), untrained, with score_sde's near-zero
   initialisation replaced (Xavier) as `sampling.py --random-34m` does, so the score is not ~0. A synthetic
   30-slice volume of 256x256 complex slices is degraded by `--regime` (default `noise`) and reconstructed
   by the registry's DEFAULT sampler (`build_sampler(None)`: whatever `DEFAULT_SAMPLER` names today) through
   `diffusion.inference.Reconstructor`, in fp32 and with bf16 autocast
   (`build_sampler(None, autocast=True)`): all slices in one batch (halved on out-of-memory), one untimed
   warm-up call, then `repeats` timed calls (the fastest counts). Figures: seconds per slice and per 30-slice
   volume, NFE per slice (`sampler.last_nfe`) beside the sampler's `expected_nfe`, batch size, peak memory.
2. `train_step_fp32`, `train_step_bf16`: one optimisation step of `lightning_modules.module.ScoreModel` with
   that network (DSM + the supervised loss of weight 1, dropout 0.1 as configs/model/ddpm_34m.yaml) on a
   batch of 8 synthetic 128x128 crops: `training_step` (under bf16 autocast or in fp32), backward, gradient
   clipping at 1.0 (the quickstart's), AdamW and the EMA update, as `lfmri fit` does; mean and median over
   the timed steps after the warm-up steps, samples per second, peak GPU memory.
3. `fit`: `lfmri fit --config configs/quickstart.yaml --config configs/model/ddpm_34m.yaml --config
   <overrides>` in this process (`lfmri.cli.main`): the 34.4M prior trained on the bundled data (random
   128x128 crops, batch 16, bf16-mixed, lr `--lr`) for `--fit-s` seconds (`trainer.max_time`), cut to what
   the budget leaves after the evaluation's reserve; no sampler callback, no W&B (a CSV logger), checkpoints
   in a temporary folder. Figures: optimiser steps, steps per second, the last logged losses.
4. `evaluate`: `lfmri evaluate` of that checkpoint with `experiments/benchmarks/quality.py`'s data block
   (test: Colin27; baselines tuned on one validation pseudo-subject), `--max-slices-per-volume 4`,
   `--reference-pc-steps 0`, `--baselines` (default: TV on the complex image, model-based TV and, where the
   `bm3d` extra is installed, BM3D on the complex image). The regimes run as parallel processes (one per
   regime, `--eval-jobs` at a time: BM3D's tuning is serial CPU work of seconds per slice), which share
   this process's CPU threads; their results.json figures are merged into gpu.json and their tables into
   gpu.md (results.md's benchmark format).

Files written into --out (created), never more than 8, each < 16 MiB (checked at the end); the script
writes at most these 5, so a `tee $OUT/gpu.log` fits:
- `gpu.json`: every figure (per stage: status ok | error | skipped, its seconds, its results or its error),
  the device's name, the torch / CUDA / cuDNN / Lightning / Python versions, the settings and the budget;
- `gpu.md`: a short human summary of the same figures;
- `fit_metrics.csv`: the training run's CSV log (losses per logged step);
- `eval_figure.png`: `lfmri evaluate`'s figure (each method's image and error map) of the last regime;
- `prior.ckpt`: the trained prior, EMA weights only (`lfmri.models.slim_checkpoint`), only if under 16 MiB
  (the 34.4M prior's weights alone are 131 MiB: skipped; the `--tiny` one is kept).
Exit code 0 when every stage ran ok, 1 when one failed or was skipped or the files break the limits.

Budget (`--budget-s`, default 540 s: the 9 minutes the session gives this script), counted from the start of
`main`. Each stage states the time it needs at least; one that no longer fits is skipped and recorded as
such. The fit gets min(`--fit-s`, time left - the evaluation's reserve `--eval-reserve-s` - 30 s for its
start-up and checkpoint), and the evaluation's processes are killed 5 s before the budget ends.

`--tiny`: the same stages and code paths shrunk for a CPU (the test): a DDPM of nf 16, ch_mult (1, 2, 2, 2),
one residual block, 32 px, no attention but the middle block's (at 1/8 of a native slice), instead of the
34.4M; 2 slices of 32x32; 2 timed training steps of 2 crops; a 2-step fit on 2 bundled training subjects;
an evaluation of 1 slice in 1 regime with baselines `none`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for folder in (REPO, Path(__file__).resolve().parent):  # lfmri without an install; sampling.py beside this
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

#: what comes back from the GPU session: at most this many files, each under this size
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
#: the files this script may write (the other slots are left for a log the command tees into the folder)
OUTPUT_FILES = ("gpu.json", "gpu.md", "fit_metrics.csv", "eval_figure.png", "prior.ckpt")
#: score_sde's 34.4M DDPM at 256 px, 2 channels (DESIGN.md, "Reference facts")
PARAMS_34M = 34_425_602
#: the regimes in `lfmri evaluate`'s order
ALL_REGIMES = ("noise", "noise_blur", "noise_blur_t2star", "noise_blur_t2star_b0")
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DDPM_34M = REPO / "configs" / "model" / "ddpm_34m.yaml"
QUALITY_DATA = REPO / "experiments" / "benchmarks" / "quality_data.yaml"
#: seconds the fit takes beyond its max_time (data set-up, sanity check, saving the checkpoint)
FIT_MARGIN_S = 30.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run (`full_plan` for the GPU session, `tiny_plan` for a CPU)."""

    net: dict[str, Any]  # DDPMConfig fields besides num_channels and dropout ({}: the 34.4M defaults)
    check_params: int | None  # the parameter count the network must have (None: not checked)
    slices: int  # stage 1: slices of the synthetic volume
    size: int  # their matrix (size x size)
    repeats: int  # timed reconstruction calls after the warm-up
    train_batch: int  # stage 2
    crop: int
    warmup_steps: int
    timed_steps: int
    fit_batch: int  # stage 3
    fit_crop: int
    fit_max_steps: int | None  # None: run for the time the budget gives (trainer.max_time)
    fit_workers: int
    fit_val_interval: int
    fit_val_batches: int
    fit_source: dict[str, Any] | None  # None: the quickstart's (every bundled subject)
    eval_slices: int  # stage 4
    eval_regimes: tuple[str, ...]
    needs: dict[str, float]  # seconds each stage needs at least (skipped when less is left)


def full_plan() -> Plan:
    return Plan(net={}, check_params=PARAMS_34M, slices=30, size=256, repeats=2, train_batch=8, crop=128,
                warmup_steps=3, timed_steps=10, fit_batch=16, fit_crop=128, fit_max_steps=None,
                fit_workers=max(1, min(8, (os.cpu_count() or 2) - 2)), fit_val_interval=500,
                fit_val_batches=4, fit_source=None, eval_slices=4, eval_regimes=ALL_REGIMES,
                needs={"sampling": 30.0, "train_step": 30.0, "fit": 60.0, "evaluate": 45.0})


def tiny_plan() -> Plan:
    # four levels as the 34.4M, so that the middle block's attention runs at 1/8 of a native Colin27 slice
    # (with ch_mult (1, 2) it would attend over 10^4 positions: a minute per slice on a CPU)
    return Plan(net=dict(nf=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), image_size=32,
                         num_groups=8),
                check_params=None, slices=2, size=32, repeats=1, train_batch=2, crop=32, warmup_steps=1,
                timed_steps=2, fit_batch=2, fit_crop=32, fit_max_steps=2, fit_workers=0, fit_val_interval=2,
                fit_val_batches=1, fit_source={"class_path": "datamodules.sources.BundledSource",
                                               "init_args": {"n_train": 2, "n_val": 1}},
                eval_slices=1, eval_regimes=("noise",),
                needs={"sampling": 1.0, "train_step": 1.0, "fit": 5.0, "evaluate": 5.0})


# ------------------------------------------------------------------------------------------------ helpers
class Budget:
    """Seconds left of `total_s` since this object was made."""

    def __init__(self, total_s: float) -> None:
        self.total_s, self.start = float(total_s), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds), synchronised with the GPU before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def net_config(plan: Plan, dropout: float):
    from diffusion.networks.ddpm import DDPMConfig

    return DDPMConfig(**{**plan.net, "num_channels": 2, "dropout": dropout})


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def check_param_count(plan: Plan, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"parameters": n}
    if plan.check_params is not None:
        out["parameters_expected"] = plan.check_params
        if n != plan.check_params:
            raise AssertionError(f"the network has {n:,} parameters, not {plan.check_params:,}")
    return out


def synthetic_measurement(n: int, size: int, regime: str, seed: int):
    """(clean float [n,2,size,size], degraded float [n,2,size,size], y complex [n,1,size,size], params) of
    random complex slices degraded by `regime` (its realised parameters, the known noise std included)."""
    from degradations import complex_to_channels, ifft2c, make_regime

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, dtype=torch.complex64, generator=g)
    y, params = make_regime(regime)(x, g)
    return complex_to_channels(x), complex_to_channels(ifft2c(y)), y, params


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------------- stage 1: sampling
def time_sampling(plan: Plan, device: torch.device, autocast: bool, regime: str,
                  seed: int) -> dict[str, Any]:
    """Seconds per slice / per 30-slice volume and NFE of the registry's default sampler on the untrained
    network (module docstring, stage 1)."""
    from sampling import replace_near_zero_init

    from degradations import Measurement, make_regime
    from diffusion.inference import Reconstructor
    from diffusion.networks.ddpm import DDPM
    from diffusion.sampling.samplers import DEFAULT_SAMPLER, build_sampler
    from diffusion.sampling.sde import VPSDE, get_score_fn

    torch.manual_seed(seed)
    net = DDPM(net_config(plan, dropout=0.0))
    replace_near_zero_init(net)
    result = check_param_count(plan, count_params(net))
    net = net.to(device).eval().requires_grad_(False)
    sde = VPSDE()
    score_fn = get_score_fn(net, sde)
    sampler = build_sampler(None, autocast=autocast, sde=sde)  # the registry's default, whichever it is
    _, x_init, y, params = synthetic_measurement(plan.slices, plan.size, regime, seed)
    measurement = Measurement.simulated(y, params, make_regime(regime))
    ids = list(range(plan.slices))
    batch = plan.slices
    while True:  # all slices in one batch, halved until it fits
        rec = Reconstructor(score_fn, sampler, batch, device)
        try:
            reset_peak(device)
            _, warmup_s = timed(device, rec, measurement, x_init, ids, seed=seed)
            break
        except Exception as err:
            if not is_oom(err) or batch == 1:
                raise
            batch = max(1, batch // 2)
    walls, nfe = [], None
    for _ in range(plan.repeats):
        out, wall = timed(device, rec, measurement, x_init, ids, seed=seed)
        walls.append(wall)
        nfe = sampler.last_nfe
        if out.nfe != nfe:
            raise AssertionError(f"Reconstruction.nfe {out.nfe} != sampler.last_nfe {nfe}")
        if not bool(torch.isfinite(out.mean).all()):
            raise FloatingPointError("the reconstruction is not finite")
    per_slice = min(walls) / plan.slices
    settings = {f"sampler_{k}": v for k, v in sampler.settings().items()}
    return {**result, "default_sampler": DEFAULT_SAMPLER, **settings, "autocast_bf16": autocast,
            "regime": regime, "slices": plan.slices, "matrix": [plan.size, plan.size], "batch_size": batch,
            "warmup_s": warmup_s, "wall_s": walls, "s_per_slice": per_slice,
            "s_per_30_slice_volume": 30 * per_slice, "nfe_per_slice": nfe,
            "expected_nfe": sampler.expected_nfe,
            "ms_per_nfe_per_slice": 1e3 * per_slice / nfe if nfe else None, "peak_gib": peak_gib(device)}


# --------------------------------------------------------------------------------- stage 2: training step
def train_step_timing(plan: Plan, device: torch.device, bf16: bool, seed: int) -> dict[str, Any]:
    """Mean / median time of one ScoreModel optimisation step (DSM + supervised loss, clipping, AdamW,
    EMA; module docstring, stage 2)."""
    import warnings

    from datamodules.samples import SliceSample
    from lightning_modules.module import LossConfig, OptimConfig, ScoreModel

    torch.manual_seed(seed)
    model = ScoreModel(net=net_config(plan, dropout=0.1),
                       loss=LossConfig(dsm_weight=1.0, supervised_weight=1.0, supervised_loss="l1"),
                       optim=OptimConfig(lr=2e-4, warmup_steps=0))
    result = check_param_count(plan, count_params(model.net))
    model = model.to(device).train()
    optim = model.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    n, c = plan.train_batch, plan.crop
    clean, degraded, y, params = synthetic_measurement(n, c, "noise", seed)
    batch = SliceSample(clean=clean.to(device), degraded=degraded.to(device), y=y.to(device),
                        regime=["noise"] * n, params={k: v.to(device) for k, v in params.items()},
                        volume_id=[f"synthetic{i}" for i in range(n)], slice=torch.arange(n, device=device),
                        scale=torch.ones(n, device=device))

    def step(i: int) -> float:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = model.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)  # the quickstart's gradient_clip_val
        opt.step()
        sched.step()
        model.ema.update(model.net.parameters())
        return float(loss.detach())

    times, losses = [], []
    with warnings.catch_warnings():  # `self.log` outside a Trainer warns at every call
        warnings.simplefilter("ignore")
        for i in range(plan.warmup_steps):
            step(i)
        reset_peak(device)
        for i in range(plan.timed_steps):
            loss, seconds = timed(device, step, i)
            times.append(seconds)
            losses.append(loss)
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"non-finite training loss {losses}")
    median = statistics.median(times)
    return {**result, "precision": "bf16 autocast" if bf16 else "fp32", "batch": n, "crop": [c, c],
            "losses": "dsm + supervised (l1)", "warmup_steps": plan.warmup_steps,
            "timed_steps": plan.timed_steps, "step_ms_mean": 1e3 * statistics.fmean(times),
            "step_ms_median": 1e3 * median, "samples_per_s": n / median, "last_loss": losses[-1],
            "peak_gib": peak_gib(device)}


# ------------------------------------------------------------------------------------------- stage 3: fit
def fit_overrides(plan: Plan, work: Path, device: torch.device, max_time_s: float | None, lr: float,
                  precision: str) -> dict[str, Any]:
    """The run config stacked last on quickstart.yaml + ddpm_34m.yaml: trainer, callbacks and data sizes."""
    root = work / "fit"
    trainer: dict[str, Any] = {
        "accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1, "precision": precision,
        "max_steps": plan.fit_max_steps if plan.fit_max_steps is not None else 10**9,
        "max_time": None, "val_check_interval": plan.fit_val_interval, "check_val_every_n_epoch": None,
        "limit_val_batches": plan.fit_val_batches, "default_root_dir": str(root),
        "enable_progress_bar": False, "log_every_n_steps": 10 if plan.fit_max_steps is None else 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "logs", "version": 0}},
        # no sampler callback, no W&B, no prediction writer: the checkpoint (saved when the run ends) and the
        # guard that stops a run whose loss is not finite
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0,
                           "every_n_train_steps": 10**9}},
            {"class_path": "lightning_modules.callbacks.FiniteLossGuard"},
        ],
    }
    if max_time_s is not None:
        s = max(1, int(max_time_s))
        trainer["max_time"] = f"00:{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"  # DD:HH:MM:SS
    warmup = 100 if plan.fit_max_steps is None else 1
    model: dict[str, Any] = {"init_args": {"optim": {"lr": lr, "warmup_steps": warmup}}}
    if plan.net:
        model["init_args"]["net"] = {**plan.net, "ch_mult": list(plan.net["ch_mult"]),
                                     "attn_resolutions": list(plan.net["attn_resolutions"])}
    data: dict[str, Any] = {"init_args": {"slices": {"crop_size": plan.fit_crop},
                                          "loader": {"batch_size": plan.fit_batch,
                                                     "num_workers": plan.fit_workers,
                                                     "pin_memory": device.type == "cuda"}}}
    if plan.fit_source is not None:
        data["init_args"]["source"] = plan.fit_source
        data["init_args"]["slices"]["eval_per_volume"] = 1
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


LOSSES = ("train/loss", "train/dsm", "train/supervised", "val/loss", "val/dsm", "val/supervised")


def last_logged(metrics_csv: Path) -> dict[str, Any]:
    """The last logged value of each loss in a CSVLogger's metrics.csv (and the step it was logged at)."""
    out: dict[str, Any] = {}
    if not metrics_csv.is_file():
        return out
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            for key in LOSSES:
                if row.get(key):
                    out[key] = float(row[key])
                    out[f"{key} step"] = int(row["step"])
    return out


def run_fit(plan: Plan, work: Path, out: Path, device: torch.device, max_time_s: float | None, lr: float,
            precision: str) -> dict[str, Any]:
    """`lfmri fit` in this process (module docstring, stage 3); its checkpoint: work/fit/checkpoints."""
    import yaml

    from lfmri.cli import main as lfmri_main

    overrides = fit_overrides(plan, work, device, max_time_s, lr, precision)
    cfg = work / "gpu_fit.yaml"
    cfg.write_text(yaml.safe_dump(overrides, sort_keys=False))
    argv = ["fit", "--config", str(QUICKSTART), "--config", str(DDPM_34M), "--config", str(cfg)]
    start = time.perf_counter()
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds arguments too
    try:
        rc = lfmri_main(argv)
    finally:
        sys.argv = saved_argv
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"lfmri fit exited with {rc}")
    ckpt_path = work / "fit" / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"lfmri fit wrote no {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    steps = int(ckpt.get("global_step", 0))
    state_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items()
                   if k.startswith("net.") and not k.endswith("sigmas"))
    del ckpt
    metrics = work / "fit" / "logs" / "version_0" / "metrics.csv"
    if metrics.is_file() and metrics.stat().st_size < MAX_FILE_BYTES:
        shutil.copyfile(metrics, out / "fit_metrics.csv")
    result: dict[str, Any] = {
        "command": "lfmri " + " ".join(argv), "overrides": overrides, "network_parameters": n_params,
        "optimizer_steps": steps, "wall_s": wall, "max_time_s": max_time_s,
        "steps_per_s": steps / wall if wall > 0 else None, "samples_seen": steps * plan.fit_batch,
        **last_logged(metrics)}
    # the prior itself comes back only if it is small (EMA weights only, as the shipped reference prior)
    if state_bytes + 2**20 < MAX_FILE_BYTES:
        from lfmri.models import slim_checkpoint

        dest = out / "prior.ckpt"
        provenance = {"made_by": "experiments/benchmarks/gpu.py", "steps": steps, "wall_s": wall}
        torch.save(slim_checkpoint(ckpt_path, provenance), dest)
        if dest.stat().st_size >= MAX_FILE_BYTES:
            dest.unlink()
            result["prior_ckpt"] = "skipped: 16 MiB or more"
        else:
            result["prior_ckpt"] = dest.name
    else:
        result["prior_ckpt"] = f"skipped: the weights alone are {state_bytes / 2**20:.0f} MiB (limit 16 MiB)"
    return result


# -------------------------------------------------------------------------------------- stage 4: evaluate
def default_baselines() -> str:
    """The fast baselines, and BM3D on the complex image where its optional extra is installed."""
    from lfmri.baselines import BASELINES

    names = ["tv_complex", "tv_model"] + (["bm3d_complex"] if BASELINES["bm3d_complex"].available else [])
    return ",".join(names)


def eval_data_config(plan: Plan, work: Path) -> Path:
    """quality.py's data block (test: Colin27; one validation pseudo-subject); tiny: 2 training subjects."""
    if plan.fit_source is None:
        return QUALITY_DATA
    import yaml

    block = yaml.safe_load(QUALITY_DATA.read_text())
    block["init_args"]["source"]["init_args"]["n_train"] = 2
    path = work / "eval_data.yaml"
    path.write_text(yaml.safe_dump(block, sort_keys=False))
    return path


class StageError(RuntimeError):
    """A stage's failure that still carries partial results (recorded beside the error)."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


def run_evaluate(plan: Plan, work: Path, out: Path, ckpt: Path, device: torch.device, baselines: str,
                 jobs: int, deadline_s: float) -> dict[str, Any]:
    """`lfmri evaluate` per regime in parallel processes, merged (module docstring, stage 4)."""
    from lfmri.results import EvaluationResult, SliceRow, format_benchmark, read_csv, spread_note

    config = eval_data_config(plan, work)
    regimes = list(plan.eval_regimes)
    jobs = max(1, min(jobs, len(regimes)))
    threads = max(1, torch.get_num_threads() // jobs)  # this process's threads shared out (16: 4 each)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = "import sys; from lfmri.cli import main; sys.exit(main(sys.argv[1:]))"

    def command(regime: str) -> list[str]:
        return ["evaluate", "--ckpt", str(ckpt), "--config", str(config), "--regimes", regime,
                "--baselines", baselines, "--max-slices-per-volume", str(plan.eval_slices),
                "--reference-pc-steps", "0", "--device", device.type, "--out", str(work / f"eval_{regime}")]

    pending, running, finished = list(regimes), {}, {}
    start = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                regime = pending.pop(0)
                log = open(work / f"eval_{regime}.log", "w")  # noqa: SIM115  (closed when it ends)
                proc = subprocess.Popen([sys.executable, "-c", code, *command(regime)], env=env, cwd=REPO,
                                        stdout=log, stderr=subprocess.STDOUT)
                running[regime] = (proc, log)
            for regime, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    finished[regime] = proc.returncode
                    del running[regime]
            if time.monotonic() - start > deadline_s:
                raise TimeoutError(f"lfmri evaluate still running after {deadline_s:.0f} s (the budget's "
                                   f"end): {', '.join(running) or 'none'} running, "
                                   f"{', '.join(pending) or 'none'} not started")
            time.sleep(0.2)
    finally:
        for proc, log in running.values():
            proc.kill()
            proc.wait()
            log.close()
    wall = time.monotonic() - start
    failed = {r: rc for r, rc in finished.items() if rc != 0}
    rows, slice_rows, summary, tuned, settings = [], [], {}, {}, {}
    for regime in regimes:
        folder = work / f"eval_{regime}"
        if regime in failed or not (folder / "results.json").is_file():
            continue
        payload = json.loads((folder / "results.json").read_text())
        settings = payload["settings"]
        tuned.update(payload["tuned_baselines"])
        for method, per in payload["summary"].items():
            summary.setdefault(method, {}).update(per)
        rows += read_csv(folder / "results.csv")
        with open(folder / "slices.csv", newline="") as fh:
            slice_rows += [SliceRow(r["volume_id"], r["regime"], r["method"], int(r["slice"]),
                                    float(r["ssim"]), float(r["psnr"]), float(r["nmse"]))
                           for r in csv.DictReader(fh)]
    figures = [work / f"eval_{r}" / "figure.png" for r in reversed(regimes)]
    figure = next((f for f in figures if f.is_file() and f.stat().st_size < MAX_FILE_BYTES), None)
    if figure is not None:
        shutil.copyfile(figure, out / "eval_figure.png")
    merged = EvaluationResult(rows=rows, slice_rows=slice_rows)
    result = {"command": "lfmri " + " ".join(command("REGIME")), "regimes": regimes, "parallel_jobs": jobs,
              "omp_threads_each": threads, "baselines": baselines, "wall_s": wall, "settings": settings,
              "spread": spread_note(merged) if rows else None, "summary": summary, "tuned_baselines": tuned,
              "table_md": format_benchmark(merged) if rows else None,
              "figure": f"eval_figure.png ({figure.parent.name[len('eval_'):]})" if figure else None}
    if failed:
        tails = {r: (work / f"eval_{r}.log").read_text()[-2000:] for r in failed}
        last = {r: next((line for line in reversed(t.splitlines()) if line.strip()), "")
                for r, t in tails.items()}
        why = "; ".join(f"{r} (exit {c}: {last[r][-200:]})" for r, c in failed.items())
        raise StageError(f"lfmri evaluate failed for {why}", {**result, "failed_logs": tails})
    return result


# ---------------------------------------------------------------------------------------------- report
class Report:
    """gpu.json / gpu.md, rewritten after every stage."""

    def __init__(self, out: Path, budget: Budget, header: dict[str, Any]) -> None:
        self.out, self.budget = out, budget
        self.data: dict[str, Any] = {**header, "stages": {}}

    def skip(self, name: str, reason: str) -> None:
        print(f"[gpu.py] {name}: skipped ({reason})", flush=True)
        self.data["stages"][name] = {"status": "skipped", "reason": reason}
        self.write()

    def run(self, name: str, need_s: float, fn: Callable[[], dict[str, Any]], device: torch.device) -> bool:
        """Run one stage (guarded, timed); skipped when less than `need_s` seconds are left. True if ok."""
        left = self.budget.left()
        if left < need_s:
            self.skip(name, f"budget: {left:.0f} s left, the stage needs {need_s:.0f} s")
            return False
        print(f"[gpu.py] {name}: start ({left:.0f} s of the budget left)", flush=True)
        start = time.perf_counter()
        try:
            entry = {"status": "ok", **fn()}
        except (Exception, SystemExit) as err:  # (jsonargparse exits on a bad option)
            entry = {"status": "error", "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()[-3000:], **getattr(err, "partial", {})}
        with contextlib.suppress(Exception):
            sync(device)
        entry["stage_s"] = time.perf_counter() - start
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        print(f"[gpu.py] {name}: {entry['status']} in {entry['stage_s']:.1f} s"
              + (f" ({entry['error']})" if entry["status"] == "error" else ""), flush=True)
        self.data["stages"][name] = entry
        self.write()
        return entry["status"] == "ok"

    def write(self) -> None:
        self.data["elapsed_s"] = self.budget.elapsed()
        for name, text in (("gpu.json", json.dumps(self.data, indent=1, default=str)),
                           ("gpu.md", markdown(self.data))):
            tmp = self.out / f"{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(data: dict[str, Any]) -> str:
    """The short human summary of gpu.json."""
    s = data["stages"]
    lines = [f"# GPU session: {data['device_name']}", "",
             f"torch {data['torch']}, CUDA {data['cuda']}, lightning {data['lightning']}; mode "
             f"{'tiny' if data['tiny'] else 'full'}; budget {data['budget_s']:.0f} s, used "
             f"{data.get('elapsed_s', 0):.0f} s.", "", "| stage | status | s |", "|---|---|---|"]
    for name, e in s.items():
        why = (e.get("error") or e.get("reason") or "").replace("|", "/").replace("\n", " ")
        status = f"{e['status']}: {why[:160]}" if why else e["status"]
        lines.append(f"| {name} | {status} | {_fmt(e.get('stage_s'))} |")
    samp = [e for n, e in s.items() if n.startswith("sampling") and e["status"] == "ok"]
    if samp:
        e0 = samp[0]
        lines += ["", f"## Default sampler ({e0['default_sampler']}), untrained network "
                      f"({e0['parameters']:,} parameters), {e0['slices']} slices of {e0['matrix'][0]}², "
                      f"regime {e0['regime']}", "",
                  f"fp32 is torch's default: TF32 in cuDNN's convolutions {data['settings']['tf32_cudnn']}, "
                  f"in matrix products {data['settings']['tf32_matmul']}.", "",
                  "| precision | batch | NFE / slice (expected) | s / slice | s / 30-slice volume "
                  "| ms / NFE / slice | peak GiB |", "|---|---|---|---|---|---|---|"]
        for e in samp:
            lines.append(f"| {'bf16 autocast' if e['autocast_bf16'] else 'fp32'} | {e['batch_size']} | "
                         f"{e['nfe_per_slice']} ({e['expected_nfe']}) | {_fmt(e['s_per_slice'])} | "
                         f"{_fmt(e['s_per_30_slice_volume'])} | {_fmt(e['ms_per_nfe_per_slice'])} | "
                         f"{_fmt(e['peak_gib'])} |")
    steps = [e for n, e in s.items() if n.startswith("train_step") and e["status"] == "ok"]
    if steps:
        lines += ["", "## Training step (ScoreModel: DSM + supervised, clipping, AdamW, EMA), batch "
                      f"{steps[0]['batch']} of {steps[0]['crop'][0]}² crops", "",
                  "| precision | ms / step (median) | ms / step (mean) | samples / s | peak GiB |",
                  "|---|---|---|---|---|"]
        for e in steps:
            lines.append(f"| {e['precision']} | {_fmt(e['step_ms_median'])} | {_fmt(e['step_ms_mean'])} | "
                         f"{_fmt(e['samples_per_s'])} | {_fmt(e['peak_gib'])} |")
    fit = s.get("fit", {})
    if fit.get("status") == "ok":
        lines += ["", "## Short training on the bundled data", "",
                  f"{fit['network_parameters']:,} parameters, {fit['optimizer_steps']} steps in "
                  f"{fit['wall_s']:.0f} s ({_fmt(fit['steps_per_s'])} steps/s, max_time "
                  f"{_fmt(fit['max_time_s'])} s); last train/loss {_fmt(fit.get('train/loss'))} (step "
                  f"{fit.get('train/loss step', '–')}), val/loss {_fmt(fit.get('val/loss'))} (step "
                  f"{fit.get('val/loss step', '–')}); checkpoint: {fit['prior_ckpt']}."]
    ev = s.get("evaluate", {})
    if ev.get("table_md"):
        lines += ["", f"## Colin27 benchmark of that prior (lfmri evaluate; baselines {ev['baselines']}; "
                      f"{ev['spread']})", "", ev["table_md"].rstrip()]
    return "\n".join(lines) + "\n"


def check_outputs(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(the files in `out` with their sizes, the limits they break: more than MAX_FILES files, or one of
    MAX_FILE_BYTES or more)."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    problems = [f"{len(files)} files, at most {MAX_FILES} come back"] if len(files) > MAX_FILES else []
    problems += [f"{p.name} is 16 MiB or more" for p in files if p.stat().st_size >= MAX_FILE_BYTES]
    return [{"name": str(p.relative_to(out)), "bytes": p.stat().st_size} for p in files], problems


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for gpu.json, gpu.md, ... (created)")
    p.add_argument("--tiny", action="store_true", help="everything shrunk for a CPU run (the test)")
    p.add_argument("--budget-s", type=float, default=540.0, help="global time budget (seconds)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--regime", default="noise", help="degradation of stage 1's synthetic measurement")
    p.add_argument("--fit-s", type=float, default=300.0, help="training time at most (seconds; not --tiny)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="the fit's learning rate (the 34.4M: below the quickstart's 1e-3)")
    p.add_argument("--precision", default="bf16-mixed", help="the fit's trainer.precision")
    p.add_argument("--eval-reserve-s", type=float, default=None,
                   help="seconds kept for the evaluation when sizing the fit (default: 150 with BM3D, "
                        "else 90; --tiny 30)")
    p.add_argument("--baselines", default=None,
                   help="lfmri evaluate --baselines (default: tv_complex,tv_model and bm3d_complex where "
                        "installed; --tiny: none)")
    p.add_argument("--eval-jobs", type=int, default=4, help="regimes evaluated in parallel processes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    budget = Budget(args.budget_s)
    plan = tiny_plan() if args.tiny else full_plan()
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a rerun into the same folder: no file of an earlier run passes for this one's
        (out / name).unlink(missing_ok=True)
    import lightning

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    try:
        baselines = args.baselines if args.baselines is not None else \
            "none" if args.tiny else default_baselines()
    except Exception:  # lfmri.baselines does not import: the evaluate stage will say why
        baselines = "tv_complex"
    reserve = args.eval_reserve_s if args.eval_reserve_s is not None else \
        30.0 if args.tiny else 150.0 if "bm3d" in baselines else 90.0
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(plan=dataclasses.asdict(plan), eval_reserve_s=reserve, baselines=baselines,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    header = {"device_name": name, "device": str(device), "torch": torch.__version__,
              "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
              "lightning": lightning.__version__, "python": platform.python_version(), "tiny": args.tiny,
              "budget_s": args.budget_s, "argv": sys.argv if argv is None else ["gpu.py", *argv],
              "settings": settings}
    report = Report(out, budget, header)
    report.write()
    work = Path(tempfile.mkdtemp(prefix="lfmri_gpu_"))
    try:
        for bf16 in (False, True):
            report.run(f"sampling_{'bf16' if bf16 else 'fp32'}", plan.needs["sampling"],
                       lambda bf16=bf16: time_sampling(plan, device, bf16, args.regime, args.seed), device)
        for bf16 in (False, True):
            report.run(f"train_step_{'bf16' if bf16 else 'fp32'}", plan.needs["train_step"],
                       lambda bf16=bf16: train_step_timing(plan, device, bf16, args.seed), device)
        fit_s = None if plan.fit_max_steps is not None else \
            min(args.fit_s, budget.left() - reserve - FIT_MARGIN_S)
        if fit_s is not None and fit_s < plan.needs["fit"]:
            report.skip("fit", f"budget: {budget.left():.0f} s left, {reserve:.0f} s kept for the "
                               f"evaluation: {fit_s:.0f} s to train")
            fit_ok = False
        else:
            fit_ok = report.run("fit", plan.needs["fit"] + reserve,
                                lambda: run_fit(plan, work, out, device, fit_s, args.lr, args.precision),
                                device)
        if fit_ok:
            ckpt = work / "fit" / "checkpoints" / "last.ckpt"
            report.run("evaluate", plan.needs["evaluate"],
                       lambda: run_evaluate(plan, work, out, ckpt, device, baselines, args.eval_jobs,
                                            max(1.0, budget.left() - 5.0)), device)
        else:
            report.skip("evaluate", "no trained checkpoint: the fit did not run through")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.data["files"], problems = check_outputs(out)
    if problems:
        report.data["file_problems"] = problems
    report.write()
    print(markdown(report.data), flush=True)
    ok = all(e["status"] == "ok" for e in report.data["stages"].values()) and not problems
    print(f"[gpu.py] {'every stage ok' if ok else 'some stages failed or were skipped'}"
          f"{'; ' + '; '.join(problems) if problems else ''}; {budget.elapsed():.0f} s; files: "
          f"{', '.join(f['name'] for f in report.data['files'])}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
