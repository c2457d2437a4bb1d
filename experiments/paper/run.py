"""The paper's protocol end to end: clinical weights -> fine-tune -> evaluate -> the table beside the paper's.

Full scale (your mouse NIfTI directory and a clinical score_sde checkpoint; a GPU):

    python experiments/paper/run.py /data/mouse_t2w --pretrained clinical.pth [--out runs/paper]

  1. import the clinical weights: `--model.init_args.pretrained.path=clinical.pth` of
     configs/finetune_mouse.yaml stacked on configs/model/ddpm_34m.yaml (34.4M DDPM, 256x256, 2 channels,
     bf16);
  2. fine-tune 15 epochs with DSM + the supervised loss (`lfmri fit`);
  3. `lfmri evaluate` on 10 held-out subjects (OUT/split.yaml: 10 test and --n-val validation subjects chosen
     by a seeded hash of the subject ids, the rest train; or --split-file) in the four regimes, with the
     baselines tuned on the validation subjects;
  4. OUT/comparison.md: the measured table next to the paper's (compare.py).
  `--scratch` also trains the same model from scratch for the same steps and evaluates it on the same volumes.

Small scale on the shipped data (CPU, minutes; `DATA` = `bundled`):

    python experiments/paper/run.py bundled --small [--out runs/paper_small] [--jobs 2]

  0. no clinical checkpoint can be downloaded, so the prior shipped with lfmri stands in for it
     (`--pretrained reference-small`, the default with --small: the quickstart network trained for ~1 h on
     the bundled axial MNI slices, configs/reference_small.yaml); a Lightning checkpoint is exported in
     score_sde's format with `lfmri export` (OUT/clinical.pth + .json), as a clinical checkpoint would come;
  1.-2. fine-tuned (small_finetune.yaml on configs/quickstart.yaml, axial slices, lr 1e-4, a few minutes) from
     that file through the same import path; the same model is also trained from scratch for the same steps,
     at the quickstart's own rate (lr 1e-3: a from-scratch run at a fine-tune's rate would be a straw man);
  3.-4. both are evaluated on the bundled source's test subject (Colin27, a real held-out brain) and compared.

Every command is printed and recorded with its wall time in OUT/protocol.md and OUT/protocol.json; the
resolved configuration of each fit is written to OUT/<stage>/config.yaml (evaluation reads its data block).
Extra overrides for every fit: `--set trainer.accelerator=gpu --set data.init_args.loader.batch_size=4` ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FULL_CONFIG = REPO / "configs" / "finetune_mouse.yaml"
#: a run config holds only what it sets, stacked on a base: the full-scale fits on the 34.4M network block,
#: the small ones (--small) on the quickstart config (its 1.1M network, the reference prior's)
NETWORK_34M = REPO / "configs" / "model" / "ddpm_34m.yaml"
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SMALL_FINETUNE = HERE / "small_finetune.yaml"
#: what the protocol writes under OUT (only these are removed by --overwrite)
OUTPUTS = ("clinical.pth", "clinical.json", "split.yaml", "finetune", "scratch",
           "eval_finetune", "eval_scratch", "eval_prior", "comparison.md", "protocol.md", "protocol.json")


class ProtocolError(RuntimeError):
    """A stage failed or an argument is wrong; the message says which."""


@dataclass
class Step:
    """One recorded command: its stage, the command line as a user would type it, and its wall time (s)."""

    stage: str
    command: str
    wall_s: float
    log: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The paper's protocol: import, fine-tune, evaluate, compare.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("data", help="'bundled' (the shipped data) or a directory of high-field NIfTI volumes")
    p.add_argument("--pretrained", default=None,
                   help="clinical prior: a score_sde checkpoint (.pth), or an lfmri Lightning checkpoint or "
                        "shipped name, exported first (default with --small: reference-small)")
    p.add_argument("--pretrained-config", default=None, help="the checkpoint's score_sde config.json")
    p.add_argument("--small", action="store_true", help="small-scale protocol (CPU, minutes)")
    p.add_argument("--out", default=None, help="output folder (default runs/paper or runs/paper_small)")
    p.add_argument("--overwrite", action="store_true", help="replace this protocol's outputs in --out")
    p.add_argument("--config", default=None,
                   help="fine-tune config, stacked on configs/model/ddpm_34m.yaml (--small: on "
                        "configs/quickstart.yaml); default: configs/finetune_mouse.yaml (--small: "
                        "experiments/paper/small_finetune.yaml)")
    p.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=None,
                   help="also train from scratch for the same steps (default: on with --small)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: the config's)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tune max_steps (default: config's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="every fit: the model's training size and the data's training crop_size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LightningCLI override for every fit, e.g. trainer.accelerator=gpu")
    p.add_argument("--split-file", default=None, help="YAML {train, val, test} subject lists (NIfTI data)")
    p.add_argument("--n-test", type=int, default=10, help="held-out test subjects (default 10, the paper's)")
    p.add_argument("--n-val", type=int, default=2, help="validation subjects (baseline tuning, val loss)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the subject split")
    p.add_argument("--sampler", default=None,
                   help="lfmri evaluate --sampling.sampler (default: the registry's)")
    p.add_argument("--eval-steps", type=int, default=None, help="lfmri evaluate --sampling.steps")
    p.add_argument("--t0", type=float, default=None, help="lfmri evaluate --sampling.t0")
    p.add_argument("--dc", default=None, help="lfmri evaluate --sampling.dc (default: the sampler's)")
    p.add_argument("--dc-weight", type=float, default=None, help="lfmri evaluate --sampling.dc_weight")
    p.add_argument("--dc-lambda", type=float, default=None, help="lfmri evaluate --sampling.dc_lambda")
    p.add_argument("--dc-floor", type=float, default=None, help="lfmri evaluate --sampling.dc_floor")
    p.add_argument("--max-slices-per-volume", type=int, default=None, help="lfmri evaluate option")
    p.add_argument("--baselines", default="all", help="lfmri evaluate --baselines (all | none | tv,nlm)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="lfmri evaluate --batch-size")
    p.add_argument("--device", default="auto", help="lfmri evaluate --device")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                   help="2: fine-tune and scratch fits (and evaluations) run side by side, output to logs")
    args = p.parse_args(argv)
    if args.scratch is None:
        args.scratch = args.small
    if args.config is None:
        args.config = str(SMALL_FINETUNE if args.small else FULL_CONFIG)
    if args.out is None:
        args.out = "runs/paper_small" if args.small else "runs/paper"
    if not args.small and not args.pretrained:
        p.error("the full protocol needs --pretrained CLINICAL.pth (a score_sde checkpoint); "
                "--small starts from the shipped reference prior")
    if args.pretrained is None:
        args.pretrained = "reference-small"
    return args


# ------------------------------------------------------------------------------------------------ helpers
def lfmri_cmd(*args: str) -> list[str]:
    """The `lfmri` command as a child process of this interpreter (works without the console script)."""
    return [sys.executable, "-m", "lfmri.cli", *args]


def display(cmd: list[str]) -> str:
    """The command line as a user types it (`lfmri ...`, `python ...`), paths relative to the repository."""
    words = ["lfmri"] + cmd[3:] if cmd[1:3] == ["-m", "lfmri.cli"] else ["python"] + cmd[1:]
    repo = str(REPO) + os.sep
    return shlex.join(w.replace(repo, "") for w in words)


def base_lr(config: Path) -> float:
    """The learning rate a base config sets (`model.init_args.optim.lr`)."""
    return float(yaml.safe_load(config.read_text())["model"]["init_args"]["optim"]["lr"])


def resolve_config(fit_args: list[str]) -> str:
    """`lfmri fit <fit_args> --print_config`, in this process: the resolved YAML (interpolations done)."""
    from lfmri.lightning_cli import run_lightning_cli
    from lfmri_utils.errors import InputError

    buffer, argv = io.StringIO(), sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when it is given args beside a command line of its own
    try:
        with contextlib.redirect_stdout(buffer):
            run_lightning_cli(["fit", *fit_args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise ProtocolError(f"the fit arguments do not parse: lfmri fit {shlex.join(fit_args)}") from None
    except InputError as err:
        raise ProtocolError(f"the fit arguments do not parse ({err}): "
                            f"lfmri fit {shlex.join(fit_args)}") from None
    finally:
        sys.argv = argv
    return buffer.getvalue()


class Protocol:
    """Runs and records the stages; each command is a child process with this interpreter, cwd = the repo."""

    def __init__(self, out: Path, jobs: int) -> None:
        self.out, self.jobs, self.steps = out, jobs, []
        self.started = time.perf_counter()

    def run(self, stage: str, cmds: list[list[str]], names: list[str] | None = None) -> None:
        """Run commands, stop on the first failure. Side by side when jobs > 1: the first command keeps the
        console (Lightning's progress bar), the others write to OUT/<name>.log."""
        names = names or [stage] * len(cmds)
        parallel = self.jobs > 1 and len(cmds) > 1
        pairs = list(zip(cmds, names, strict=True))
        batches = [pairs] if parallel else [[pair] for pair in pairs]
        for batch in batches:
            procs, t0 = [], time.perf_counter()
            for i, (cmd, name) in enumerate(batch):
                print(f"\n[{name}] $ {display(cmd)}", flush=True)
                log = self.out / f"{name}.log" if parallel and i > 0 else None
                with open(log, "w") if log else contextlib.nullcontext() as fh:
                    err = subprocess.STDOUT if fh else None
                    proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=err)
                procs.append((proc, cmd, name, log))
            while procs:  # each command's own wall time, also side by side
                time.sleep(0.2)
                for item in [it for it in procs if it[0].poll() is not None]:
                    procs.remove(item)
                    proc, cmd, name, log = item
                    wall = time.perf_counter() - t0
                    self.steps.append(Step(name, display(cmd), round(wall, 1), str(log) if log else None))
                    if proc.returncode != 0:
                        for other in procs:  # stop the sibling we started, then report
                            other[0].terminate()
                            other[0].wait()
                        where = f" (see {log})" if log else ""
                        raise ProtocolError(f"stage {name} failed with exit code {proc.returncode}{where}: "
                                            f"{display(cmd)}")
                    print(f"[{name}] done in {wall:.1f} s", flush=True)

    def record(self, stage: str, command: str, wall_s: float) -> None:
        self.steps.append(Step(stage, command, round(wall_s, 1)))

    def write(self, settings: dict) -> None:
        total = time.perf_counter() - self.started
        payload = {"settings": settings, "steps": [asdict(s) for s in self.steps],
                   "total_wall_s": round(total, 1)}
        (self.out / "protocol.json").write_text(json.dumps(payload, indent=2) + "\n")
        lines = ["# Commands and wall times", "",
                 f"From the repository root; total wall time {total:.0f} s ({total / 60:.1f} min)"
                 + (", fine-tune and scratch side by side (--jobs 2)." if self.jobs > 1 else "."), "",
                 "| stage | wall (s) | command |", "|---|---|---|"]
        lines += [f"| {s.stage} | {s.wall_s:.1f} | `{s.command}` |" for s in self.steps]
        lines += validation_losses(self.out, [s.stage for s in self.steps])
        (self.out / "protocol.md").write_text("\n".join(lines) + "\n")


