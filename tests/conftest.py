"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to CPU oversubscription (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`); the previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



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
