"""Every command block of README.md runs as pasted, in order, from a fresh clone.

The ```bash blocks are read into commands (`\\` continuations joined, trailing `# comments` dropped) and run
one after the other by bash in ONE temporary copy of the repository (its files as a clone of the working
tree would have them) whose `.venv` is the installed environment (as after `make setup`), with that
environment's `bin` first on PATH (as after `source .venv/bin/activate`): each command finds what the earlier
ones wrote, and nothing is written into the repository. A command runs as the README writes it, changed in
two ways only:

- shrink flags appended (`SHRINK`, by command prefix: two CPU steps, a tiny network, one slice, one regime);
- the README's absolute `/data/...` folders moved into the copy (`data/...`).

The user's own files the README names (`PLACEHOLDERS`: a volume, data folders, clinical checkpoints, a
config) are small real-format stand-ins made in the copy first. The commands that cannot run in a test are
listed with their reasons (`NOT_RUN`); a README command neither run nor listed fails
`test_every_readme_command_is_run_or_listed`, so a new block cannot go untested silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from helpers import FAMILY_CHECKPOINTS, MNI, REPO, SCORE_SDE_NET

README = REPO / "README.md"
#: the virtual environment running the tests (`make setup`'s .venv)
VENV = Path(sys.prefix)

# ---------------------------------------------------------------------------------------------- shrink flags
#: every `lfmri fit`: on the CPU in 32-bit, two optimiser steps, no validation, batches of 2 read in-process
FIT_SHORT = ("--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
             "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
             "--data.init_args.loader.batch_size=2", "--data.init_args.loader.num_workers=0")
#: the bundled source with one training and one validation pseudo-subject (each is generated when first read)
BUNDLED_SMALL = "data.init_args.source={class_path: BundledSource, init_args: {n_train: 1, n_val: 1}}"
#: configs/model/ddpm_34m.yaml's network at the size of the score_sde stand-in (tests/fixtures/score_sde_tiny)
NET_TINY = tuple(f"model.init_args.net.{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
                 for key, value in SCORE_SDE_NET.items() if key != "image_size")
#: every `lfmri evaluate`: one regime, one slice per volume, no baselines (tuning them on validation volumes
#: takes minutes; tests/lfmri/test_evaluate_cli.py and test_baselines*.py test them)
EVALUATE_SHORT = ("--regimes", "noise", "--max-slices-per-volume", "1", "--baselines", "none")
#: every experiments/paper/run.py: two fine-tuning steps, one slice per test volume, no baselines, the fits
#: and evaluations two at a time
PAPER_SHORT = ("--jobs", "2", "--finetune-steps", "2", "--max-slices-per-volume", "1", "--baselines", "none",
               "--set", "data.init_args.loader.num_workers=0", "--set", "trainer.limit_val_batches=0",
               "--set", "trainer.num_sanity_val_steps=0")

#: README command prefix (whole words; the longest match wins) -> the flags appended to it
SHRINK: dict[str, tuple[str, ...]] = {
    "lfmri degrade": (),  # the stand-in volume has two slices
    # the stand-in's 64 phase-encoding lines: 8 % is 5 centre lines, too few for ESPIRiT; 20 % is 13
    "lfmri degrade brain.nii.gz mc.nii.gz": ("--center-fraction", "0.2"),
    "lfmri preview": ("--volumes-per-split", "1"),
    "lfmri fit --config configs/quickstart.yaml": (*FIT_SHORT, f"--{BUNDLED_SMALL}"),
    "lfmri fit --config configs/quickstart.yaml --print_config": (),
    # resumed from the 2 steps of the run before it: two more
    "lfmri fit --config configs/quickstart.yaml --ckpt_path last": (*FIT_SHORT, f"--{BUNDLED_SMALL}",
                                                                      "--trainer.max_steps=4"),
    "lfmri fit --config configs/model/ddpm_34m.yaml": (
        *FIT_SHORT, *(f"--{flag}" for flag in NET_TINY),
        f"--model.init_args.net.image_size={SCORE_SDE_NET['image_size']}",
        f"--data.init_args.slices.crop_size={SCORE_SDE_NET['image_size']}"),
    # the score-MRI family's network comes from the checkpoint's config: the stand-in's 24 px
    "lfmri fit --config configs/finetune_mouse.yaml": (*FIT_SHORT, "--data.init_args.slices.crop_size=24"),
    "lfmri reconstruct": (),  # the stand-in volume's two 64 x 64 slices
    "lfmri evaluate": EVALUATE_SHORT,
    # the paper's PC in 21 steps, the fewest score_sde's discretisation takes (more than beta_max, 20)
    "lfmri evaluate --ckpt runs/quickstart/checkpoints/last.ckpt": (*EVALUATE_SHORT,
                                                                    "--reference-pc-steps", "21"),
    "lfmri metrics": (),
    "lfmri predict": (),
    "lfmri export": (),
    # without the from-scratch run (the full-scale run below has it)
    "python experiments/paper/run.py bundled --small": (*PAPER_SHORT, "--no-scratch", "--set", BUNDLED_SMALL),
    "python experiments/paper/run.py /data/mouse_t2w": (
        *PAPER_SHORT, "--image-size", str(SCORE_SDE_NET["image_size"]), "--n-test", "1", "--n-val", "1",
        "--set", "trainer.accelerator=cpu", "--set", "trainer.precision=32-true",
        *(arg for flag in NET_TINY for arg in ("--set", flag))),
    "make lint": (),
}

#: README commands this test does not run (exactly as the README writes them, comments dropped) -> why
NOT_RUN: dict[str, str] = {
    "make demo": "the whole demo at its fixed size (6 min 25 s on 2 cores); its parts run here: "
                 "lfmri degrade, python experiments/paper/run.py bundled --small",
    "make test": "the test suite, of which this test is a part",
    '.venv/bin/python -m pytest -m "not slow"': "the test suite, of which this test is a part",
    "wandb sweep --project lfmri experiments/sweeps/finetune.yaml && wandb agent <entity>/lfmri/<sweep id>":
        "needs a W&B account and server (<entity>, <sweep id> are the user's); "
        "tests/lfmri/test_sweeps.py checks every value the sweeps can produce against the CLI",
    "lfmri fit --config configs/model/ddpm_34m.yaml --config configs/finetune_mouse.yaml ... "
    "--trainer.strategy=ddp --trainer.devices=4 --trainer.num_nodes=2":
        "two nodes of four GPUs, and `...` stands for the flags of the fine-tune above; DDP runs on CPU "
        "processes in tests/lfmri/test_ddp.py",
}


# -------------------------------------------------------------------------------------------- stand-ins
def _brain(path: Path) -> None:
    """The user's magnitude volume: two axial 64 x 64 slices of the shipped Colin27 brain, stored as uint8."""
    img = nib.load(REPO / "datamodules" / "data" / "colin27_ch2.nii.gz")
    data = np.asarray(img.dataobj)[58:122, 76:140, 88:92:2]
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _volumes(root: Path, bids: bool) -> None:
    """A folder of four 32 x 32 x 3 float32 NIfTI volumes of real MRI (slices of nilearn's MNI template, each
    subject shifted by a voxel): BIDS (`sub-0N/anat/sub-0N_T2w.nii.gz`) or flat (`mouse0N.nii.gz`)."""
    img = nib.load(str(MNI))
    data = np.asarray(img.dataobj, dtype=np.float32)
    for n in range(1, 5):
        volume = data[19 + n:179 + n:5, 30:190:5, 80:110:10]
        path = root / f"sub-0{n}" / "anat" / f"sub-0{n}_T2w.nii.gz" if bids else root / f"mouse0{n}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume, img.affine), path)


