"""`lfmri evaluate`: the paper's protocol on the held-out (test) subjects of a config's data module.

    lfmri evaluate --ckpt C --config CFG --regimes all --out DIR [--baselines all]
                   [--sampling.sampler warm_ddim] [--sampling.steps N] ... [--also NAME[:K]]

CFG is a LightningCLI YAML; only its `data:` block (class_path + init_args) is used. Degradations are the
data module's deterministic test degradations (a pure function of volume id, slice, regime and its seed); the
baselines (`lfmri.baselines`: the degraded input; TV and NL-means on the magnitude or on the complex image;
BM3D when the optional extra is installed; model-based TV with the forward operator) are tuned once per
regime on the data module's validation subjects; each result row records the method's seconds per slice.
`--reference-pc-steps N` adds the paper's reference sampler (method `lfmri_pc`) on the same slices and seeds.
Writes DIR/results.csv, results.md, results.json, slices.csv (per-slice metrics) and figure.png (each
method's image and error map) atomically (all or nothing) and prints results.md: the benchmark tables (a row
per method, a column per regime; mean ± std across test volumes, or over the slices of a single one),
then one block per method. Slices are reconstructed at the data module's resolution (native unless its
`image_size` asks for resizing) by the one inference path with the sampler registry's defaults. Bad input (a
checkpoint that is not ours, an unknown regime, ...) -> one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lfmri.commands import sampler_options
from lfmri_utils.errors import InputError
from lfmri_utils.files import check_output_dir
from lfmri_utils.seeding import check_seed


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` parser."""
    p = subparsers.add_parser(
        "evaluate", help="SSIM / PSNR / NMSE per regime on the held-out subjects, with baselines",
        description="Evaluate a checkpoint on the test subjects of a config's data module, per degradation "
                    "regime, next to classical baselines tuned on the validation subjects.")
    p.add_argument("--ckpt", required=True,
                   help="lfmri (ScoreModel) Lightning checkpoint, or reference-small (the shipped prior)")
    p.add_argument("--config", required=True, help="LightningCLI YAML with a data: block")
    p.add_argument("--regimes", default="all", help="all, or a comma-separated list of regimes")
    p.add_argument("--out", required=True, help="output folder for results.csv / .md / .json and figure.png")
    p.add_argument("--baselines", default="all",
                   help="all (the installed ones) | none | comma-separated among "
                        "tv, nlm, tv_complex, nlm_complex, bm3d, bm3d_complex (pip install 'lfmri[bm3d]'), "
                        "tv_model")
    sampler_options.add_sampler_arguments(p)
    p.add_argument("--reference-pc-steps", type=int, default=0,
                   help="also score the paper's reference sampler as method lfmri_pc: score-MRI's "
                        "predictor-corrector with N predictor steps (2N NFE) and gradient DC w = 0.3, on the "
                        "same slices and seeds (default 0: off; the paper uses 2000)")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples per slice, 1 to 1000 (mean scored)")
    p.add_argument("--also", default=None, metavar="NAME[:K],...",
                   help="also score these registry samplers with their defaults on the same slices and "
                        "seeds, as methods lfmri_NAME (NAME:K: the mean of K posterior samples, "
                        "lfmri_NAME_meanK), e.g. warm_ddim,warm_ddim:8,tweedie")
    p.add_argument("--max-slices-per-volume", type=int, default=None,
                   help="evenly spaced slices per volume (default: the data module's slices.eval_per_volume)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=8, help="slices sampled together")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (0 to 2^32 - 1)")
    p.set_defaults(func=run)


def parse_also(spec: str | None, sde: Any) -> dict[str, tuple[Any, int]]:
    """`--also` -> {method name: (registry sampler with its defaults, K)}; ValueError for an unknown name, a
    bad K or K > 1 of a point estimate."""
    from diffusion.sampling.samplers import build_sampler

    out: dict[str, tuple[Any, int]] = {}
    for item in [] if not spec else spec.split(","):
        name, _, k = item.strip().partition(":")
        if k and not k.isdigit():
            raise ValueError(f"--also: {item!r}: K must be a positive integer")
        samples = int(k) if k else 1
        sampler = build_sampler(name, sde=sde)
        sampler.check_samples(samples)
        out[f"lfmri_{name}" + (f"_mean{samples}" if samples > 1 else "")] = (sampler, samples)
    return out


