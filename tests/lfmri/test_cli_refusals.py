"""`lfmri fit|validate|test|predict` refuse bad input in one line and stop cleanly on a signal (issue 22):

- a config that does not parse (YAML syntax, a Python tag, a `class_path` of the wrong kind in any block, a
  wrongly typed value): one line naming the file and the key, exit 2, not jsonargparse's usage dump;
- an output folder that cannot be written (default_root_dir, a ModelCheckpoint's dirpath, a logger's save_dir,
  the prediction writer's output_dir): one line, exit 2, before the model or the data are touched;
- SIGINT / SIGTERM in any phase (imports, set-up, a second Ctrl-C in training): one line, 130 / 143, no
  traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import LFMRI, QUICKSTART, TINY_QUICKSTART_ARGS

from lfmri.cli import main


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when given args beside a command line of its own (pytest's)."""
    monkeypatch.setattr(sys, "argv", ["lfmri"])


def _one_line_error(capsys: pytest.CaptureFixture, command: str = "fit") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lfmri {command}: error: "), err[-3000:]
    assert "usage" not in err.lower() and "Traceback" not in err
    return err.strip()


#: name -> (YAML of a second --config file or None, command-line overrides, what the line must contain)
REFUSED = {
    "yaml syntax": ("trainer:\n  max_steps: [1\n", [],
                    ["bad.yaml: line 3, column 1:", "expected ',' or ']'"]),
    "model os.system": ("model:\n  class_path: os.system\n", [],
                        ["bad.yaml: model: class_path 'os.system' is not a LightningModule subclass"]),
    "data subprocess.run": ("data:\n  class_path: subprocess.run\n", [],
                            ["bad.yaml: data: class_path 'subprocess.run' is not a LightningDataModule"]),
    "logger subprocess.run": ("trainer:\n  logger:\n    class_path: subprocess.run\n", [],
                              ["bad.yaml: trainer.logger: class_path 'subprocess.run' is not a Logger"]),
    "callback os.system": ("trainer:\n  callbacks:\n    - class_path: os.system\n", [],
                           ["bad.yaml: trainer.callbacks: class_path 'os.system' is not a Callback"]),
    "python tag": ('model: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n', [],
                   ["bad.yaml: line 1, column 8:", "python/object/apply:os.system"]),
    "interpolation": ("trainer:\n  default_root_dir: ${nope.x}\n", [],
                      ["config interpolation: Interpolation key 'nope.x' not found"]),
    "--trainer.logger=os.system": (None, ["--trainer.logger=os.system"],
                                   ["trainer.logger: class_path 'os.system' is not a Logger subclass"]),
    "--data batch_size=abc": (None, ["--data.init_args.loader.batch_size=abc"],
                              ["data.init_args.loader.batch_size: expected int, got abc"]),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_config_that_does_not_parse_is_one_line(name: str, tmp_path: Path, capsys) -> None:
    text, overrides, expected = REFUSED[name]
    argv = ["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run"]
    if text is not None:
        (tmp_path / "bad.yaml").write_text(text.replace("{tmp}", str(tmp_path)))
        argv += ["--config", str(tmp_path / "bad.yaml")]
    assert main(argv + overrides) == 2
    line = _one_line_error(capsys)
    for part in expected:
        assert part in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.yaml"] if text else [])  # nothing ran


def test_the_console_shows_only_the_line(tmp_path: Path) -> None:
    """The whole stderr of the `lfmri` process, not just what main() prints."""
    done = subprocess.run([str(LFMRI), "fit", "--config", str(QUICKSTART), "--model.init_args.optim.lr=fast"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stdout == ""
    expected = "lfmri fit: error: model.init_args.optim.lr: expected float, got fast\n"
    assert done.stderr == expected, done.stderr


@pytest.mark.parametrize("override,line", [
    ("--model.init_args.optim.lr=-1", "lfmri fit: error: optim.lr must be a number > 0, got -1.0"),
    ("--model.init_args.pretrained.path=absent.pth",
     "lfmri fit: error: absent.pth: no such checkpoint file")])
def test_a_refused_option_is_the_only_line_before_training(override: str, line: str, tmp_path: Path) -> None:
    """An option refused by the model's constructor: the error is the console's only line (Lightning's seed
    line comes with the trainer, after it); a `pretrained` file that is not there: refused before the model
    summary is printed."""
    done = subprocess.run([str(LFMRI), "fit", "--config", str(QUICKSTART), override,
                           "--model.init_args.net.nf=8", "--model.init_args.net.num_groups=4",
                           f"--trainer.default_root_dir={tmp_path}/r"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == line and "Total params" not in done.stderr, lines
    if "lr=" in override:  # refused while the model is built: before the seed line
        assert lines == [line]


def test_help_and_print_config_still_exit_0(capsys) -> None:
    for extra in (["--help"], ["--config", str(QUICKSTART), "--print_config"]):
        with pytest.raises(SystemExit) as stop:
            main(["fit", *extra])
        assert stop.value.code in (0, None)
        assert "seed_everything" in capsys.readouterr().out


def _fit_argv(tmp_path: Path, *overrides: str) -> list[str]:
    """A fit of the quickstart config whose data folder does not exist: the data module refuses it when it is
    built, so a refusal that names something else came before the data module."""
    return ["fit", "--config", str(QUICKSTART), f"--data.init_args.source={tmp_path}/no-data", *overrides]


@pytest.mark.parametrize("where", ["default_root_dir", "dirpath", "save_dir"])
def test_fit_refuses_an_output_folder_under_a_file(where: str, tmp_path: Path, capsys) -> None:
    """A path through a regular file cannot be created, by root too."""
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "out"
    checkpoint = tmp_path / "checkpoint.yaml"
    checkpoint.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(bad)}}]}}))
    overrides = {"default_root_dir": [f"--trainer.default_root_dir={bad}"],
                 "dirpath": [f"--trainer.default_root_dir={tmp_path}/run", "--config", str(checkpoint)],
                 "save_dir": [f"--trainer.default_root_dir={tmp_path}/run",
                              f"--trainer.logger.init_args.save_dir={bad}"]}
    assert main(_fit_argv(tmp_path, *overrides[where])) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    named = {"default_root_dir": "trainer.default_root_dir",
             "dirpath": "trainer.callbacks ModelCheckpoint dirpath",
             "save_dir": "trainer.logger CSVLogger save_dir"}[where]
    assert last == f"lfmri fit: error: {named} {bad}: {tmp_path / 'afile'} is not a folder", last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "checkpoint.yaml"]