def _fastmri(root: Path) -> None:
    """A folder of three single-coil fastMRI-layout HDF5 files (`kspace` [3, 32, 32] complex64, centred
    orthonormal FFT of MNI template slices, `ismrmrd_header`, `acquisition`)."""
    data = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)
    root.mkdir(parents=True)
    for n in range(3):
        image = np.moveaxis(data[20:180:5, 30:190:5, 70 + 10 * n:100 + 10 * n:10], -1, 0)
        kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=(-2, -1)), norm="ortho"),
                                 axes=(-2, -1))
        with h5py.File(root / f"file{n}.h5", "w") as f:
            f.create_dataset("kspace", data=kspace.astype(np.complex64))
            f.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader><encoding/></ismrmrdHeader>")
            f.attrs["acquisition"] = "CORPD_FBK"


def _copy_of(source: Path) -> Callable[[Path], None]:
    """A maker that copies `source` (a real-format checkpoint fixture) to its path."""
    return lambda path: shutil.copyfile(source, path)


def _score_mri_config(path: Path) -> None:
    """score-MRI's `configs/ve/fastmri_knee_320_ncsnpp_continuous.py` at the score-MRI fixture's sizes: its
    config.json (the released file's values, sizes shrunk) written as an ml_collections `get_config()`."""
    config = json.loads((FAMILY_CHECKPOINTS["score_mri"].parent / "config.json").read_text())
    lines = ["import ml_collections", "", "", "def get_config():", "    config = ml_collections.ConfigDict()"]
    for section, values in config.items():
        if section == "fixture":  # the fixture's notes, no part of a score-MRI config
            continue
        if not isinstance(values, dict):
            lines.append(f"    config.{section} = {values!r}")
            continue
        alias = "evaluate" if section == "eval" else section  # as score_sde's configs name it
        lines.append(f"    config.{section} = {alias} = ml_collections.ConfigDict()")
        lines += [f"    {alias}.{key} = {value!r}" for key, value in values.items()]
    lines.append("    return config")
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")


