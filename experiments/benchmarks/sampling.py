"""Samplers and data consistency side by side at native resolution: NFE, wall-time ratio, SSIM, PSNR, one run.

    # the table of issue 10: reference PC (gradient DC, w = 0.3) and every sampler with gradient and with
    # proximal DC, plus the former resize path, on the same validation slices and seeds
    .venv/bin/python experiments/benchmarks/sampling.py \
        --ckpt runs/demo/transfer/finetune/checkpoints/last.ckpt --split val --slices 4 --steps-ref 200
    # tune the defaults of the sampler registry on VALIDATION volumes (a search over t0, steps, dc_lambda)
    .venv/bin/python experiments/benchmarks/sampling.py --ckpt C --split val --tune warm_ddim
    # the default reconstruction at high SNR: nothing the measurement holds is thrown away
    .venv/bin/python experiments/benchmarks/sampling.py --ckpt C --split test --snr-db 30 --defaults-only
    # the default against the former resize path only (and the floor of the proximal step, --floors)
    .venv/bin/python experiments/benchmarks/sampling.py --ckpt C --split test --defaults-only --with-resize
    # GPU timing of the 34.4M configuration at 256^2 (untrained; seconds per slice and per 30-slice volume)
    .venv/bin/python experiments/benchmarks/sampling.py --random-34m --size 256 --slices 30 --device cuda \
        --steps-ref 200 --timing-only [--bf16]

Everything goes through the one inference path (`diffusion.inference.Reconstructor`). Data: the
bundled data module's `--split` volumes (validation by default: never tune on test), native resolution,
`--slices` evenly spaced slices of each volume, degraded with the data module's deterministic val/test
degradation of `--regimes` (optionally at a fixed `--snr-db`). Metrics: fastMRI SSIM / PSNR on the magnitude
volume of those slices against the clean reference (per volume, then averaged over volumes).

Rows: `pc` (the paper's reference: `--steps-ref` predictor steps + one corrector each, gradient DC w = 0.3);
each sampler of the registry with `dc=gradient` (`--dc-weight`) and with `dc=proximal` (its registry
`dc_lambda`); `resize` (the former path: slices resampled to the model's training size, warm_ddim 20 steps,
t0 0.4, gradient DC w = 0.05, resized back); `degraded` (the input). Wall-time ratios are relative to `pc`
and measured in the same run; absolute seconds mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from degradations import REGIMES, LowFieldDegradation, Measurement, complex_to_channels, fft2c
from diffusion.inference import Reconstructor
from diffusion.sampling.samplers import SAMPLERS, Sampler, SamplerOptions, build_sampler, magnitude
from diffusion.sampling.sde import SDE, VPSDE, ScoreFn, get_score_fn
from lfmri_utils.metrics import psnr_volume, region_metrics, ssim_volume

#: `--tune`'s coordinate search: dc_lambda at the registry's t0 and 10 steps, then t0 x steps at the best
#: dc_lambda, then dc_lambda again around its best value (x/÷ 2) at the best t0 and steps
TUNE_LAMBDAS = (1.0, 4.0, 16.0, 64.0, 256.0)
TUNE_T0 = (0.25, 0.4, 0.6)
TUNE_STEPS = (10, 20)


@dataclass
class Volume:
    """The slices of one volume to reconstruct (normalised units, native matrix)."""

    volume_id: str
    regime: str
    clean: torch.Tensor  # [S,2,H,W]
    degraded: torch.Tensor  # [S,2,H,W]
    y: torch.Tensor  # complex [S,1,H,W]
    params: dict[str, torch.Tensor]
    slices: list[int]
    degradation: LowFieldDegradation  # the regime that simulated it (its B0 settings)


def load_volumes(split: str, regimes: list[str], slices: int, seed: int, snr_db: float | None,
                 max_volumes: int) -> list[Volume]:
    """`slices` evenly spaced slices of the first `max_volumes` volumes of the bundled split, per regime."""
    from datamodules import LowFieldDataModule
    from degradations import make_regime

    overrides = {"snr_db": snr_db} if snr_db is not None else {}
    dm = LowFieldDataModule(source="bundled", eval_regimes=regimes, seed=seed,
                            slices={"eval_per_volume": slices}, regime_overrides=overrides)
    out = []
    for regime in regimes:
        degradation = make_regime(regime, **overrides)
        for vol in itertools.islice(dm.volumes(split, regime), max_volumes):
            out.append(Volume(vol.volume_id, regime, vol.clean, vol.degraded, vol.y, vol.params,
                              vol.slices.tolist(), degradation))
    return out


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[ScoreFn, SDE, int, str]:
    """(score_fn, SDE, the model's training size, description) of the model chosen on the command line."""
    if args.ckpt:
        from lfmri.models import load_score_model

        model = load_score_model(args.ckpt, device)
        if model.data_scale is not None:
            raise SystemExit(f"{args.ckpt}: a {model.prior.family.name} prior rescales each slice to its "
                             "data range; this benchmark runs priors in lfmri's units only (use lfmri "
                             "evaluate)")
        return model.score_fn(), model.sde, model.train_size, f"checkpoint {args.ckpt}"
    from diffusion.networks.ddpm import DDPM, DDPMConfig

    torch.manual_seed(args.seed)
    net = DDPM(DDPMConfig(image_size=args.size, num_channels=2, dropout=0.0))  # the 34.4M network
    replace_near_zero_init(net)
    net = net.to(device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in net.parameters())
    sde = VPSDE()
    return get_score_fn(net, sde), sde, args.size, f"untrained 34.4M DDPM ({n_params:,} parameters)"


def replace_near_zero_init(net: torch.nn.Module) -> None:
    """score_sde initialises its last layers near zero (an untrained score ~ 0, which exercises no sampler):
    Xavier-initialise every weight matrix whose entries are all below 1e-4 (the timing runs on an untrained
    34.4M network: `--random-34m` here, `gpu.py`)."""
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim > 1 and param.abs().max() < 1e-4:
                torch.nn.init.xavier_uniform_(param)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruct(sampler: Sampler, score_fn: ScoreFn, vol: Volume, device: torch.device, seed: int,
                batch_size: int, resize_to: int | None = None,
                samples: int = 1) -> tuple[np.ndarray, float, int]:
    """(magnitude [S,H,W], wall seconds, NFE per slice) of one volume: the mean of `samples` posterior
    samples; `resize_to`: the former path."""
    x_init, measurement = vol.degraded, Measurement.simulated(vol.y, vol.params, vol.degradation)
    if resize_to is not None:
        from datamodules.transforms import fit_to_square
        from degradations import channels_to_complex

        h, w = x_init.shape[-2:]
        factor = resize_to / max(h, w)
        x = fit_to_square(channels_to_complex(x_init), resize_to)
        params = {**measurement.params, "fwhm_px": measurement.params["fwhm_px"] * factor,
                  "readout_ms": measurement.params["readout_ms"] * factor,
                  "b0_map_hz": fit_to_square(measurement.params["b0_map_hz"], resize_to)}
        # resampling changes the noise: estimated on the new grid
        measurement = Measurement.from_kspace(fft2c(x), params, b0_method=measurement.b0_method)
        x_init = complex_to_channels(x)
    rec = Reconstructor(score_fn, sampler, batch_size, device)
    _sync(device)
    start = time.perf_counter()
    out = rec(measurement, x_init, vol.slices, seed=seed, samples=samples)
    _sync(device)
    wall = time.perf_counter() - start
    mean = out.mean[:, 0]
    if resize_to is not None:
        from datamodules.transforms import restore_shape

        mean = restore_shape(mean, tuple(vol.clean.shape[-2:]))
    return mean.clamp_min(0).numpy(), wall, out.nfe


def score(pred: np.ndarray, vol: Volume) -> tuple[float, ...]:
    """(SSIM, PSNR, SSIM object, SSIM background, RMSE object, RMSE background) of one volume."""
    ref = magnitude(vol.clean)[:, 0].numpy()
    regions = region_metrics(pred, ref)
    return (ssim_volume(pred, ref), psnr_volume(pred, ref), regions["ssim_object"],
            regions["ssim_background"], regions["rmse_object"], regions["rmse_background"])


#: the per-volume metrics of `score`, in its order
METRICS = ("ssim", "psnr", "ssim_object", "ssim_background", "rmse_object", "rmse_background")


def evaluate_config(label: str, sampler: Sampler, score_fn: ScoreFn, volumes: list[Volume],
                    device: torch.device, args: argparse.Namespace, resize_to: int | None = None,
                    samples: int = 1) -> dict:
    """Mean SSIM / PSNR over the volumes of each regime (and overall), NFE per slice, total wall time."""
    per_regime: dict[str, list[tuple[float, float]]] = {}
    wall, nfe = 0.0, 0
    for vol in volumes:
        pred, seconds, nfe = reconstruct(sampler, score_fn, vol, device, args.seed, args.batch_size,
                                         resize_to, samples)
        wall += seconds
        per_regime.setdefault(vol.regime, []).append(score(pred, vol))
    row = {"config": label, "nfe": nfe, "wall_s": wall, **sampler.settings()}
    _average(row, per_regime)
    print(f"  {label:<28} NFE {nfe:>5}  SSIM {row['ssim']:.4f}  PSNR {row['psnr']:6.2f}  {wall:7.1f} s  "
          f"(object / background SSIM {row['ssim_object']:.3f} / {row['ssim_background']:.3f}, RMSE "
          f"{row['rmse_object']:.4f} / {row['rmse_background']:.4f})", flush=True)
    return row


def _average(row: dict, per_regime: dict[str, list[tuple[float, ...]]]) -> None:
    """Each metric per regime (mean over volumes) and over the regimes, into `row`."""
    for regime, values in per_regime.items():
        for m, name in enumerate(METRICS):
            row[f"{name}/{regime}"] = float(np.mean([v[m] for v in values]))
    for name in METRICS:
        row[name] = float(np.mean([row[f"{name}/{r}"] for r in per_regime]))


def degraded_row(volumes: list[Volume]) -> dict:
    row: dict = {"config": "degraded input", "nfe": 0, "wall_s": 0.0}
    regimes = sorted({v.regime for v in volumes}, key=list(REGIMES).index)
    _average(row, {regime: [score(magnitude(v.degraded)[:, 0].numpy(), v)
                            for v in volumes if v.regime == regime] for regime in regimes})
    return row


def print_table(rows: list[dict], regimes: list[str], ref_wall: float | None) -> None:
    head = "| config | NFE | wall × (vs pc) | " + " | ".join(f"SSIM {r}" for r in regimes) + " | " + \
        " | ".join(f"PSNR {r}" for r in regimes) + " |"
    print("\n" + head + "\n|" + "---|" * (3 + 2 * len(regimes)))
    for r in rows:
        ratio = f"{r['wall_s'] / ref_wall:.3f}" if ref_wall and r["wall_s"] else "–"
        print(f"| {r['config']} | {r['nfe']} | {ratio} | "
              + " | ".join(f"{r[f'ssim/{g}']:.3f}" for g in regimes) + " | "
              + " | ".join(f"{r[f'psnr/{g}']:.2f}" for g in regimes) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="ScoreModel Lightning checkpoint")
    model.add_argument("--random-34m", action="store_true", help="untrained 34.4M DDPM (timing only)")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--regimes", default="all", help="all or comma-separated regimes")
    p.add_argument("--snr-db", type=float, default=None, help="fixed SNR instead of the regime's range")
    p.add_argument("--slices", type=int, default=4, help="evenly spaced slices per volume")
    p.add_argument("--max-volumes", type=int, default=2, help="volumes per regime")
    p.add_argument("--steps-ref", type=int, default=2000, help="predictor steps of the reference PC")
    p.add_argument("--dc-weight", type=float, default=0.05, help="gradient-DC weight of the fast samplers")
    p.add_argument("--tune", default=None, help="tune this sampler's t0 / steps / dc_lambda (grid) instead")
    p.add_argument("--defaults-only", action="store_true",
                   help="only the default sampler with its registry defaults (and the degraded input)")
    p.add_argument("--with-resize", action="store_true",
                   help="--defaults-only: also the former resize path (warm_ddim 20 steps, t0 0.4, "
                        "gradient w 0.05)")
    p.add_argument("--floors", default=None,
                   help="--defaults-only: comma-separated dc_floor values, one row each "
                        "(default: the registry's)")
    p.add_argument("--t0-ratios", default=None,
                   help="--defaults-only: comma-separated t0_ratio values (the noise-aware start: diffusion "
                        "noise = ratio x the measurement noise, at most t0), one row each (default: the "
                        "registry's)")
    p.add_argument("--samples", default="1",
                   help="--defaults-only: comma-separated K, the posterior mean of K samples per slice")
    p.add_argument("--grid", action="append", default=None, metavar="SPEC",
                   help="rows of every combination of a sampler's options, e.g. 'pnp steps=2,4 t0_ratio=1,2 "
                        "stop_ratio=0.5,1' (SamplerOptions fields; '--samples' K per row); repeatable")
    p.add_argument("--size", type=int, default=256, help="image size for --random-34m")
    p.add_argument("--timing-only", action="store_true", help="--random-34m: time the default sampler only")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the network")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    device = torch.device(args.device)
    score_fn, sde, train_size, model_label = load_model(args, device)
    common = dict(autocast=args.bf16, sde=sde)
    if args.random_34m:
        time_34m(args, score_fn, common, device)
        return
    regimes = list(REGIMES) if args.regimes == "all" else args.regimes.split(",")
    volumes = load_volumes(args.split, regimes, args.slices, args.seed, args.snr_db, args.max_volumes)
    shapes = sorted({tuple(v.clean.shape[-2:]) for v in volumes})
    ids = sorted({v.volume_id for v in volumes})
    print(f"model: {model_label}; {args.split} volumes {ids}, {args.slices} slices each, "
          f"native matrices {shapes}; regimes {regimes}; SNR "
          f"{args.snr_db if args.snr_db is not None else 'regime range'}; device {device}", flush=True)
    rows = [degraded_row(volumes)]
    if args.grid:
        samples = [int(k) for k in args.samples.split(",")]
        for spec in args.grid:
            for options, k in itertools.product(grid_options(spec), samples):
                sampler = SamplerOptions(**options).build(sde)
                label = " ".join(f"{key}={value}" for key, value in options.items()) + \
                    ("" if k == 1 else f" mean of {k}")
                rows.append(evaluate_config(label, sampler, score_fn, volumes, device, args, samples=k))
        print_table(rows, regimes, None)
    elif args.tune:
        def run(t0: float, steps: int, lam: float) -> dict:
            sampler = build_sampler(args.tune, steps=steps, t0=t0, dc="proximal", dc_lambda=lam, **common)
            label = f"{args.tune} t0={t0:g} n={steps} λ={lam:g}"
            done = next((r for r in rows[1:] if r["config"] == label), None)
            if done is None:
                done = evaluate_config(label, sampler, score_fn, volumes, device, args)
                rows.append(done)
            return done

        def best() -> dict:
            return max(rows[1:], key=lambda r: (r["ssim"], r["psnr"]))

        spec = SAMPLERS[args.tune]
        for lam in TUNE_LAMBDAS:
            run(spec.t0, 10, lam)
        lam = best()["dc_lambda"]
        for t0, steps in itertools.product(TUNE_T0, TUNE_STEPS):
            run(t0, steps, lam)
        top = best()
        for factor in (0.5, 2.0):
            run(top["t0"], top["steps"], top["dc_lambda"] * factor)
        print(f"\nbest on {args.split} (mean SSIM over regimes): {best()['config']}")
        print_table([rows[0]] + sorted(rows[1:], key=lambda r: -r["ssim"]), regimes, None)
    elif args.defaults_only:
        floors = [None] if args.floors is None else [float(f) for f in args.floors.split(",")]
        ratios = [None] if args.t0_ratios is None else [float(r) for r in args.t0_ratios.split(",")]
        samples = [int(k) for k in args.samples.split(",")]
        for floor, ratio, k in itertools.product(floors, ratios, samples):
            sampler = build_sampler(dc_floor=floor, t0_ratio=ratio, **common)
            label = f"{sampler.name} (registry defaults{'' if floor is None else f', floor {floor:g}'}" \
                f"{'' if ratio is None else f', t0_ratio {ratio:g}'}{'' if k == 1 else f', mean of {k}'})"
            rows.append(evaluate_config(label, sampler, score_fn, volumes, device, args, samples=k))
        if args.with_resize:
            rows.append(resize_row(train_size, score_fn, volumes, device, args, common))
        print_table(rows, regimes, None)
    else:
        ref = evaluate_config("pc (gradient, w=0.3)", build_sampler("pc", steps=args.steps_ref, **common),
                              score_fn, volumes, device, args)
        rows.append(ref)
        for name in SAMPLERS:
            if name == "pc":
                continue
            for dc in ("gradient", "proximal"):
                sampler = build_sampler(name, dc=dc, dc_weight=args.dc_weight, **common)
                label = f"{name} ({dc}{f', w={args.dc_weight:g}' if dc == 'gradient' else ''})"
                rows.append(evaluate_config(label, sampler, score_fn, volumes, device, args))
        rows.append(resize_row(train_size, score_fn, volumes, device, args, common))
        print_table(rows, regimes, ref["wall_s"])
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "model": model_label, "rows": rows}, indent=2))


