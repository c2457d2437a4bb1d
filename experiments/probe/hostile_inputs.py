"""Hostile-input probe: every `lfmri` command fed bad, hostile and valid inputs; each outcome classified.

    python experiments/probe/hostile_inputs.py --out probe_out [--only GROUP,...] [--jobs 2]

Builds small real-format inputs in a scratch folder (a 64x64x3 crop of the bundled Colin27 volume, its
`lfmri degrade` output and k-space, broken NIfTI / HDF5 / JSON / checkpoint / YAML files, a pickle payload
that creates a marker file if it is ever unpickled), then runs each case as a user would (the venv's `lfmri`,
a subprocess, 240 s limit) and classifies it:

- a case expected to be REFUSED is clean when it exits 2 with an `error:` line, no traceback, at most one line
  besides argparse's own usage text, nothing written at its output paths and no input changed;
- a case expected to be ACCEPTED is clean when it exits 0 and writes its outputs;
- an INTERRUPT case (SIGINT / SIGTERM after a delay) is clean when it exits 128 + the signal, no
  traceback.

Anything else is a defect (traceback, wrong exit code, several lines, a written or half-written output, a
changed input, a timeout, the payload's marker). Writes OUT/probe.md (the table: tried / clean / defects per
command, then each defect) and OUT/probe.json (every case's command, exit code and stderr), and prints the
table. Exit code 1 when any defect is found.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
LFMRI = Path(sys.executable).with_name("lfmri")
COLIN = REPO / "datamodules" / "data" / "colin27_ch2.nii.gz"
QUICKSTART = REPO / "configs" / "quickstart.yaml"
MARKER = "PAYLOAD_RAN"
#: fit / predict overrides that keep a run to seconds on a CPU (a tiny net on two bundled pseudo-subjects)
TINY_FIT = [
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.net.nf=8",
    "--model.init_args.net.num_groups=4",
    "--model.init_args.net.image_size=32",
    "--data.init_args.slices.crop_size=32",
    "--data.init_args.loader.num_workers=0",
    "--data.init_args.loader.batch_size=2",
    "--data.init_args.source={class_path: BundledSource, init_args: {n_train: 2, n_val: 1}}",
]
TIMEOUT_S = 240
#: data configs `preview` / `evaluate` must refuse (made by `_configs`)
BAD_DATA_CONFIGS = ("missing.yaml", "c_empty.yaml", "c_syntax.yaml", "c_data_os.yaml",
                    "c_data_subprocess.yaml", "c_pytag.yaml", "c_nodata.yaml", "c_missing_source.yaml",
                    "c_broken_source.yaml", "c_binary.yaml")
#: checkpoint files no command may load (made by `_checkpoints`)
BAD_CHECKPOINTS = ("missing.ckpt", "random.ckpt", "empty.ckpt", "text.ckpt", "folder.ckpt", "payload.ckpt",
                   "payload_zip.ckpt", "other_model.ckpt", "other_lightning.ckpt", "truncated.ckpt",
                   "score_sde.pth")


@dataclass
class Case:
    """One probe input: `argv` after `lfmri` (`{W}` = the scratch folder), what should happen, and the paths
    (relative to the scratch folder) that must not exist after a refusal / must exist after an acceptance."""

    group: str
    name: str
    argv: list[str]
    expect: str = "refuse"  # refuse | accept | interrupt
    outputs: tuple[str, ...] = ()
    signal_after: float | None = None
    signum: int = signal.SIGINT
    result: dict = field(default_factory=dict)


def _nifti(path: Path, data: np.ndarray, dtype: type = np.float32) -> None:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), np.eye(4)), str(path))


def build_inputs(w: Path) -> None:
    """Write every input file the cases use into the scratch folder `w`."""
    colin = np.asarray(nib.load(str(COLIN)).dataobj, dtype=np.float32)
    good = colin[60:124, 70:134, 88:91]
    _nifti(w / "good.nii.gz", good)
    _nifti(w / "good.nii", good)
    _nifti(w / "cube.nii.gz", colin[80:104, 90:114, 80:104])
    _nifti(w / "other.nii.gz", good * 0.9 + 3)
    _nifti(w / "twoslice.nii.gz", colin[60:124, 70:134, 88:90])
    (w / "empty.nii.gz").write_bytes(b"")
    (w / "random.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    (w / "text.nii.gz").write_text("this is not a NIfTI file\n")
    raw = (w / "good.nii.gz").read_bytes()
    (w / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    plain = (w / "good.nii").read_bytes()
    (w / "truncated.nii").write_bytes(plain[: len(plain) // 2])
    (w / "gz_garbage.nii.gz").write_bytes(gzip.compress(b"\x00" * 1000))
    _nifti(w / "d2.nii.gz", good[:, :, 0])
    _nifti(w / "d4.nii.gz", np.stack([good, good], axis=-1))
    _nifti(w / "d5.nii.gz", good[..., None, None].repeat(2, axis=-1))
    _nifti(w / "complex.nii.gz", good.astype(np.complex64), np.complex64)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf)):
        bad = good.copy()
        bad[10, 10, 1] = value
        _nifti(w / f"{name}.nii.gz", bad)
    _nifti(w / "zeros.nii.gz", np.zeros_like(good))
    _nifti(w / "negative.nii.gz", good - good.max())
    _nifti(w / "constant.nii.gz", np.full_like(good, 7.0))
    _nifti(w / "tiny1.nii.gz", np.ones((1, 1, 1)))
    _nifti(w / "tiny2.nii.gz", np.ones((2, 2, 2)))
    _nifti(w / "lines.nii.gz", good[:, :1, :])
    _nifti(w / "small7.nii.gz", good[20:27, 20:27, :])
    _nifti(w / "int16.nii.gz", (good * 10).astype(np.int16), np.int16)
    _nifti(w / "huge_values.nii.gz", good * 1e30)
    img = nib.Nifti1Image(good, np.eye(4))
    img.header.set_data_shape((4000, 4000, 4000))  # a header claiming 256 GB over a few KB of data
    (w / "liar.nii").write_bytes(img.header.binaryblock + b"\x00" * 4 + good.tobytes())
    (w / "folder.nii.gz").mkdir()
    (w / "space name.nii.gz").write_bytes(raw)
    (w / "ünïcødé.nii.gz").write_bytes(raw)
    os.symlink("/dev/null", w / "devnull.nii.gz")
    os.symlink(w / "nowhere.nii.gz", w / "dangling.nii.gz")
    (w / "good.txt").write_bytes(raw)

    run = subprocess.run(
        [
            str(LFMRI),
            "degrade",
            str(w / "good.nii.gz"),
            str(w / "low.nii.gz"),
            "--regime",
            "noise_blur_t2star_b0",
            "--snr-db",
            "5",
            "--seed",
            "0",
            "--kspace-out",
            str(w / "low_k.h5"),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        raise SystemExit(f"probe set-up: lfmri degrade failed:\n{run.stderr}")
    _nifti(w / "low_two.nii.gz", np.asarray(nib.load(str(w / "low.nii.gz")).dataobj)[:, :, :2])
    _kspace_variants(w)
    _params_variants(w)
    _checkpoints(w)
    _configs(w)


def _kspace_variants(w: Path) -> None:
    src = w / "low_k.h5"
    (w / "k_text.h5").write_text("not hdf5\n")
    (w / "k_empty.h5").write_bytes(b"")

    def variant(name: str, edit) -> None:
        shutil.copy(src, w / name)
        with h5py.File(w / name, "r+") as f:
            edit(f)

    def replace(f: h5py.File, key: str, value: np.ndarray) -> None:
        attrs = dict(f[key].attrs)
        del f[key]
        f[key] = value
        f[key].attrs.update(attrs)

    with h5py.File(src, "r") as f:
        k = f["kspace"][()]
        sigma = f["noise_sigma"][()] if "noise_sigma" in f else None
    variant("k_nokspace.h5", lambda f: f.__delitem__("kspace"))
    variant("k_real.h5", lambda f: replace(f, "kspace", k.real.astype(np.float32)))
    variant("k_shape.h5", lambda f: replace(f, "kspace", k[:, :32]))
    variant("k_2d.h5", lambda f: replace(f, "kspace", k[0]))
    variant(
        "k_nan.h5",
        lambda f: replace(
            f, "kspace", np.where(np.arange(k.size).reshape(k.shape) == 5, np.nan, k).astype(np.complex64)
        ),
    )
    variant("k_zero.h5", lambda f: replace(f, "kspace", np.zeros_like(k)))
    if sigma is not None:
        variant("k_sigma0.h5", lambda f: replace(f, "noise_sigma", np.zeros_like(sigma)))
        variant("k_sigmaneg.h5", lambda f: replace(f, "noise_sigma", -np.abs(sigma)))
        variant("k_sigmanan.h5", lambda f: replace(f, "noise_sigma", np.full_like(sigma, np.nan)))
    variant("k_regime.h5", lambda f: f.attrs.__setitem__("regime", "noise"))
    variant(
        "k_b0nan.h5",
        lambda f: (
            replace(f, "b0_map_hz", np.full_like(f["b0_map_hz"][()], np.nan)) if "b0_map_hz" in f else None
        ),
    )


def _params_variants(w: Path) -> None:
    good = json.loads((w / "low.nii.gz.json").read_text())
    (w / "p_broken.json").write_text("{not json")
    (w / "p_list.json").write_text("[1, 2, 3]")
    (w / "p_empty.json").write_text("")
    slices_key = next(
        (k for k, v in good.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None
    )
    if slices_key:
        fewer = dict(good, **{slices_key: good[slices_key][:1]})
        (w / "p_fewer.json").write_text(json.dumps(fewer))
        nan = json.loads(json.dumps(good))
        for record in nan[slices_key]:
            for key in record:
                if isinstance(record[key], (int, float)) and key not in ("slice", "index"):
                    record[key] = float("nan")
        (w / "p_nan.json").write_text(json.dumps(nan).replace("NaN", "NaN"))
        negative = json.loads(json.dumps(good))
        for record in negative[slices_key]:
            if "fwhm_px" in record:
                record["fwhm_px"] = -3.0
        (w / "p_negative.json").write_text(json.dumps(negative))
    (w / "p_wrongregime.json").write_text(json.dumps(dict(good, regime="noise")))


class _Payload:
    """Unpickling this creates the marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _checkpoints(w: Path) -> None:
    import torch

    (w / "random.ckpt").write_bytes(np.random.default_rng(1).bytes(8192))
    (w / "empty.ckpt").write_bytes(b"")
    (w / "text.ckpt").write_text("checkpoint\n")
    (w / "folder.ckpt").mkdir()
    with open(w / "payload.ckpt", "wb") as fh:
        pickle.dump({"state_dict": _Payload(str(w / MARKER))}, fh)
    torch.save({"state_dict": {}, "payload": _Payload(str(w / MARKER))}, w / "payload_zip.ckpt")
    torch.save({"weights": torch.zeros(3)}, w / "other_model.ckpt")
    torch.save(
        {"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {"lr": 1.0}},
        w / "other_lightning.ckpt",
    )
    ref = REPO / "lightning_modules" / "pretrained" / "reference_small.ckpt"
    data = ref.read_bytes()
    (w / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    shutil.copy(ref, w / "ref.ckpt")
    shutil.copy(REPO / "tests" / "fixtures" / "score_sde_tiny" / "checkpoint.pth", w / "score_sde.pth")


def _configs(w: Path) -> None:
    (w / "c_empty.yaml").write_text("")
    (w / "c_syntax.yaml").write_text("model:\n  class_path: [unclosed\n  init_args: {\n")
    (w / "c_model_os.yaml").write_text(
        f"model:\n  class_path: os.system\n  init_args:\n    command: touch {w / MARKER}\n"
    )
    (w / "c_data_subprocess.yaml").write_text(
        f"data:\n  class_path: subprocess.run\n  init_args:\n    args: [touch, {w / MARKER}]\n"
    )
    (w / "c_pytag.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {w / MARKER}"]\n')
    (w / "c_logger_os.yaml").write_text(
        f"trainer:\n  logger:\n    class_path: os.system\n    init_args:\n      command: touch {w / MARKER}\n"
    )
    (w / "c_callback_os.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: os.system\n      init_args:\n"
        f"        command: touch {w / MARKER}\n"
    )
    (w / "c_unknown_key.yaml").write_text("trainer:\n  max_stepz: 3\n")
    (w / "c_nodata.yaml").write_text("trainer:\n  max_steps: 3\n")
    (w / "c_data_os.yaml").write_text(
        f"data:\n  class_path: os.system\n  init_args:\n    command: touch {w / MARKER}\n"
    )
    (w / "c_missing_source.yaml").write_text(
        "data:\n  class_path: datamodules.datamodule.LowFieldDataModule\n"
        "  init_args:\n    source: /nonexistent/folder\n"
    )
    (w / "c_binary.yaml").write_bytes(np.random.default_rng(2).bytes(2048))
    broken = w / "broken_src"
    broken.mkdir()
    for i in range(3):
        (broken / f"sub-{i}.nii.gz").write_bytes(np.random.default_rng(i).bytes(512))
    (w / "c_broken_source.yaml").write_text(
        "data:\n  class_path: datamodules.datamodule.LowFieldDataModule\n"
        f"  init_args:\n    source: {broken}\n"
    )
    (w / "c_data_ok.yaml").write_text(
        "data:\n  class_path: datamodules.datamodule.LowFieldDataModule\n  init_args:\n"
        "    source: {class_path: BundledSource, init_args: {n_train: 1, n_val: 1}}\n"
        "    loader: {num_workers: 0}\n    slices: {eval_per_volume: 1}\n"
    )
    (w / "readonly").mkdir()
    (w / "afile").write_text("a file, not a folder\n")


def cases() -> list[Case]:
    """Every probe case (argv uses `{W}` for the scratch folder), in the order they run."""
    c: list[Case] = []
    W = "{W}"

    def each(group: str, items, name, argv, outputs=(), **kw) -> None:
        """One `group` case per item: named `name(item)`, running `argv(item)`, with the `outputs` (or
        `outputs(item)`) and the other `Case` fields `kw`."""
        for item in items:
            outs = outputs(item) if callable(outputs) else outputs
            c.append(Case(group, name(item), argv(item), outputs=outs, **kw))

    def option(opt: list[str]) -> str:  # a case's name from the arguments it adds
        return "option " + " ".join(opt).replace(W + "/", "")

    bad_niftis = [
        "missing.nii.gz", "empty.nii.gz", "random.nii.gz", "text.nii.gz", "truncated.nii.gz", "truncated.nii",
        "gz_garbage.nii.gz", "d2.nii.gz", "d4.nii.gz", "d5.nii.gz", "complex.nii.gz", "nan.nii.gz",
        "inf.nii.gz", "neginf.nii.gz", "zeros.nii.gz", "negative.nii.gz", "tiny1.nii.gz", "tiny2.nii.gz",
        "lines.nii.gz", "liar.nii", "folder.nii.gz", "devnull.nii.gz", "dangling.nii.gz", "good.txt",
    ]
    # degrade: bad inputs, bad options, bad outputs, valid inputs
    each("degrade", bad_niftis, "input {}".format,
         lambda n: ["degrade", f"{W}/{n}", f"{W}/out_d.nii.gz", "--regime", "noise"], ("out_d.nii.gz",))
    good_d = ["degrade", f"{W}/good.nii.gz", f"{W}/out_d.nii.gz"]
    degrade_options = [
        ["--regime", "bogus"],
        ["--regime", ""],
        *(["--regime", "noise", *opt] for opt in (
            ["--snr-db", "nan"], ["--snr-db", "inf"], ["--snr-db", "-1000"], ["--snr-db", "1e9"],
            ["--snr-db", "abc"], ["--seed", "-1"], ["--seed", "4294967296"], ["--seed", "1.5"],
            ["--seed", "abc"], ["--slice-axis", "3"], ["--slice-axis", "-4"], ["--slice-axis", "x"],
            ["--slice-axis", "0"], ["--batch-size", "0"], ["--batch-size", "-5"], ["--noise-level", "bogus"],
            ["--kspace-out", f"{W}/k.txt"], ["--kspace-out", f"{W}/nodir/k.h5"],
            ["--kspace-out", f"{W}/out_d.nii.gz"],
        )),
    ]
    each("degrade", degrade_options, lambda opt: "option " + " ".join(opt[2:] or opt).replace(W, ""),
         lambda opt: good_d + opt, ("out_d.nii.gz", "k.txt"))
    each("degrade", ("out.txt", "nodir/out.nii.gz", ".", "afile/out.nii.gz", "good.nii.gz", "folder.nii.gz",
                     "readonly/out.nii.gz"),
         "output {}".format, lambda out: ["degrade", f"{W}/good.nii.gz", f"{W}/{out}", "--regime", "noise"],
         lambda out: () if "good" in out else (out,))
    c.append(Case("degrade", "no arguments", ["degrade"]))
    for name, extra in (
        ("good.nii.gz", []),
        ("cube.nii.gz", ["--slice-axis", "0"]),
        ("int16.nii.gz", []),
        ("small7.nii.gz", []),
        ("space name.nii.gz", []),
        ("ünïcødé.nii.gz", []),
        ("huge_values.nii.gz", []),
        ("constant.nii.gz", []),
    ):
        acc = f"acc_{len(c)}.nii.gz"
        c.append(Case("degrade", f"valid {name} {' '.join(extra)}".strip(),
                      ["degrade", f"{W}/{name}", f"{W}/{acc}", "--regime", "noise_blur", "--seed", "1"]
                      + extra,
                      expect="accept", outputs=(acc,)))

    # reconstruct
    rec = ["--ckpt", "reference-small", "--regime", "noise_blur_t2star_b0"]
    out_r = ("out_r.nii.gz",)
    each("reconstruct", bad_niftis, "input {}".format,
         lambda n: ["reconstruct", f"{W}/{n}", f"{W}/out_r.nii.gz"] + rec, out_r)
    low = ["reconstruct", f"{W}/low.nii.gz", f"{W}/out_r.nii.gz"]
    each("reconstruct", ("missing.h5", "k_text.h5", "k_empty.h5", "k_nokspace.h5", "k_real.h5", "k_shape.h5",
                         "k_2d.h5", "k_nan.h5", "k_zero.h5", "k_sigma0.h5", "k_sigmaneg.h5", "k_sigmanan.h5",
                         "k_regime.h5", "k_b0nan.h5", "good.nii.gz"),
         "--kspace {}".format, lambda k: low + rec + ["--kspace", f"{W}/{k}"], out_r)
    c.append(Case("reconstruct", "--kspace of 3 slices, input of 2",
                  ["reconstruct", f"{W}/low_two.nii.gz", f"{W}/out_r.nii.gz"] + rec
                  + ["--kspace", f"{W}/low_k.h5"],
                  outputs=out_r))
    each("reconstruct", ("missing.json", "p_broken.json", "p_list.json", "p_empty.json", "p_fewer.json",
                         "p_nan.json", "p_negative.json", "p_wrongregime.json"),
         "--params {}".format, lambda p: low + rec + ["--params", f"{W}/{p}"], out_r)
    each("reconstruct", (*BAD_CHECKPOINTS, "good.nii.gz"), "--ckpt {}".format,
         lambda ck: low + ["--ckpt", f"{W}/{ck}", "--regime", "noise_blur_t2star_b0"], out_r)
    c.append(Case("reconstruct", "--ckpt unknown name",
                  low + ["--ckpt", "reference-huge", "--regime", "noise"], outputs=out_r))
    reconstruct_options = [
        ["--regime", "bogus"], ["--steps", "0"], ["--steps", "-1"], ["--steps", "1000000000"],
        ["--steps", "2.5"], ["--samples", "0"], ["--samples", "-1"], ["--samples", "1000000000"],
        ["--samples", "4"], ["--sampler", "bogus"], ["--t0", "-1"], ["--t0", "2"], ["--t0", "nan"],
        ["--t0-ratio", "-1"], ["--stop-ratio", "nan"], ["--dc", "bogus"], ["--dc-lambda", "-1"],
        ["--dc-lambda", "nan"], ["--dc-lambda", "inf"], ["--dc-floor", "-1"], ["--dc-weight", "nan"],
        ["--noise-sigma", "-1"], ["--noise-sigma", "0"], ["--noise-sigma", "nan"], ["--noise-sigma", "inf"],
        ["--seed", "-1"], ["--seed", "99999999999"], ["--slice-axis", "5"], ["--device", "cuda"],
        ["--device", "nonsense"], ["--batch-size", "0"], ["--std-out", f"{W}/std.nii.gz"],
        ["--sampler", "warm_ddim", "--samples", "2", "--std-out", f"{W}/std.txt"],
        ["--sampler", "warm_ddim", "--samples", "2", "--std-out", f"{W}/out_r.nii.gz"],
    ]
    each("reconstruct", reconstruct_options, option,  # a --regime option replaces the default one
         lambda opt: low + (["--ckpt", "reference-small"] if opt[0] == "--regime" else rec) + opt,
         ("out_r.nii.gz", "std.nii.gz", "std.txt"))
    each("reconstruct",
         ("out.txt", "nodir/out.nii.gz", ".", "afile/out.nii.gz", "low.nii.gz", "readonly/o.nii.gz"),
         "output {}".format, lambda out: ["reconstruct", f"{W}/low.nii.gz", f"{W}/{out}"] + rec,
         lambda out: () if out == "low.nii.gz" else (out,))
    c.append(Case("reconstruct", "no arguments", ["reconstruct"]))
    c.append(Case("reconstruct", "valid: README pair", low + rec + ["--kspace", f"{W}/low_k.h5"],
                  expect="accept", outputs=out_r))
    c.append(Case("reconstruct", "valid: NIfTI + its params sidecar",
                  ["reconstruct", f"{W}/low.nii.gz", f"{W}/acc_r2.nii.gz", "--ckpt", f"{W}/ref.ckpt",
                   "--regime", "noise_blur_t2star_b0"],
                  expect="accept", outputs=("acc_r2.nii.gz",)))
    c.append(Case("reconstruct", "valid: 2 samples + std",
                  low[:2] + [f"{W}/acc_r3.nii.gz"] + rec
                  + ["--kspace", f"{W}/low_k.h5", "--sampler", "warm_ddim", "--samples", "2", "--steps", "3",
                     "--std-out", f"{W}/acc_r3_std.nii.gz"],
                  expect="accept", outputs=("acc_r3.nii.gz", "acc_r3_std.nii.gz")))

    # metrics: (REF, PRED) pairs
    def pair(ab: tuple[str, str]) -> list[str]:
        return ["metrics", f"{W}/{ab[0]}", f"{W}/{ab[1]}"]

    each("metrics", (("missing.nii.gz", "good.nii.gz"), ("good.nii.gz", "missing.nii.gz"),
                     ("good.nii.gz", "twoslice.nii.gz"), ("random.nii.gz", "good.nii.gz"),
                     ("nan.nii.gz", "good.nii.gz"), ("good.nii.gz", "inf.nii.gz"),
                     ("zeros.nii.gz", "good.nii.gz"),
                     ("tiny2.nii.gz", "tiny2.nii.gz"), ("lines.nii.gz", "lines.nii.gz"),
                     ("negative.nii.gz", "good.nii.gz"), ("complex.nii.gz", "good.nii.gz"),
                     ("d4.nii.gz", "good.nii.gz"), ("folder.nii.gz", "good.nii.gz")),
         "{0[0]} vs {0[1]}".format, pair)
    c.append(Case("metrics", "no arguments", ["metrics"]))
    each("metrics", (("good.nii.gz", "other.nii.gz"), ("good.nii.gz", "good.nii.gz"),
                     ("good.nii.gz", "good.nii"), ("small7.nii.gz", "small7.nii.gz")),
         "valid {0[0]} vs {0[1]}".format, pair, expect="accept")

    # export
    each("export", BAD_CHECKPOINTS, "--ckpt {}".format,
         lambda ck: ["export", "--ckpt", f"{W}/{ck}", f"{W}/out_e.pth", "--force"], ("out_e.pth",))
    each("export", ("out.txt", "nodir/o.pth", ".", "afile/o.pth", "readonly/o.pth"), "output {}".format,
         lambda out: ["export", "--ckpt", "reference-small", f"{W}/{out}", "--force"], lambda out: (out,))
    c.append(Case("export", "--weights bogus",
                  ["export", "--ckpt", "reference-small", f"{W}/out_e.pth", "--weights", "bogus"],
                  outputs=("out_e.pth",)))
    c.append(Case("export", "--config-out .txt",
                  ["export", "--ckpt", "reference-small", f"{W}/out_e.pth", "--force", "--config-out",
                   f"{W}/cfg.txt"],
                  outputs=("out_e.pth", "cfg.txt")))
    c.append(Case("export", "no arguments", ["export"]))
    c.append(Case("export", "valid reference-small --force",
                  ["export", "--ckpt", "reference-small", f"{W}/acc_e.pth", "--force"],
                  expect="accept", outputs=("acc_e.pth",)))

    # preview
    each("preview", (*BAD_DATA_CONFIGS, "good.nii.gz"), "--config {}".format,
         lambda cfg: ["preview", "--config", f"{W}/{cfg}", "--out", f"{W}/prev.png"], ("prev.png",))
    each("preview", (["--out", f"{W}/prev.txt"], ["--out", f"{W}/nodir/p.png"], ["--volumes-per-split", "0"],
                     ["--volumes-per-split", "-2"], ["--out", f"{W}/readonly/p.png"]),
         option,  # an option other than --out comes with the default one
         lambda opt: ["preview", "--config", f"{W}/c_data_ok.yaml"]
         + (opt if opt[0] == "--out" else ["--out", f"{W}/prev.png"] + opt),
         ("prev.png", "prev.txt"))
    c.append(Case("preview", "valid bundled",
                  ["preview", "--config", f"{W}/c_data_ok.yaml", "--out", f"{W}/acc_p.png",
                   "--volumes-per-split", "1"],
                  expect="accept", outputs=("acc_p.png",)))

    # evaluate
    ev = ["evaluate", "--ckpt", "reference-small", "--regimes", "noise", "--baselines", "none",
          "--max-slices-per-volume", "1"]
    each("evaluate", BAD_DATA_CONFIGS, "--config {}".format,
         lambda cfg: ev + ["--config", f"{W}/{cfg}", "--out", f"{W}/ev"], ("ev",))
    ok = ev + ["--config", f"{W}/c_data_ok.yaml"]
    evaluate_options = [
        ["--out", "."], ["--out", ""], ["--out", f"{W}/afile"], ["--out", f"{W}/readonly/ev"],
        ["--out", f"{W}/afile/ev"],
        *(["--out", f"{W}/ev", *opt] for opt in (
            ["--regimes", "bogus"], ["--baselines", "bogus"], ["--also", "bogus"], ["--also", "warm_ddim:0"],
            ["--also", "tweedie:3"], ["--max-slices-per-volume", "0"], ["--batch-size", "0"],
            ["--seed", "-1"], ["--steps", "0"], ["--samples", "1000000000"], ["--sampler", "bogus"],
            ["--reference-pc-steps", "-1"], ["--device", "cuda"],
        )),
    ]
    each("evaluate", evaluate_options, option, lambda opt: ok + opt, ("ev",))
    each("evaluate", ("missing.ckpt", "random.ckpt", "payload.ckpt", "payload_zip.ckpt",
                      "other_lightning.ckpt", "truncated.ckpt"),
         "--ckpt {}".format,
         lambda ck: ["evaluate", "--ckpt", f"{W}/{ck}", "--config", f"{W}/c_data_ok.yaml", "--out",
                     f"{W}/ev"],
         ("ev",))
    c.append(Case("evaluate", "no arguments", ["evaluate"]))
    c.append(Case("evaluate", "valid bundled, noise, 1 slice", ok + ["--out", f"{W}/acc_ev"],
                  expect="accept", outputs=("acc_ev/results.csv", "acc_ev/results.md")))

    # fit / validate / test / predict (LightningCLI)
    q = ["--config", str(QUICKSTART)]
    root = ["--trainer.default_root_dir={W}/run"]
    each("fit", ("missing.yaml", "c_empty.yaml", "c_syntax.yaml", "c_model_os.yaml", "c_data_subprocess.yaml",
                 "c_pytag.yaml", "c_logger_os.yaml", "c_callback_os.yaml", "c_unknown_key.yaml",
                 "c_binary.yaml", "c_missing_source.yaml", "c_broken_source.yaml", "good.nii.gz"),
         "--config {}".format, lambda cfg: ["fit"] + q + TINY_FIT + root + ["--config", f"{W}/{cfg}"],
         ("run",))
    fit_options = [
        "--trainer.logger=os.system", "--trainer.max_steps=abc", "--data.init_args.loader.batch_size=abc",
        "--data.init_args.loader.batch_size=0", "--model.init_args.optim.lr=-1",
        "--model.init_args.optim.lr=nan",
        "--seed_everything=-1", "--seed_everything=99999999999", "--seed_everything=abc",
        "--model.init_args.net.nf=0", "--model.init_args.net.ch_mult=[]",
        "--data.init_args.slices.crop_size=-1",
        "--data.init_args.regimes=[bogus]", "--model.init_args.pretrained.path=/nonexistent.pth",
        f"--model.init_args.pretrained.path={W}/payload.ckpt",
        f"--model.init_args.pretrained.path={W}/random.ckpt",
        "--ckpt_path=/nonexistent.ckpt", f"--ckpt_path={W}/payload.ckpt", f"--ckpt_path={W}/random.ckpt",
        f"--ckpt_path={W}/other_lightning.ckpt", "--data.init_args.source=/nonexistent",
        "--model.init_args.bogus_option=1", "--trainer.callbacks+=os.system",
        "--data.init_args.supervised_t0=[0.5,0.1]",
    ]
    each("fit", fit_options, lambda opt: option([opt]), lambda opt: ["fit"] + q + TINY_FIT + root + [opt],
         ("run",))
    each("fit", ("afile/run", "readonly/run"), "default_root_dir {}".format,
         lambda bad_root: ["fit"] + q + TINY_FIT + [f"--trainer.default_root_dir={W}/{bad_root}"],
         lambda bad_root: (bad_root,))
    c.append(Case("fit", "valid tiny run", ["fit"] + q + TINY_FIT + ["--trainer.default_root_dir={W}/fitok"],
                  expect="accept", outputs=("fitok/checkpoints/last.ckpt",)))
    for delay, signum in ((0.3, signal.SIGINT), (2.0, signal.SIGINT), (4.0, signal.SIGINT),
                          (2.0, signal.SIGTERM)):
        c.append(Case("fit", f"{signal.Signals(signum).name} after {delay} s",
                      ["fit"] + q + TINY_FIT
                      + ["--trainer.max_steps=100000", f"--trainer.default_root_dir={W}/sig{delay}{signum}"],
                      expect="interrupt", signal_after=delay, signum=signum))
    for sub in ("validate", "test"):
        for opt in ("--ckpt_path=/nonexistent.ckpt", f"--ckpt_path={W}/payload.ckpt",
                    "--trainer.logger=os.system"):
            c.append(Case(sub, option([opt]), [sub] + q + TINY_FIT + root + [opt], outputs=("run",)))
    pred = ["predict"] + q + TINY_FIT + root
    predict_options = [
        *(f"--data.init_args.predict.path={path}" for path in (
            "/nonexistent.nii.gz", f"{W}/random.nii.gz", f"{W}/nan.nii.gz", f"{W}/tiny1.nii.gz",
            f"{W}/negative.nii.gz", f"{W}/zeros.nii.gz",
        )),
        "--sampling.steps=0", "--sampling.sampler=bogus", "--sampling.steps=1000000000",
        f"--ckpt_path={W}/payload.ckpt",
    ]
    each("predict", predict_options, lambda opt: option([opt]), lambda opt: pred + [opt], ("run",))
    c.append(Case("predict", "unwritable predictions folder",
                  ["predict"] + q + TINY_FIT
                  + [f"--trainer.default_root_dir={W}/afile/run",
                     f"--data.init_args.predict.path={W}/low.nii.gz", f"--ckpt_path={W}/ref.ckpt"],
                  outputs=("afile/run",)))
    c.append(Case("cli", "unknown command", ["frobnicate"]))
    c.append(Case("cli", "empty command", [""]))
    for case in c:  # a missing output folder is created (`lfmri_utils.files.check_output_file`): valid
        if any("nodir/" in a for a in case.argv):
            case.expect, case.outputs = "accept", ("nodir",)
        if case.name == "option --noise-sigma 0":  # the user asserts noise-free data: hard projection
            case.expect, case.outputs = "accept", ("out_r.nii.gz",)
        if case.group == "evaluate" and case.name in ("option --out .", "option --out "):  # into the
            case.expect, case.outputs = "accept", ("results.csv",)  # working folder, its other files kept
    return c


def _snapshot(w: Path) -> dict[str, str]:
    """Content hash of every input file (names not starting with out/acc/run/ev/fit/sig/prev/std/k./cfg)."""
    skip = ("out", "acc", "run", "ev", "fitok", "sig", "prev", "std", "k.txt", "cfg", "nodir", MARKER)
    digest = {}
    for path in sorted(w.rglob("*")):
        rel = path.relative_to(w).as_posix()
        if rel.startswith(skip) or not path.is_file() or path.is_symlink():
            continue
        digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _classify(case: Case, w: Path, rc: int | None, err: str, before: dict, after: dict, new: set[str]) -> str:
    """'clean' or the defect's short description (`new`: the paths the case created)."""
    if rc is None:
        return f"timeout ({TIMEOUT_S} s)"
    if "Traceback" in err:
        return "traceback"
    if (w / MARKER).exists():
        return "payload ran"
    changed = sorted(k for k in before if before[k] != after.get(k))
    if changed:
        return f"input changed: {', '.join(changed)}"
    lines = [line for line in err.splitlines() if line.strip()]
    if case.expect == "accept":
        missing = [o for o in case.outputs if not (w / o).exists()]
        if rc != 0:
            return f"valid input refused (exit {rc})"
        return f"outputs missing: {', '.join(missing)}" if missing else "clean"
    if case.expect == "interrupt":
        return "clean" if rc == 128 + case.signum else f"exit {rc}, expected {128 + case.signum}"
    if rc != 2:
        return f"exit {rc}" + (" (accepted)" if rc == 0 else "")
    usage = sum(1 for line in lines if line.startswith("usage:") or line.startswith(" "))
    errors = [line for line in lines if "error:" in line]
    if not errors:
        return "no error line"
    if len(lines) - usage > 1:
        return f"{len(lines) - usage} lines on stderr"
    return f"wrote {', '.join(sorted(new))}" if new else "clean"


def run_case(case: Case, w: Path) -> Case:
    """Run one case in `w` and fill `case.result`."""
    argv = [str(LFMRI)] + [a.replace("{W}", str(w)) for a in case.argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    before = _snapshot(w)
    listed = {p.relative_to(w).as_posix() for p in w.rglob("*")}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if case.signal_after is not None:
            time.sleep(case.signal_after)
            proc.send_signal(case.signum)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    new = {p.relative_to(w).as_posix() for p in w.rglob("*")} - listed - {MARKER}
    top = {n for n in new if not any(n.startswith(m + "/") for m in new)}
    verdict = _classify(case, w, rc, err, before, _snapshot(w), top)
    for name in top:  # leave the next case a clean slate: remove what this one created, nothing else
        target = w / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    (w / MARKER).unlink(missing_ok=True)
    case.result = {
        "command": " ".join(argv[1:]).replace(str(w), "W"),
        "rc": rc,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - start, 2),
        "stderr_tail": err.strip().splitlines()[-3:] if err.strip() else [],
        "stderr_lines": len([line for line in err.splitlines() if line.strip()]),
    }
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for probe.md and probe.json")
    parser.add_argument("--only", default="", help="comma-separated groups (degrade, reconstruct, fit, ...)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (interrupt cases run alone)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases() if not args.only or c.group in args.only.split(",")]
    if os.geteuid() == 0:  # a read-only folder does not stop root: those cases say nothing here
        todo = [c for c in todo if not any("readonly" in a for a in c.argv)]
    with tempfile.TemporaryDirectory(prefix="lfmri_probe_") as tmp:
        base = Path(tmp)
        (base / "template").mkdir()
        build_inputs(base / "template")
        os.chmod(base / "template" / "readonly", 0o555)
        # every case group works in its own copy, so parallel cases do not see each other's outputs
        groups = sorted({c.group for c in todo})
        for g in groups:
            shutil.copytree(base / "template", base / g, symlinks=True)
        timed = [c for c in todo if c.signal_after is None]
        lanes: dict[str, list[Case]] = {g: [c for c in timed if c.group == g] for g in groups}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda g: [run_case(c, base / g) for c in lanes[g]], groups))
        for c in todo:
            if c.signal_after is not None:
                run_case(c, base / c.group)
    rows, defects = [], []
    for g in [*sorted({c.group for c in todo}), None]:
        mine = [c for c in todo if g is None or c.group == g]
        bad = [c for c in mine if c.result["verdict"] != "clean"]
        refused = sum(c.expect != "accept" and c not in bad for c in mine)
        accepted = sum(c.expect == "accept" and c not in bad for c in mine)
        label = "**all**" if g is None else g
        rows.append(f"| {label} | {len(mine)} | {refused} | {accepted} | {len(bad)} |")
        defects += bad if g is not None else []
    table = [
        "| command | tried | bad input refused cleanly | valid input accepted | defects |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = [
        "# lfmri hostile-input probe",
        "",
        f"`python experiments/probe/hostile_inputs.py --out {args.out}`",
        "",
        *table,
        "",
    ]
    if defects:
        text += ["## Defects", "", "| command | case | verdict | last stderr line |", "|---|---|---|---|"]
        for c in defects:
            last = (c.result["stderr_tail"] or [""])[-1].replace("|", "\\|")[:160]
            text.append(f"| {c.group} | {c.name} | {c.result['verdict']} | {last} |")
    (out / "probe.md").write_text("\n".join(text) + "\n")
    (out / "probe.json").write_text(
        json.dumps(
            [dict(group=c.group, name=c.name, expect=c.expect, **c.result) for c in todo],
            indent=1,
            ensure_ascii=False,
        )
    )
    print("\n".join(text))
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