#: what the README names but a fresh clone does not have (the user's own files) -> a maker of its stand-in at
#: that path in the copy (`/data/...` at `data/...`)
PLACEHOLDERS: dict[str, Callable[[Path], None]] = {
    "brain.nii.gz": _brain,
    "/data/mouse_bids": lambda path: _volumes(path, bids=True),
    "/data/mouse_t2w": lambda path: _volumes(path, bids=False),
    "/data/fastmri/knee_train": _fastmri,
    "knee_vpsde.pth": _copy_of(FAMILY_CHECKPOINTS["score_sde"]),
    "score_mri_knee.pth": _copy_of(FAMILY_CHECKPOINTS["score_mri"]),
    "score-MRI/configs/ve/fastmri_knee_320_ncsnpp_continuous.py": _score_mri_config,
}


# -------------------------------------------------------------------------------------------- the README
def strip_comment(line: str) -> str:
    """`line` without its bash comment (from a `#` that starts a word outside quotes) and trailing blanks."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks of `markdown`, in order: a line ending in `\\` joined to the next
    (its indentation dropped; a `\\` inside a comment continues nothing, as in bash), comments and blank
    lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.M | re.S):
        pending: list[str] = []
        for raw in block.splitlines():
            text = strip_comment(raw)
            if text == raw.rstrip() and raw.endswith("\\"):
                pending.append(text[:-1].strip())
                continue
            command = " ".join(part for part in (*pending, text.strip()) if part)
            pending = []
            if command:
                commands.append(command)
    return commands


def shrink_flags(command: str) -> tuple[str, ...] | None:
    """The flags `SHRINK` appends to `command` (its longest whole-word prefix there), None where none is."""
    keys = [key for key in SHRINK if command == key or command.startswith(key + " ")]
    return SHRINK[max(keys, key=len)] if keys else None


def as_run(command: str, workspace: Path) -> str:
    """`command` as this test runs it in `workspace`: `/data/...` moved there, `shrink_flags` appended."""
    moved = re.sub(r"(?<=[\s=])/data/", f"{workspace}/data/", command)
    return " ".join([moved, *map(shlex.quote, shrink_flags(command) or ())])


def readme_commands() -> list[str]:
    """README.md's shell commands, in order."""
    return shell_commands(README.read_text())