def parse_regimes(spec: str) -> list[str]:
    """`all` or comma-separated names -> regime names (InputError naming an unknown one)."""
    from degradations import REGIMES

    if spec.strip() == "all":
        return list(REGIMES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in REGIMES]
    if unknown or not names:
        raise InputError(f"--regimes: unknown regime(s) {', '.join(unknown) or repr(spec)}; "
                         f"choose all or among {', '.join(REGIMES)}")
    return list(dict.fromkeys(names))


def _samplers(args: argparse.Namespace, sde: Any) -> tuple[Any, dict[str, tuple[Any, int]]]:
    """The sampler of method `lfmri` and the others (`--also`, `--reference-pc-steps`: method `lfmri_pc`) on
    the model's `sde` (None: the default VPSDE, to check the options before the model is read); ValueError
    for a bad option."""
    from diffusion.sampling.samplers import build_sampler

    sampler = sampler_options.sampler_from_args(args, sde)
    others = parse_also(args.also, sde)
    if args.reference_pc_steps:
        # the registry's `pc`: the paper's reference, gradient DC w = 0.3
        others["lfmri_pc"] = (build_sampler("pc", steps=args.reference_pc_steps, sde=sde), 1)
    return sampler, others


def _validate(args: argparse.Namespace) -> Path:
    """Check the options that need no torch before any work (numbers, the output folder, the config's data
    block, --ckpt); returns the output folder, resolved (`--out .` has no name of its own for the temporary
    folder beside it)."""
    from lfmri.data_config import data_block

    out = check_output_dir(args.out, "--out")  # before any computing: not a file, a writable place for it
    for name in ("samples", "batch_size", "max_slices_per_volume"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    sampler_options.check_sampler_arguments(args)
    if args.reference_pc_steps < 0:
        raise InputError(f"--reference-pc-steps: must be >= 0, got {args.reference_pc_steps}")
    check_seed(args.seed)
    data_block(args.config)
    sampler_options.check_checkpoint_argument(args.ckpt)
    return out


def run(args: argparse.Namespace) -> int:
    """Run `lfmri evaluate`; bad input raises InputError before anything is written."""
    out = _validate(args)
    regimes = parse_regimes(args.regimes)
    from lfmri.baselines import parse_baselines

    try:
        baselines = parse_baselines(args.baselines)
        _samplers(args, None)  # the sampler options, checked before the model is read
    except ValueError as err:  # InputError included
        raise InputError(str(err)) from None
    from diffusion.checkpoint import resolve_checkpoint
    from lfmri.data_config import load_datamodule
    from lfmri.evaluation import run_evaluation
    from lfmri.models import load_score_model, resolve_device
    from lfmri.results import format_markdown, write_results

    try:
        device = resolve_device(args.device)
        model = load_score_model(args.ckpt, device)
        sampler, others = _samplers(args, model.sde)
    except ValueError as err:  # InputError included
        raise InputError(str(err)) from None
    overrides = {} if args.max_slices_per_volume is None else {
        "slices": {"eval_per_volume": args.max_slices_per_volume}}
    datamodule = load_datamodule(args.config, **overrides)
    settings = {"ckpt": str(resolve_checkpoint(args.ckpt).resolve()),
                "config": str(Path(args.config).resolve()),
                **sampler.settings(), "samples": args.samples, "seed": args.seed, "device": str(device)}
    if sampler.undersampled is not None:  # what undersampled data get (Sampler.for_measurement)
        settings.update({f"undersampled: {k}": v for k, v in sampler.undersampled.settings().items()})
    settings.update({f"{name}: {k}": v for name, (s, n) in others.items()
                     for k, v in {**s.settings(), "samples": n}.items()})
    result = run_evaluation(model, datamodule, regimes, baselines, sampler, samples=args.samples,
                            batch_size=args.batch_size, seed=args.seed, device=device, settings=settings,
                            other_samplers=others)
    write_results(result, out)
    print(format_markdown(result))
    print(f"wrote {out / 'results.csv'}, results.md, results.json, slices.csv, figure.png")
    return 0
