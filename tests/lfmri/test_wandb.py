"""W&B: `lfmri fit --config configs/quickstart.yaml --config configs/logger/wandb.yaml` runs offline without
an API key and logs the whole resolved config, both losses and the learning rate (read back from the offline
run file).
"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from helpers import LFMRI, QUICKSTART, REPO, TINY_QUICKSTART_ARGS
from wandb.proto import wandb_internal_pb2

TINY = ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", *TINY_QUICKSTART_ARGS]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # one `lfmri fit` process for the whole module


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a `.wandb` file: a LevelDB-style log (7-byte file header, 32 KiB blocks, each chunk with
    a 7-byte header: crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last))."""
    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def name(item) -> str:
    """A config / history item's key (W&B stores some as `nested_key`)."""
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no key, no mode: offline
    env["NETRC"] = str(tmp / "no-netrc")  # and no `wandb login`
    cmd = [str(LFMRI), "fit", "--config", str(QUICKSTART),
           "--config", str(REPO / "configs/logger/wandb.yaml"), *TINY]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = sorted((tmp / "runs" / "quickstart" / "wandb").glob("offline-run-*"))  # the run folder
    assert len(runs) == 1, "expected one offline run"
    records = read_records(next(runs[0].glob("*.wandb")))
    config, history = {}, []
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            config.update({name(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({name(i): json.loads(i.value_json) for i in r.history.item})
    return {"tmp": tmp, "config": config, "history": history, "log": out.stdout + out.stderr}


def test_offline_without_a_key(offline_run):
    assert "wandb sync" in offline_run["log"]  # W&B's hint for offline runs
    assert (offline_run["tmp"] / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()


def test_resolved_config_is_the_run_config(offline_run):
    config = offline_run["config"]
    assert config["seed_everything"] == 0
    assert config["trainer"]["max_steps"] == 2
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["model"]["class_path"] == "lightning_modules.module.ScoreModel"
    assert config["model"]["init_args"]["net"]["image_size"] == 32
    assert config["model"]["init_args"]["loss"]["supervised_t0"] == [0.05, 0.3]
    assert config["data"]["init_args"]["source"]["init_args"]["n_train"] == 2
    # OmegaConf interpolation is resolved before logging
    dirpath = config["trainer"]["callbacks"][0]["init_args"]["dirpath"]
    assert dirpath == "runs/quickstart/checkpoints"


def test_both_losses_and_the_learning_rate_are_logged(offline_run):
    logged: dict[str, list[float]] = {}
    for row in offline_run["history"]:
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    for key in ("train/loss", "train/dsm", "train/supervised", "val/loss", "val/dsm", "val/supervised"):
        assert key in logged and all(math.isfinite(v) for v in logged[key]), key
    assert len(logged["train/loss"]) == 2
    assert logged["lr-AdamW"] == pytest.approx([1e-3 / 50, 2e-3 / 50])  # quickstart's warm-up, 50 steps
