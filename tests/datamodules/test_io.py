"""Atomic writes and output checks (`lfmri_utils.files`), the one helper every lfmri output goes through
(issue 14, items 9 and 10): a replaced file keeps its mode, a symbolic link is written through, a write killed
midway leaves a visibly named temporary that the next write removes, and an output location that cannot be
written is reported before any work."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

import lfmri_utils.files as files
from datamodules.io import NIFTI_SUFFIXES
from lfmri_utils.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_replacing_a_file_keeps_its_mode_and_a_new_file_gets_the_usual_one(tmp_path: Path) -> None:
    out = tmp_path / "v.nii.gz"
    out.write_bytes(b"old")
    out.chmod(0o640)
    with files.atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    with files.atomic_path(fresh) as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "v.nii.gz"]


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    target = store / "v.nii.gz"
    target.write_bytes(b"old")
    target.chmod(0o600)
    link = tmp_path / "v.nii.gz"
    link.symlink_to(target)
    with files.atomic_path(link) as tmp:
        tmp.write_bytes(b"new")
    assert link.is_symlink() and Path(os.readlink(link)) == target  # the link stays a link
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in store.iterdir()] == ["v.nii.gz"]  # no temporary left beside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "v.nii.gz"]


def test_a_write_killed_midway_leaves_a_visible_temporary_that_the_next_write_removes(tmp_path: Path) -> None:
    out = tmp_path / "v.nii.gz"
    out.write_bytes(b"old")
    code = ("import os, signal, sys\nfrom lfmri_utils.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "v.nii.gz")
    assert left == [f".v.nii.gz.tmp-{files._host()}-{proc.pid}.nii.gz"]  # named for users to recognise
    assert out.read_bytes() == b"old"
    # a temporary of a process that still runs (here: pytest's parent) is left alone
    alive = tmp_path / f".v.nii.gz.tmp-{files._host()}-{os.getppid()}.nii.gz"
    alive.write_bytes(b"busy")
    with files.atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "v.nii.gz"]


def test_check_output_file_reports_each_problem_in_one_line(tmp_path: Path, unwritable: Path) -> None:
    volume = tmp_path / "in.nii.gz"
    volume.write_bytes(b"x")
    cases = {
        "must end with .nii.gz or .nii": (tmp_path / "out.png", ()),
        "is a folder, expected a file path": (tmp_path / "folder.nii", ()),
        f"would overwrite the input {volume}": (volume, (volume,)),
        "cannot write in folder": (unwritable / "out.nii.gz", ()),
        "is not a folder": (volume / "out.nii.gz", ()),
    }
    (tmp_path / "folder.nii").mkdir()
    for problem, (path, inputs) in cases.items():
        with pytest.raises(InputError) as info:
            files.check_output_file(path, "OUTPUT", NIFTI_SUFFIXES, inputs)
        message = str(info.value)
        assert message.startswith(f"OUTPUT {path}: ") and problem in message and "\n" not in message
    # a folder that does not exist yet but can be created is fine, and nothing is created by the check
    deep = tmp_path / "a" / "b" / "out.nii.gz"
    assert files.check_output_file(deep, "OUTPUT", NIFTI_SUFFIXES) == deep
    assert not (tmp_path / "a").exists()
    expected = f"cannot write in {unwritable} \\(to create {unwritable / 'new'}\\)"
    with pytest.raises(InputError, match=expected):
        files.check_output_file(unwritable / "new" / "out.nii.gz", "OUTPUT", NIFTI_SUFFIXES)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe file left


def test_check_output_dir(tmp_path: Path, unwritable: Path) -> None:
    a_file = tmp_path / "results.csv"
    a_file.write_text("x")
    with pytest.raises(InputError, match="--out .*results.csv: exists and is not a folder"):
        files.check_output_dir(a_file, "--out")
    with pytest.raises(InputError, match="cannot write in"):
        files.check_output_dir(unwritable / "eval", "--out")
    assert files.check_output_dir(tmp_path / "eval", "--out") == tmp_path / "eval"
    assert not (tmp_path / "eval").exists()


def test_check_input_file_tells_a_folder_from_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^--kspace .*: is a folder, expected a file$"):
        files.check_input_file(tmp_path, "--kspace")
    with pytest.raises(InputError, match=r"^--kspace .*absent.h5: no such file$"):
        files.check_input_file(tmp_path / "absent.h5", "--kspace")