def test_fit_refuses_a_read_only_default_root_dir(unwritable: Path, tmp_path: Path, capsys) -> None:
    assert main(_fit_argv(tmp_path, f"--trainer.default_root_dir={unwritable}/run")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lfmri fit: error: trainer.default_root_dir {unwritable}/run: cannot write in "
                           f"{unwritable} (to create {unwritable}/run): "), last


def test_predict_refuses_an_output_dir_under_a_file(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "predict.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"logger": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning_modules.callbacks.NiftiPredictionWriter",
                                   "init_args": {"output_dir": str(tmp_path / "afile" / "pred")}}]},
        "model": {"class_path": "lightning_modules.module.ScoreModel"},
        "data": {"class_path": "datamodules.LowFieldDataModule",
                 "init_args": {"predict": {"path": str(tmp_path / "missing.nii.gz")}}}}))
    assert main(["predict", "--config", str(config), "--ckpt_path", str(tiny_checkpoint)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"lfmri predict: error: trainer.callbacks NiftiPredictionWriter output_dir "
                    f"{tmp_path}/afile/pred: {tmp_path}/afile is not a folder"), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "predict.yaml"]


# -- signals -------------------------------------------------------------------------------------------------

STOPPED = "stopped at once, nothing saved on the way out"

#: callbacks the signal tests add to the fit, to hold it in a phase: set-up, or a training step
SLOW_CALLBACKS = '''
import sys, time
from lightning.pytorch import Callback

class SlowSetup(Callback):
    def setup(self, trainer, pl_module, stage):
        print("IN SET-UP", file=sys.stderr, flush=True)
        time.sleep(120)

class SlowStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        print("IN A STEP", file=sys.stderr, flush=True)
        time.sleep(120)
'''


