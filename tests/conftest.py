"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_16_MODEL, TINY_MODEL


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to CPU oversubscription (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`); the previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _save_score_model(path: Path, model=None) -> Path:
    """Save `model` (default: a tiny ScoreModel, `TINY_MODEL`) as `lfmri fit` saves a Lightning checkpoint
    (weights, EMA, hyper-parameters with the CLI's `_class_path`); returns `path`."""
    import lightning as L

    from lightning_modules.module import ScoreModel

    model = model if model is not None else ScoreModel(**TINY_MODEL)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "lightning_modules.module.ScoreModel"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def save_score_model():
    """`save_score_model(path, model=None) -> path`: see `_save_score_model`."""
    return _save_score_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ScoreModel checkpoint (`TINY_MODEL`, untrained) for the whole session: read it, never change
    it (copy it first)."""
    return _save_score_model(tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.ckpt")


@pytest.fixture(scope="session")
def tiny16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ScoreModel checkpoint trained at 16 px (`TINY_16_MODEL`, untrained) for the whole session:
    read it, never change it."""
    from lightning_modules.module import ScoreModel

    return _save_score_model(tmp_path_factory.mktemp("tiny16_checkpoint") / "tiny.ckpt",
                             ScoreModel(**TINY_16_MODEL))


@pytest.fixture()
def lightning_logs_to_stderr():
    """Lightning's log handlers keep the stderr of the test that first imported it (closed by now): point
    them at this test's (use with `pytestmark = pytest.mark.usefixtures("lightning_logs_to_stderr")`)."""
    import logging
    import sys

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)


@pytest.fixture()
def unwritable(tmp_path: Path):
    """A folder this process cannot create files in: a read-only folder, or /sys for root (who ignores
    permission bits); skipped where there is none."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        os.close(os.open("/sys/.lfmri-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        yield Path("/sys")
        return
    os.unlink("/sys/.lfmri-probe")
    pytest.skip("no folder this (root) process cannot write in")