# -------------------------------------------------------------------------------------------- the copy
def fresh_clone(dest: Path) -> set[Path]:
    """Copy the repository's files into `dest` as the working tree has them (tracked, and new ones git does
    not ignore: what a clone of the next commit has), and make `dest/.venv` the running environment (links to
    its entries, a new `make setup` stamp); returns the files copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout
    copied = set()
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # not a file deleted in the working tree
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.add(target)
    venv = dest / ".venv"
    venv.mkdir()
    for entry in VENV.iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not set up again
    return copied


def new_files(root: Path, known: set[Path]) -> list[Path]:
    """The files under `root` not in `known`, relative to `root` (not in .venv or a cache folder)."""
    skip = {".venv", "__pycache__", ".ruff_cache", ".pytest_cache"}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [(Path(folder) / f).relative_to(root) for f in files if Path(folder) / f not in known]
    return found


# -------------------------------------------------------------------------------------------- tests
def test_shell_commands_join_continuations_and_drop_comments() -> None:
    text = ("intro\n```bash\nmake demo   # all of it\nlfmri fit --a \\\n    --b=1   # the b\n\n"
            "echo '# kept' x#y # gone\n# a comment line\necho a # \\\necho b\n```\n```yaml\nnot: run\n```\n"
            "```bash\nwandb sweep x && wandb agent <e>/<id>\n```\n")
    assert shell_commands(text) == ["make demo", "lfmri fit --a --b=1", "echo '# kept' x#y", "echo a",
                                    "echo b", "wandb sweep x && wandb agent <e>/<id>"]


def test_every_readme_command_is_run_or_listed() -> None:
    other_shells = re.findall(r"^```(sh|shell|console|zsh|bash\S+)\s*$", README.read_text(), flags=re.M)
    assert not other_shells, f"write shell blocks as ```bash (the ones this test runs), not {other_shells}"
    commands = readme_commands()
    untested = [c for c in commands if c not in NOT_RUN and shrink_flags(c) is None]
    assert not untested, f"README commands neither run nor listed in NOT_RUN (add them to SHRINK): {untested}"
    assert not set(NOT_RUN) - set(commands), "NOT_RUN lists commands the README no longer has"
    ran = [c for c in commands if c not in NOT_RUN]
    unused = [key for key in SHRINK if not any(c == key or c.startswith(key + " ") for c in ran)]
    assert not unused, f"SHRINK entries no README command starts with: {unused}"
    stale = [name for name in PLACEHOLDERS if not any(name in c for c in ran)]
    assert not stale, f"PLACEHOLDERS no README command names: {stale}"


@pytest.mark.slow
@pytest.mark.e2e
def test_readme_commands_run_as_pasted_in_order(tmp_path: Path) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("runs the README in make setup's virtual environment")
    if not (REPO / ".git").exists():
        pytest.skip("copies the tracked files of a git checkout")
    workspace = tmp_path / "clone"
    known = fresh_clone(workspace)
    for name, make in PLACEHOLDERS.items():
        make(workspace / name.lstrip("/"))
    known |= {workspace / path for path in new_files(workspace, known)}
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(VENV), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{f"WANDB_{kind}_DIR": str(tmp_path / "wandb" / kind) for kind in ("CACHE", "CONFIG", "DATA")}}
    env.pop("WANDB_API_KEY", None)
    started, timings = time.time(), []
    for command in readme_commands():
        if command in NOT_RUN:
            continue
        line = as_run(command, workspace)
        begin = time.monotonic()
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=workspace, env=env,
                              capture_output=True, text=True, timeout=600)
        timings.append(f"{time.monotonic() - begin:6.1f} s  {command}")
        assert done.returncode == 0, (f"README command failed (exit {done.returncode}):\n  {command}\n"
                                      f"run as:\n  {line}\nstdout (end):\n{done.stdout[-3000:]}\n"
                                      f"stderr (end):\n{done.stderr[-6000:]}\ntimes:\n" + "\n".join(timings))
    print("\n".join(timings))
    # every output is in the copy: nothing the commands wrote appeared in (or changed) the repository
    leaked = [str(path) for path in new_files(workspace, known)
              if (REPO / path).exists() and (REPO / path).stat().st_mtime >= started]
    assert not leaked, f"README commands wrote into the repository: {leaked}"