def grid_options(spec: str) -> list[dict]:
    """Every combination of a `--grid` SPEC, 'NAME key=v1,v2 key=v3': `SamplerOptions` keyword dicts."""
    name, *pairs = spec.split()
    fields = {f.name: f for f in dataclasses.fields(SamplerOptions)}
    axes = []
    for pair in pairs:
        key, _, values = pair.partition("=")
        if key not in fields or key == "sampler":
            raise SystemExit(f"--grid: unknown option {key!r}; choose from {', '.join(fields)}")
        cast = str if key == "dc" else (int if key == "steps" else float)
        axes.append([(key, cast(v)) for v in values.split(",")])
    return [{"sampler": name, **dict(combo)} for combo in itertools.product(*axes)]


def resize_row(train_size: int, score_fn: ScoreFn, volumes: list[Volume], device: torch.device,
               args: argparse.Namespace, common: dict) -> dict:
    """The former path: slices resampled to the model's training size, warm_ddim 20 steps from a fixed t0 0.4
    (t0_ratio 0) with gradient DC w 0.05, resized back."""
    old = build_sampler("warm_ddim", steps=20, t0=0.4, t0_ratio=0.0, dc="gradient", dc_weight=0.05, **common)
    return evaluate_config(f"resize to {train_size}² (former path)", old, score_fn, volumes, device, args,
                           resize_to=train_size)


