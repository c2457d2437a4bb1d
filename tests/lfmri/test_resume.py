"""Resume after a crash: `lfmri fit --ckpt_path last` after SIGKILL continues exactly from the checkpoint.

The data position (mid-epoch), the degradations' random draws, the model's own draws, the optimiser, the
scheduler and the EMA are all restored, so the final weights equal those of an uninterrupted run bit for bit
(same CPU, same thread count). Checkpoints are written atomically (`lfmri.lightning_cli.AtomicCheckpointIO`),
so the killed run's `last.ckpt` always loads. SIGTERM (SLURM pre-emption) and SIGINT (Ctrl-C) stop a fit at
the end of the current step with a resumable `last.ckpt` written on the way out (`InterruptCheckpoint`).
"""

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LFMRI, REPO

from datamodules.resumable import resumable_loader
from lfmri.lightning_cli import AtomicCheckpointIO

EPOCH_BATCHES = 5  # limit_train_batches: a 16-step run crosses three epoch boundaries
MAX_STEPS = 16

#: a callback module the subprocesses import (PYTHONPATH): slows steps down so the kill lands mid-run, and
#: records what each step saw (data, degradations, the model RNG's state) without drawing from any RNG
HELPER = '''
import hashlib
import time

import torch
from lightning.pytorch import Callback


class Probe(Callback):
    def __init__(self, record: str, seconds: float = 0.0) -> None:
        self.record, self.seconds = record, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
        with open(f"{self.record}.{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {','.join(batch.volume_id)} "
                    f"{batch.slice.tolist()} {','.join(batch.regime)} "
                    f"{float(batch.degraded.double().sum())!r} {rng}\\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
'''


