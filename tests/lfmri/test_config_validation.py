"""Bad config values are refused when the model and the data module are built, before any data is read: one
line naming the option on stderr and exit code 2 (through the real `lfmri fit` with the quickstart config).
Configs that are merely unusual (the data's image_size differs from the model's, an image_size that is not a
multiple of the U-Net's size multiple) train."""

from __future__ import annotations

import re
import time

import lightning.pytorch  # noqa: F401  (its log handlers exist before the fixture below adjusts them)
import pytest
from helpers import QUICKSTART

from lfmri.cli import main

TINY = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.init_args.net.nf=8", "--model.init_args.net.num_groups=4",
        "--data.init_args.loader.batch_size=2", "--data.init_args.loader.num_workers=0"]
#: a little bundled data, for the runs that train
SMALL_DATA = "--data.init_args.source={class_path: BundledSource, init_args: {n_train: 1, n_val: 1}}"

BAD = [
    ("--data.init_args.regimes=[foo]", "regimes", "foo"),
    ("--data.init_args.eval_regimes=[noise, earthquake]", "eval_regimes", "earthquake"),
    ("--model.init_args.optim.lr=-1", "optim.lr", "> 0"),
    ("--model.init_args.optim.lr=.nan", "optim.lr", "> 0"),
    ("--data.init_args.loader.batch_size=0", "loader.batch_size", ">= 1"),
    ("--data.init_args.loader.eval_batch_size=-2", "loader.eval_batch_size", ">= 1"),
    ("--data.init_args.regime_overrides={snr_db_range: [7, 2]}", "regime_overrides", "snr_db_range"),
    ("--data.init_args.regime_overrides={snr_dB: 5}", "regime_overrides", "snr_dB"),
    ("--data.init_args.loader.num_workers=-1", "loader.num_workers", ">= 0"),
    ("--data.init_args.slices.crop_size=4", "slices.crop_size", ">= 8"),
    ("--data.init_args.val_fraction=1.5", "val_fraction", "[0, 1)"),
    ("--data.init_args.source=nifti", "source", "--data.init_args.source=/data/dir"),
    ("--model.init_args.optim.ema_decay=1.5", "optim.ema_decay", "[0, 1]"),
    ("--model.init_args.loss.supervised_t0=[0.3, 0.05]", "loss.supervised_t0", "min <= max"),
    ("--model.init_args.loss.supervised_t0=[0.05, 3]", "loss.supervised_t0", "[0, 1]"),
    ("--model.init_args.net.ch_mult=[]", "ch_mult", "non-empty"),
    ("--model.init_args.net.ch_mult=[1, 0]", "ch_mult", ">= 1"),
    ("--model.init_args.net.image_size=0", "image_size", ">= 1"),
    ("--model.init_args.net.dropout=1", "dropout", "[0, 1)"),
    ("--model.init_args.optim.warmup_steps=-5", "optim.warmup_steps", ">= 0"),
    ("--model.init_args.net.num_groups=3", "num_groups", "divide"),
    ("--model.init_args.net.sigma_min=0", "sigma_min", "> 0"),
]


pytestmark = pytest.mark.usefixtures("lightning_logs_to_stderr")


@pytest.mark.parametrize(("arg", "option", "words"), BAD, ids=[b[0][2:] for b in BAD])
def test_a_bad_option_is_one_line_before_any_data_is_read(tmp_path, capsys, arg, option, words):
    # the data directory does not exist: an error about it would mean the data was looked at first
    start = time.monotonic()
    rc = main(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
               f"--data.init_args.source={tmp_path}/no-data", *TINY, arg])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    info = [line for line in lines[:-1] if not line.endswith("Seed set to 0")]  # Lightning's info line
    assert "Traceback" not in err and not info, err[-3000:]
    assert re.match(rf"lfmri fit: error: {option}[ :]", lines[-1]) and words in lines[-1], lines[-1]
    assert "no-data" not in lines[-1]
    assert not (tmp_path / "run").exists()  # nothing was built: no trainer, no log directory
    assert seconds < 60


@pytest.mark.slow
@pytest.mark.e2e
def test_unusual_but_valid_sizes_train(tmp_path, capsys):
    # data resized to 50 x 50 (not a multiple of the U-Net's 4) and a model image_size of 25 (attention
    # placement only): the network pads to its multiple, and both image_size values are logged without a clash
    rc = main(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run", *TINY,
               SMALL_DATA, "--data.init_args.slices.image_size=50", "--data.init_args.slices.crop_size=null",
               "--model.init_args.net.image_size=25"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_run_without_a_logger_trains(tmp_path, capsys):
    # the quickstart config has a LearningRateMonitor, which needs a logger: it is dropped with a warning
    with pytest.warns(UserWarning, match="LearningRateMonitor.*no logger"):
        rc = main(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run", *TINY,
                   SMALL_DATA, "--trainer.logger=false", "--trainer.val_check_interval=1",
                   "--trainer.limit_val_batches=1.0",
                   "--data.init_args.slices.eval_per_volume=1", "--data.init_args.eval_regimes=[noise]",
                   "--trainer.callbacks.init_args.n_slices=1",
                   "--trainer.callbacks.init_args.sampling.steps=2"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file() and not (tmp_path / "run/logs").exists()
    assert list((tmp_path / "run/samples").glob("*.png"))  # the validation sampler ran, its pictures as files