def time_34m(args: argparse.Namespace, score_fn: ScoreFn, common: dict, device: torch.device) -> None:
    """Seconds per slice and per 30-slice volume of the default sampler on random 256² slices (34.4M)."""
    from degradations import make_regime

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.slices, 1, args.size, args.size, dtype=torch.complex64, generator=g)
    y, params = make_regime("noise_blur_t2star")(x, g)
    vol = Volume("random", "noise_blur_t2star", complex_to_channels(x), complex_to_channels(x), y, params,
                 list(range(args.slices)), "segmented")
    sampler = build_sampler(**common)
    reconstruct(sampler, score_fn, Volume(**{**vol.__dict__, "slices": [0], "degraded": vol.degraded[:1],
                                             "y": vol.y[:1], "params": {k: v[:1] for k, v in params.items()},
                                             "clean": vol.clean[:1]}), device, 0, 1)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, wall, nfe = reconstruct(sampler, score_fn, vol, device, args.seed, args.batch_size)
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"{sampler.name} ({nfe} NFE, bf16 {args.bf16}): {wall / args.slices:.3f} s per {args.size}² slice, "
          f"{30 * wall / args.slices:.1f} s per 30-slice volume (batch {args.batch_size}){mem}")
    assert math.isfinite(wall)


if __name__ == "__main__":
    main()
