"""Untrusted files run no code: a crafted checkpoint or config given to any command is refused (one line,
exit 2) before its payload can execute (issue: reliability and security, items 1 and 2)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import refused

from lfmri.data_config import load_datamodule
from lfmri_utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this object runs `touch <marker>` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


@pytest.fixture()
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A `.ckpt` whose unpickling creates `marker`, with the keys of a ScoreModel checkpoint."""
    marker = tmp_path / "payload_ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "ema": _Payload(marker)}, ckpt)
    return ckpt, marker


def test_the_crafted_checkpoint_does_run_code_when_unpickled_unsafely(crafted: tuple[Path, Path]) -> None:
    # the fixture is a real threat: an unrestricted load executes it (so the tests below can fail)
    ckpt, marker = crafted
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def _refused(argv: list[str], capsys: pytest.CaptureFixture, marker: Path) -> str:
    err = refused(argv, capsys)
    assert not marker.exists(), "the checkpoint's payload ran"
    return err


def test_a_crafted_checkpoint_runs_nothing_in_any_command(crafted: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import nibabel as nib
    import numpy as np

    ckpt, marker = crafted
    err = _refused(["export", "--ckpt", str(ckpt), str(tmp_path / "o.pth")], capsys, marker)
    assert "crafted.ckpt" in err and "refused" in err
    volume = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.float32), np.eye(4)), str(volume))
    _refused(["reconstruct", str(volume), str(tmp_path / "r.nii.gz"), "--ckpt", str(ckpt),
              "--regime", "noise", "--device", "cpu"], capsys, marker)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "datamodules.LowFieldDataModule",
                                               "init_args": {"source": "bundled"}}}))
    _refused(["evaluate", "--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "ev"),
              "--device", "cpu"], capsys, marker)
    assert not (tmp_path / "o.pth").exists() and not (tmp_path / "r.nii.gz").exists()


@pytest.mark.parametrize("block", [
    {"data": {"class_path": "subprocess.call", "init_args": {"args": ["touch", "MARKER"]}}},
    {"class_path": "subprocess.call", "init_args": {"args": ["touch", "MARKER"]}},
    {"data": {"class_path": "os.system", "init_args": {"command": "touch MARKER"}}},
])
def test_a_config_naming_another_callable_runs_nothing(block: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "payload_ran"
    text = yaml.safe_dump(block).replace("MARKER", str(marker))
    config = tmp_path / "evil.yaml"
    config.write_text(text)
    err = _refused(["preview", "--config", str(config), "--out", str(tmp_path / "p.png")], capsys, marker)
    assert "evil.yaml" in err and "LightningDataModule" in err
    with pytest.raises(InputError, match="LightningDataModule"):
        load_datamodule(config)
    assert not marker.exists() and not (tmp_path / "p.png").exists()  # evaluate uses the same loader