def _start_fit(tmp_path: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    (tmp_path / "slow_callbacks.py").write_text(SLOW_CALLBACKS)
    argv = [str(LFMRI), "fit", "--config", str(QUICKSTART), *TINY_QUICKSTART_ARGS,
            f"--trainer.default_root_dir={tmp_path}/run", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=new_session)


def _wait_for(proc: subprocess.Popen, marker: str) -> str:
    """The process's stderr up to the line starting with `marker`."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(marker):
            return "".join(seen)
    raise AssertionError(f"the fit ended before {marker!r}: {''.join(seen)[-3000:]}")


def _finish(proc: subprocess.Popen, before: str = "", timeout: float = 120) -> str:
    _, rest = proc.communicate(timeout=timeout)
    return before + rest


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler of its own for `signum` (Linux: /proc/PID/status, SigCgt)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool(int(fields["SigCgt"], 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_imports_is_one_line(name: str, tmp_path: Path) -> None:
    """Sent as soon as `lfmri` handles SIGTERM (its first act; Lightning and torch take seconds to import)."""
    signum = getattr(signal, name)
    proc = _start_fit(tmp_path)
    deadline = time.monotonic() + 10
    while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err == f"lfmri fit: interrupted by {name}; {STOPPED}\n", err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_set_up_is_one_line(name: str, tmp_path: Path) -> None:
    """Inside `trainer.fit`, before training: Lightning used to print its KeyboardInterrupt shutdown and exit
    with 1."""
    signum = getattr(signal, name)
    proc = _start_fit(tmp_path, "--trainer.callbacks+=slow_callbacks.SlowSetup")
    before = _wait_for(proc, "IN SET-UP")
    proc.send_signal(signum)
    err = _finish(proc, before)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.splitlines()[-1] == f"lfmri fit: interrupted by {name}; {STOPPED}"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_ctrl_c_in_training_stops_at_once_with_130(tmp_path: Path) -> None:
    """The first Ctrl-C asks InterruptCheckpoint for a checkpoint at the end of the step; a second one, in the
    same step, stops without it."""
    proc = _start_fit(tmp_path, "--trainer.callbacks+=slow_callbacks.SlowStep")
    before = _wait_for(proc, "IN A STEP")
    proc.send_signal(signal.SIGINT)
    before += _wait_for(proc, "lfmri: received SIGINT")
    proc.send_signal(signal.SIGINT)
    err = _finish(proc, before)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.splitlines()[-1] == f"lfmri fit: interrupted by SIGINT; {STOPPED}"
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def _alive_in_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that still run (not zombies), from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc/PID/stat")
def test_a_ctrl_c_to_the_main_process_of_a_ddp_set_up_stops_every_rank(tmp_path: Path) -> None:
    """SIGINT to the launching process only (`kill -INT`, not a terminal's Ctrl-C to the whole group): the
    rank it launched is stopped with it, instead of the main process waiting for it."""
    proc = _start_fit(tmp_path, "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2",
                      "--trainer.callbacks+=slow_callbacks.SlowSetup", new_session=True)
    try:
        before = _wait_for(proc, "IN SET-UP")
        before += _wait_for(proc, "IN SET-UP")  # both ranks
        proc.send_signal(signal.SIGINT)
        err = _finish(proc, before, timeout=60)
        assert proc.returncode == 130, err[-3000:]
        assert err.splitlines()[-1] == f"lfmri fit: interrupted by SIGINT; {STOPPED}", err[-3000:]
        deadline = time.monotonic() + 30  # a loaded machine takes a while to reap the rank
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive_in_group(proc.pid)
    finally:
        if _alive_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