def validation_losses(out: Path, stages: list[str]) -> list[str]:
    """Markdown lines: each fit's validation losses (EMA weights) per validation, from its CSVLogger log."""
    import csv

    lines = []
    for stage in stages:
        logs = sorted((out / stage).glob("logs/version_*/metrics.csv"))
        rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("val/loss")] if logs else []
        if not rows:
            continue
        if not lines:
            lines = ["", "## Validation losses (EMA weights, the config's validation batches)", "",
                     "| fit | step | val/dsm | val/supervised | val/loss |", "|---|---|---|---|---|"]
        lines += [f"| {stage} | {int(r['step']) + 1} | {float(r['val/dsm']):.4f} | "
                  f"{float(r['val/supervised']):.4f} | {float(r['val/loss']):.4f} |" for r in rows]
    return lines


def is_lightning_checkpoint(name: str) -> bool:
    """A shipped short name (reference-small) or a file that `lfmri export` reads (a Lightning checkpoint)."""
    from diffusion.checkpoint import SHIPPED_CHECKPOINTS, load_torch_file

    if name in SHIPPED_CHECKPOINTS:
        return True
    if not Path(name).is_file():
        return False
    obj = load_torch_file(name, error=ProtocolError)
    return isinstance(obj, dict) and "state_dict" in obj


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create OUT; refuse to mix with an earlier run unless --overwrite (which removes only our outputs)."""
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ProtocolError(f"{out} holds an earlier run ({', '.join(existing)}); "
                            "pass --overwrite or another --out")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for log in out.glob("*.log"):
        log.unlink()
    out.mkdir(parents=True, exist_ok=True)


def data_overrides(data: str) -> list[str]:
    """LightningCLI overrides pointing a config's data module at `bundled` or a directory."""
    if data == "bundled":
        return ["--data.init_args.source=bundled"]
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise ProtocolError(f"{data}: no such data directory (or pass 'bundled')")
    return [f"--data.init_args.source={path}"]


