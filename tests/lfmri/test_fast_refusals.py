"""Issue 22, items 6, 15 and 17: bad arguments are refused before the heavy imports (torch, Lightning, the
model code); an empty config and a split of unreadable files are named; baselines are tuned on validation
slices with signal only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from datamodules.datamodule import LowFieldDataModule
from degradations import channels_to_complex, fft2c, neutral_params
from diffusion.checkpoint import SHIPPED_CHECKPOINTS
from diffusion.sampling.samplers import build_sampler
from lfmri import evaluation
from lfmri.cli import main
from lfmri.commands.sampler_options import check_checkpoint_argument
from lfmri.evaluation import TUNING_MIN_FOREGROUND, run_evaluation, tune_on_validation
from lfmri_utils.errors import InputError

DATA = {"class_path": "datamodules.LowFieldDataModule",
        "init_args": {"source": {"class_path": "datamodules.sources.BundledSource",
                                 "init_args": {"n_train": 1, "n_val": 1}}}}


def _in_fresh_python(argv: list[str], cwd: Path) -> tuple[str, str]:
    """Run `lfmri argv` in a new interpreter; (what it prints: "<exit code> <torch imported> <lightning
    imported>", its stderr)."""
    code = ("import sys; from lfmri.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return proc.stdout.strip(), proc.stderr.strip()


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": DATA}))
    return path


# ------------------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("argv, named", [
    (["reconstruct", "missing.nii.gz", "o.nii.gz", "--ckpt", "reference-small", "--regime", "noise"],
     "missing.nii.gz: no such file"),
    (["evaluate", "--ckpt", "reference-small", "--config", "missing.yaml", "--out", "o"],
     "--config missing.yaml: no such file"),
    (["evaluate", "--ckpt", "missing.ckpt", "--config", "data.yaml", "--out", "o"],
     "missing.ckpt: no such checkpoint file"),
    (["export", "--ckpt", "missing.ckpt", "o.pth"], "missing.ckpt: no such checkpoint file"),
], ids=["reconstruct-input", "evaluate-config", "evaluate-ckpt", "export-ckpt"])
def test_a_missing_file_is_refused_before_torch_is_imported(argv, named, config, tmp_path):
    printed, err = _in_fresh_python(argv, tmp_path)
    assert printed == "2 False False", err
    assert err == f"lfmri {argv[0]}: error: {named}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.yaml"]  # nothing written


def test_shipped_checkpoint_names_look_like_no_path():
    """`check_checkpoint_argument` leaves a bare name to `resolve_checkpoint`: shipped names must be bare."""
    for name in SHIPPED_CHECKPOINTS:
        assert Path(name).name == name and not Path(name).suffix, name
        check_checkpoint_argument(name)
    with pytest.raises(InputError, match="no such checkpoint file"):
        check_checkpoint_argument("runs/last")


def test_samples_of_a_point_estimate_are_refused_before_the_model_is_read(config, tmp_path):
    volume = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.float32), np.eye(4)), volume)
    junk = tmp_path / "junk.ckpt"  # read after the sampler check: its error would come first otherwise
    junk.write_bytes(b"\x00 not a checkpoint")
    for argv in (["reconstruct", str(volume), "o.nii.gz", "--ckpt", str(junk), "--regime", "noise"],
                 ["evaluate", "--ckpt", str(junk), "--config", str(config), "--out", "o"]):
        printed, err = _in_fresh_python([*argv, "--sampling.sampler", "tweedie", "--samples", "2"], tmp_path)
        assert printed == "2 True False", err  # the sampler registry needs torch, not the model code
        assert "sampler 'tweedie' is a deterministic point estimate" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------- item 15
@pytest.mark.parametrize("text, problem", [
    ("", "no data: block (class_path + init_args): the file is empty"),
    ("# a comment only\n", "no data: block (class_path + init_args): the file is empty"),
    ("data: {}\n", "the data: block is empty (expected class_path + init_args)"),
])
def test_a_config_without_data_is_refused(text, problem, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    missing = str(tmp_path / "missing.ckpt")  # the config is checked first: its error comes first
    code = main(["evaluate", "--ckpt", missing, "--config", str(empty), "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip() == f"lfmri evaluate: error: --config {empty}: {problem}"
    assert not (tmp_path / "o").exists()


def test_a_split_of_unreadable_files_names_them(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(5)]
    for name in [*names, "train0"]:
        (root / f"{name}.nii.gz").write_bytes(rng.bytes(300))
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"train": ["train0"], "test": names}))
    dm = LowFieldDataModule(source=str(root), split_file=str(split), skip_bad_files=True)
    model = SimpleNamespace(score_fn=lambda: (lambda x, t: torch.zeros_like(x)), data_scale=None)
    with pytest.warns(UserWarning, match="skipped 5 bad input file"), pytest.raises(InputError) as info:
        run_evaluation(model, dm, ["noise"], [], build_sampler("tweedie"))
    message = str(info.value)
    assert message.startswith("no usable volume left in the test split: 5 bad file(s) skipped "
                              f"(skip_bad_files): {root / 's0.nii.gz'}: not a NIfTI file (")
    assert all(f"{root / name}.nii.gz: not a NIfTI file" in message for name in names[:3])
    assert message.endswith("; and 2 more") and "\n" not in message


# ----------------------------------------------------------------------------------------------- item 17
class _ValidationVolumes:
    """Validation volumes of two 16 x 16 slices each; `signal[volume id]` says which slices hold a disk
    (the others are empty: background only); records what the tuning is given."""

    regime_overrides: dict = {}

    def __init__(self, signal: dict[str, tuple[bool, bool]]) -> None:
        self.signal = signal

    def volumes(self, split: str, regime: str):
        assert split == "val"
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        disk = (xx**2 + yy**2 < 0.6).float()
        for i, (volume_id, has_signal) in enumerate(self.signal.items()):
            images = torch.stack([disk if s else torch.zeros_like(disk) for s in has_signal])
            clean = torch.stack([images, torch.zeros_like(images)], dim=1)
            degraded = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(i))
            params = neutral_params(2, 16, 16)
            params["noise_sigma"] = torch.full((2,), 0.1 * 2**0.5)
            yield SimpleNamespace(volume_id=volume_id, clean=clean, degraded=degraded, params=params,
                                  y=fft2c(channels_to_complex(degraded)), slices=torch.arange(2))


def test_tuning_skips_the_slices_without_signal(monkeypatch):
    given = {}
    monkeypatch.setattr(evaluation, "tune_baselines",
                        lambda names, volumes, metric, progress: given.update(volumes) or {})
    dm = _ValidationVolumes({"val-a": (False, True), "val-b": (False, False)})
    tune_on_validation(dm, ["noise"], ["tv"])
    assert list(given["noise"]) == ["val-a"]  # val-b: no slice with signal
    measurement, reference = given["noise"]["val-a"]
    assert len(measurement) == 1 and reference.shape == (1, 16, 16)
    assert (reference > 0.1).mean() >= TUNING_MIN_FOREGROUND  # the disk, not the empty slice


def test_no_validation_slice_with_signal_is_said_plainly():
    dm = _ValidationVolumes({"val-a": (False, False), "val-b": (False, False)})
    with pytest.raises(InputError) as info:
        tune_on_validation(dm, ["noise"], ["tv"])
    assert str(info.value).startswith("no validation slice has signal to tune the baselines on: the 4 "
                                      "slice(s) of val-a, val-b are at most 0.0% object, tuning needs 1%")
    assert "--baselines none" in str(info.value)