def tiny_config(root: Path, record: Path, seconds: float, every: int = 1, workers: int = 0) -> dict:
    """A tiny fit: 32^2 DDPM with nf 8, batch 2, no validation, a checkpoint every `every` step(s)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "limit_train_batches": EPOCH_BATCHES,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0,
                               "every_n_train_steps": every}},
                {"class_path": "probe.Probe", "init_args": {"record": str(record), "seconds": seconds}},
            ],
        },
        "model": {"class_path": "lightning_modules.module.ScoreModel", "init_args": {
            "net": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 4,
                    "image_size": 32, "dropout": 0.1},
            "loss": {"supervised_weight": 1.0}, "optim": {"lr": 1e-3, "warmup_steps": 4, "ema_decay": 0.9}}},
        "data": {"class_path": "datamodules.LowFieldDataModule", "init_args": {
            "slices": {"image_size": 32, "eval_per_volume": 1},
            "loader": {"batch_size": 2, "num_workers": workers},
            "source": {"class_path": "datamodules.sources.BundledSource",
                       "init_args": {"n_train": 2, "n_val": 1}}}},
    }


def start_fit(tmp: Path, name: str, seconds: float, *extra: str, every: int = 1, workers: int = 0,
              ) -> tuple[subprocess.Popen, Path]:
    root = tmp / name
    root.mkdir()
    config = root / "fit.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, root / "record", seconds, every, workers)))
    env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = [str(LFMRI), "fit", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True), root


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def records(root: Path) -> dict[int, str]:
    """step -> what that step saw (a re-run step overwrites the killed run's line)."""
    out = {}
    for line in (root / "record.0").read_text().splitlines():
        step, rest = line.split(" ", 1)
        out[int(step)] = rest
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run SIGKILLed mid-epoch then resumed with --ckpt_path last (in parallel)."""
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "probe.py").write_text(HELPER)
    full, full_root = start_fit(tmp, "full", 0.0)
    killed, root = start_fit(tmp, "killed", 0.3)
    last = root / "checkpoints" / "last.ckpt"
    seen_steps, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline and killed.poll() is None:
        if last.exists():
            step = load(last)["global_step"]  # every read must succeed: the file is replaced atomically
            seen_steps.append(step)
            if step >= EPOCH_BATCHES + 2:  # mid-way through the second epoch
                killed.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load(last)["global_step"]
    assert EPOCH_BATCHES < killed_at < MAX_STEPS and killed_at % EPOCH_BATCHES != 0
    finish(full)
    # resume in the killed run's own directory (its config, checkpoints and record file)
    env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(LFMRI), "fit", "--config", str(root / "fit.yaml"), "--ckpt_path", "last"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return {"full": full_root, "resumed": root, "killed_at": killed_at, "seen": seen_steps,
            "log": out.stdout + out.stderr, "tmp": tmp}


@pytest.mark.slow
@pytest.mark.e2e
def test_resumed_run_reaches_the_same_final_step(runs):
    final = load(runs["resumed"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    assert "not resumable" not in runs["log"]  # Lightning's warning for loaders that cannot resume mid-epoch
    assert f"Restored all states from the checkpoint at {runs['resumed']}" in runs["log"]


@pytest.mark.slow
@pytest.mark.e2e
def test_resumed_run_sees_the_same_batches_and_random_draws(runs):
    full, resumed = records(runs["full"]), records(runs["resumed"])
    assert sorted(full) == list(range(MAX_STEPS))
    assert resumed == full  # data order, degradation draws, model RNG state before every step


@pytest.mark.slow
@pytest.mark.e2e
def test_resumed_weights_equal_an_uninterrupted_run(runs):
    assert_same_training_state(runs["full"] / "checkpoints" / "last.ckpt",
                               runs["resumed"] / "checkpoints" / "last.ckpt")


def assert_same_training_state(path_a: Path, path_b: Path) -> None:
    """Weights, optimiser moments, scheduler and data position of two final checkpoints are identical."""
    a, b = load(path_a), load(path_b)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[k][name], opt_b[k][name]), (k, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    loader_state = a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": MAX_STEPS // EPOCH_BATCHES, "batches": MAX_STEPS % EPOCH_BATCHES}]


@pytest.fixture(scope="module", params=["SIGTERM", "SIGINT"])
def interrupted(request, runs):
    """A run (no periodic checkpoint before the last step) sent SIGTERM / SIGINT mid-epoch, then resumed with
    --ckpt_path last from the checkpoint written on the way out.

    SIGTERM goes to the whole process group, data loader workers included, as SLURM's pre-emption signals
    every process of the job; SIGINT to the main process only."""
    sig = getattr(signal, request.param)
    tmp = runs["tmp"]
    workers = 2 if sig == signal.SIGTERM else 0
    proc, root = start_fit(tmp, request.param.lower(), 0.3, every=MAX_STEPS, workers=workers)
    record, deadline = root / "record.0", time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if record.exists() and len(record.read_text().splitlines()) > EPOCH_BATCHES + 2:
            os.killpg(proc.pid, sig) if workers else proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    last = root / "checkpoints" / "last.ckpt"
    files = sorted(p.name for p in last.parent.iterdir()) if last.parent.exists() else []
    result = {"name": request.param, "signal": sig, "root": root, "rc": proc.returncode, "log": out,
              "last": last, "files": files}
    result["stopped_at"] = load(last)["global_step"] if last.exists() else None
    env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([str(LFMRI), "fit", "--config", str(root / "fit.yaml"), "--ckpt_path", "last"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    result["resume_rc"], result["resume_log"] = resumed.returncode, resumed.stdout + resumed.stderr
    return result


@pytest.mark.slow
@pytest.mark.e2e
def test_interrupt_saves_a_resumable_last_checkpoint_and_exits_non_zero(interrupted):
    run = interrupted
    assert run["rc"] == 128 + run["signal"], run["log"][-3000:]
    assert run["files"] == ["last.ckpt"], run["log"][-3000:]  # written on the way out, no temporary file left
    assert EPOCH_BATCHES < run["stopped_at"] < MAX_STEPS  # mid-run, no periodic save before the last step
    lines = [line for line in run["log"].splitlines() if line.startswith("lfmri fit: interrupted")]
    assert lines == [f"lfmri fit: interrupted by {run['name']} at global step {run['stopped_at']}; saved "
                     f"{run['last']} (resume with --ckpt_path last)"], run["log"][-3000:]
    assert "Traceback" not in run["log"]


@pytest.mark.slow
@pytest.mark.e2e
def test_interrupted_run_resumes_to_the_uninterrupted_result(interrupted, runs):
    run = interrupted
    assert run["resume_rc"] == 0, run["resume_log"][-3000:]
    assert f"Restored all states from the checkpoint at {run['last']}" in run["resume_log"]
    assert records(run["root"]) == records(runs["full"])  # the same batches and random draws at every step
    assert_same_training_state(runs["full"] / "checkpoints" / "last.ckpt", run["last"])
    a, b = load(runs["full"] / "checkpoints" / "last.ckpt"), load(run["last"])
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.e2e
def test_resumed_ema_equals_an_uninterrupted_run(runs):
    a = load(runs["full"] / "checkpoints" / "last.ckpt")
    b = load(runs["resumed"] / "checkpoints" / "last.ckpt")
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == MAX_STEPS
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)


def test_loader_state_skips_consumed_batches():
    """The loader alone: restoring {epoch, batches} yields exactly the rest of that epoch, same samples."""
    data = list(range(23))
    first = resumable_loader(data, batch_size=3, seed=5)
    first.sampler.set_epoch(2)
    it = iter(first)
    head = [next(it).tolist() for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 4}
    tail = [b.tolist() for b in it]
    again = resumable_loader(data, batch_size=3, seed=5)
    again.load_state_dict(state)
    again.sampler.set_epoch(2)  # what Lightning does next: the same epoch keeps the skip
    assert [b.tolist() for b in again] == tail
    assert sorted(sum(head + tail, [])) == data
    other = resumable_loader(data, batch_size=3, seed=5)
    other.load_state_dict({"epoch": 2, "batches": 8})  # saved on the epoch's last batch
    other.sampler.set_epoch(3)  # Lightning moves on to the next epoch: no skip
    assert len([b for b in other]) == 8


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        io.save_checkpoint({"global_step": 2, "x": Boom()}, path)
    assert load(path) == {"global_step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_atomic_checkpoint_replaces_a_last_link_and_keeps_the_checkpoint_it_pointed_at(tmp_path):
    """ModelCheckpoint(save_last="link") makes last.ckpt a link to a top-k checkpoint: a later save of
    last.ckpt (e.g. on SIGTERM) replaces the link, never that checkpoint."""
    io = AtomicCheckpointIO()
    best = tmp_path / "epoch=1.ckpt"
    io.save_checkpoint({"global_step": 1}, best)
    last = tmp_path / "last.ckpt"
    last.symlink_to(best.name)
    io.save_checkpoint({"global_step": 2}, last)
    assert not last.is_symlink() and load(last) == {"global_step": 2}
    assert load(best) == {"global_step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1.ckpt", "last.ckpt"]


def test_training_samples_do_not_depend_on_workers_or_the_global_rng():
    """Degradation draws are a function of (seed, epoch, index): 0 or 2 workers, any global RNG state."""
    from datamodules import BundledSource, LowFieldDataModule

    dm = LowFieldDataModule(BundledSource(n_train=2, n_val=1), slices={"image_size": 32},
                            loader={"batch_size": 3})
    dm.setup("fit")
    batches = []
    for workers, seed in ((0, 1), (2, 2)):
        torch.manual_seed(seed)
        dm.loader = dataclasses.replace(dm.loader, num_workers=workers)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        it = iter(loader)
        batches.append([next(it) for _ in range(2)])
    for a, b in zip(*batches, strict=True):
        assert a.regime == b.regime and torch.equal(a.slice, b.slice)
        assert torch.equal(a.degraded, b.degraded) and torch.equal(a.y, b.y)


def test_a_partly_read_validation_loader_keeps_its_workers_on_sigterm():
    """`limit_val_batches` leaves the validation iterator unfinished, its worker alive through training; a
    SIGTERM to the process group must not kill it (the fit then fails instead of saving last.ckpt)."""
    from datamodules import BundledSource, LowFieldDataModule

    dm = LowFieldDataModule(BundledSource(n_train=1, n_val=1),
                            slices={"image_size": 32, "eval_per_volume": 2},
                            loader={"batch_size": 2, "num_workers": 1, "eval_batch_size": 1},
                            eval_regimes=["noise"])
    dm.setup("fit")
    it = iter(dm.val_dataloader())
    next(it)  # a partial read, as limit_val_batches does
    (worker,) = it._workers
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    assert next(it).clean.shape[0] >= 1  # and it still delivers
    del it