def write_split(config_yaml: Path, out: Path, n_test: int, n_val: int, seed: int) -> Path:
    """OUT/split.yaml: n_test test and n_val val subjects of the config's source (seeded hash), rest train."""
    import yaml

    from datamodules.splits import hash_split
    from lfmri.data_config import load_datamodule

    dm = load_datamodule(config_yaml, split_file=None)
    subjects = sorted({r.subject for r in dm.source.records()})
    n = len(subjects)
    if n < n_test + n_val + 1:
        raise ProtocolError(f"the data holds {n} subject(s); the protocol holds out --n-test {n_test} and "
                            f"--n-val {n_val} and needs at least one to train on: lower them")
    split = hash_split(subjects, seed, val_fraction=n_val / n, test_fraction=n_test / n)
    if len(split.test) != n_test or len(split.val) != n_val:  # rounding guard: hash_split rounds n * fraction
        raise ProtocolError(f"could not split {n} subjects into {n_test} test / {n_val} val")
    path = out / "split.yaml"
    path.write_text(yaml.safe_dump({"train": split.train, "val": split.val, "test": split.test}))
    print(f"split: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test subjects -> {path}")
    return path


# ------------------------------------------------------------------------------------------------ protocol
def run_protocol(args: argparse.Namespace) -> Path:
    """All stages; returns OUT/comparison.md."""
    out = Path(args.out).expanduser().resolve()
    prepare_out(out, args.overwrite)
    proto = Protocol(out, args.jobs)
    shared = [f"--{kv}" for kv in args.overrides]  # every fit: --set overrides and the image size
    if args.image_size:
        shared += [f"--model.init_args.net.image_size={args.image_size}",
                   f"--data.init_args.slices.crop_size={args.image_size}"]

    # 0. the clinical prior in score_sde's format: a Lightning checkpoint (or the shipped reference-small) is
    #    exported first, so the fine-tune takes the import path of a clinical checkpoint
    pretrained, pretrained_config = args.pretrained, args.pretrained_config
    lightning = None  # the starting prior as an lfmri checkpoint: evaluated too (the fine-tune must not lose)
    if is_lightning_checkpoint(pretrained):
        lightning = pretrained
        pretrained, pretrained_config = str(out / "clinical.pth"), str(out / "clinical.json")
        # --force: the small network has 8 GroupNorm groups, not score_sde's 32 (lfmri reads the JSON's)
        proto.run("export", [lfmri_cmd("export", "--ckpt", lightning, pretrained, "--force")])
    elif not Path(pretrained).is_file():
        raise ProtocolError(f"--pretrained {pretrained}: no such checkpoint file")

    # 1.-2. fine-tune from the clinical weights (and the same model from scratch)
    base = QUICKSTART if args.small else NETWORK_34M
    fit = ["--config", str(base), "--config", args.config, *data_overrides(args.data), *shared]
    fit += [f"--trainer.max_epochs={args.epochs}"] if args.epochs else []
    fit += [f"--trainer.max_steps={args.finetune_steps}"] if args.finetune_steps else []
    split_file = args.split_file
    if args.data != "bundled" and split_file is None:
        probe = out / "data_probe.yaml"
        probe.write_text(resolve_config(fit + ["--data.init_args.split_file=null"]))
        split_file = str(write_split(probe, out, args.n_test, args.n_val, args.split_seed))
        probe.unlink()
    if split_file:
        fit.append(f"--data.init_args.split_file={Path(split_file).resolve()}")
    models = {"finetune": [f"--model.init_args.pretrained.path={Path(pretrained).resolve()}"]
              + ([f"--model.init_args.pretrained.config={Path(pretrained_config).resolve()}"]
                 if pretrained_config else [])}
    if args.scratch:
        models["scratch"] = ["--model.init_args.pretrained=null"]
        if args.small:  # training from scratch at its own recipe's rate (the quickstart's), not a fine-tune's
            models["scratch"].append(f"--model.init_args.optim.lr={base_lr(QUICKSTART)}")
    cmds = []
    for name, extra in models.items():
        stage_args = fit + [f"--trainer.default_root_dir={out / name}", *extra]
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text(resolve_config(stage_args))
        cmds.append(lfmri_cmd("fit", *stage_args))
    proto.run("fit", cmds, names=list(models))

    # 3. evaluate every model on the same held-out volumes (the fine-tune stage's data block)
    options = ["--regimes", "all", "--batch-size", str(args.eval_batch_size),
               "--device", args.device]
    sampling = {"steps": args.eval_steps or None, "t0": args.t0, "sampler": args.sampler or None,
                "dc": args.dc or None, "dc_weight": args.dc_weight, "dc_lambda": args.dc_lambda,
                "dc_floor": args.dc_floor}  # lfmri evaluate --sampling.<SamplerOptions field>
    options += [arg for name, value in sampling.items() if value is not None
                for arg in (f"--sampling.{name}", str(value))]
    if args.max_slices_per_volume:
        options += ["--max-slices-per-volume", str(args.max_slices_per_volume)]
    cmds = []
    for i, name in enumerate(models):  # baselines once: they do not depend on the model
        cmds.append(lfmri_cmd("evaluate", "--ckpt", str(out / name / "checkpoints" / "last.ckpt"),
                              "--config", str(out / "finetune" / "config.yaml"),
                              "--out", str(out / f"eval_{name}"),
                              "--baselines", args.baselines if i == 0 else "none", *options))
    evaluated = list(models)
    if lightning is not None:  # the prior the fine-tune started from, on the same held-out volumes
        cmds.append(lfmri_cmd("evaluate", "--ckpt", lightning, "--config",
                              str(out / "finetune" / "config.yaml"), "--out", str(out / "eval_prior"),
                              "--baselines", "none", *options))
        evaluated.append("prior")
    proto.run("evaluate", cmds, names=[f"eval_{name}" for name in evaluated])

    # 4. the table next to the paper's
    import compare  # experiments/paper/compare.py, beside this file

    labels = {"finetune": "fine-tuned", "scratch": "from scratch", "prior": "starting prior"}
    compare_args = [f"{labels[name]}={out / f'eval_{name}' / 'results.csv'}" for name in evaluated]
    title = "lfmri (small transfer from reference-small)" if args.small else "lfmri"
    compare_args += ["--out", str(out / "comparison.md"), "--title", f"{title} vs the paper"]
    t0 = time.perf_counter()
    print()
    if compare.main(compare_args) != 0:
        raise ProtocolError("compare.py failed")
    command = display([sys.executable, str(HERE / "compare.py"), *compare_args])
    proto.record("compare", command, time.perf_counter() - t0)
    proto.write(vars(args))
    print(f"\nwrote {out / 'comparison.md'}, {out / 'protocol.md'} (commands and wall times)")
    return out / "comparison.md"


def main(argv: list[str] | None = None) -> int:
    """Entry point; a failed stage or a bad argument -> one line on stderr, exit code 2."""
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    try:
        run_protocol(args)
    except ProtocolError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
