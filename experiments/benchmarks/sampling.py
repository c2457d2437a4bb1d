"""Reference PC sampler vs the fast samplers: NFE, wall time and SSIM on the same slices, in one run.

    .venv/bin/python experiments/benchmarks/sampling.py --random-tiny --steps-ref 200 --device cpu  # smoke
    .venv/bin/python experiments/benchmarks/sampling.py --ckpt last.ckpt --data bundled --slices 8 \
        --steps-ref 2000 --device cuda --bf16 --compile
    .venv/bin/python experiments/benchmarks/sampling.py --random-34m --size 256 --slices 30 --device cuda \
        --steps-ref 200 --fast warm_ddim:25:0.4    # timing of the 34.4M configuration (untrained)

Model: `--ckpt` (a Lightning checkpoint of `lightning_modules.module.ScoreModel`, EMA weights),
`--random-tiny` (an untrained tiny DDPM, smoke test) or `--random-34m` (the untrained 34.4M configuration, for
timing only; the near-zero-initialised layers of an untrained DDPM get Xavier weights, so the score is not ~0
and the Langevin step size stays finite).
Data: `--data bundled` (the first validation volume of `LowFieldDataModule(source="bundled")`, `--slices`
evenly spaced slices) or `--data mni` (axial slices of nilearn's MNI152 T1 template, normalised by the 99th
percentile), degraded with `degradations.make_regime(--regime)` (deterministic, `--seed`).
Every sampler reconstructs the same batch of slices from the degraded image with DC (`--dc-weight`) through
the regime's forward operator; SSIM / PSNR are fastMRI's on the magnitude volume of those slices against the
clean reference. The table gives NFE, wall seconds (per batch, per slice and per 30-slice volume), SSIM, PSNR,
the NFE and wall-time speed-ups over the reference and whether SSIM matches it within `--match-tol`.
`--fast NAME[:STEPS[:T0]]` lists the fast samplers (default: every `SAMPLERS` entry but "pc", at its
defaults). `--bf16` runs the network under bf16 autocast, `--compile` torch.compiles it (compile time is spent
in a warm-up call, not timed). With `--json-out` the rows are also written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from degradations import complex_to_channels, ifft2c, make_regime
from lightning_modules.metrics import psnr_volume, ssim_volume
from lightning_modules.samplers import SAMPLERS, build_sampler, compile_score_fn, magnitude
from lightning_modules.sde import VPSDE, ScoreFn, get_score_fn

MNI = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TINY = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
FULL_34M = dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)


@dataclass
class Problem:
    """The slices to reconstruct: clean / degraded float [B, 2, H, W], k-space y and its operator A."""

    clean: torch.Tensor
    degraded: torch.Tensor
    y: torch.Tensor
    A: object


def mni_problem(regime: str, size: int, slices: int, seed: int) -> Problem:
    """`slices` axial MNI slices (middle third), resized to size x size, degraded with the regime."""
    import nibabel as nib

    path = importlib.resources.files("nilearn") / MNI
    vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    z = np.linspace(vol.shape[2] // 3, 2 * vol.shape[2] // 3, slices).round().astype(int)
    mag = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, z], 2, 0)))[:, None]
    side = max(mag.shape[-2:])
    pad_h, pad_w = side - mag.shape[-2], side - mag.shape[-1]
    mag = torch.nn.functional.pad(mag, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mag = torch.nn.functional.interpolate(mag, size=(size, size), mode="bilinear", antialias=True)
    mag = mag / torch.quantile(mag.flatten(), 0.99)
    x = mag.to(torch.complex64)
    deg = make_regime(regime)
    y, params = deg(x, torch.Generator().manual_seed(seed))
    return Problem(complex_to_channels(x), complex_to_channels(ifft2c(y)), y, deg.operator(params))


def bundled_problem(regime: str, size: int, slices: int, seed: int) -> Problem:
    """`slices` evenly spaced slices of the first bundled validation volume, with its val degradation."""
    from datamodules import LowFieldDataModule

    dm = LowFieldDataModule(source="bundled", image_size=size, eval_regimes=[regime], seed=seed)
    dm.setup("validate")
    vol = next(iter(dm.volumes("val", regime)))
    idx = torch.linspace(0, vol.clean.shape[0] - 1, slices).round().long().unique()
    params = {k: v[idx] for k, v in vol.params.items()}
    return Problem(vol.clean[idx], vol.degraded[idx], vol.y[idx], make_regime(regime).operator(params))


def load_score_fn(args: argparse.Namespace, device: torch.device) -> tuple[ScoreFn, VPSDE, str]:
    """(score_fn, its SDE, a description) of the model chosen on the command line."""
    if args.ckpt:
        from lightning_modules.module import ScoreModel

        model = ScoreModel.load_from_checkpoint(args.ckpt, map_location=device)
        return model.score_fn(use_ema=True), model.sde, f"checkpoint {args.ckpt}"
    from lightning_modules.ddpm import DDPM

    config, label = (FULL_34M, "untrained 34.4M DDPM") if args.random_34m else (TINY, "untrained tiny DDPM")
    torch.manual_seed(args.seed)
    net = DDPM(image_size=args.size, num_channels=2, **config)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim > 1 and param.abs().max() < 1e-4:  # score_sde's near-zero init (scale 1e-10)
                torch.nn.init.xavier_uniform_(param)
    net = net.to(device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in net.parameters())
    sde = VPSDE()
    return get_score_fn(net, sde), sde, f"{label} ({n_params:,} parameters)"


def parse_fast(items: list[str] | None) -> list[tuple[str, int | None, float | None]]:
    """`NAME[:STEPS[:T0]]` -> (name, steps, t0); default every registered sampler but the reference."""
    if not items:
        return [(name, None, None) for name in SAMPLERS if name != "pc"]
    out = []
    for item in items:
        name, *rest = item.split(":")
        steps = int(rest[0]) if rest and rest[0] else None
        t0 = float(rest[1]) if len(rest) > 1 else None
        out.append((name, steps, t0))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(label: str, sampler, score_fn: ScoreFn, problem: Problem, device: torch.device,
            seed: int) -> dict:
    """Reconstruct the problem's slices with one sampler; NFE, time, peak memory, SSIM / PSNR."""
    x_init = problem.degraded.to(device)
    y = problem.y.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    x = sampler(score_fn, x_init, problem.A, y, torch.Generator(device).manual_seed(seed))
    _sync(device)
    wall = time.perf_counter() - start
    pred, ref = magnitude(x).float().cpu(), magnitude(problem.clean).float()
    n = x.shape[0]
    row = {
        "sampler": label, "steps": sampler.schedule.n_steps, "t0": round(sampler.schedule.t_start, 4),
        "nfe": sampler.last_nfe, "wall_s": wall, "s_per_slice": wall / n, "s_per_30_slices": 30 * wall / n,
        "ssim": ssim_volume(pred, ref), "psnr": psnr_volume(pred, ref),
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="ScoreModel Lightning checkpoint")
    model.add_argument("--random-tiny", action="store_true", help="untrained tiny DDPM (smoke test)")
    model.add_argument("--random-34m", action="store_true", help="untrained 34.4M DDPM (timing only)")
    p.add_argument("--data", choices=["mni", "bundled"], default="mni")
    p.add_argument("--regime", default="noise")
    p.add_argument("--size", type=int, default=64, help="image size (the checkpoint's image_size)")
    p.add_argument("--slices", type=int, default=4, help="slices reconstructed together (one batch)")
    p.add_argument("--steps-ref", type=int, default=2000, help="steps of the reference PC sampler")
    p.add_argument("--fast", nargs="*", help="fast samplers NAME[:STEPS[:T0]] (default: all at defaults)")
    p.add_argument("--snr", type=float, default=0.16)
    p.add_argument("--dc-weight", type=float, default=0.3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the network")
    p.add_argument("--compile", action="store_true", help="torch.compile the score function")
    p.add_argument("--match-tol", type=float, default=0.01, help="|SSIM - reference SSIM| counted as matched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    device = torch.device(args.device)
    score_fn, sde, model_label = load_score_fn(args, device)
    problem = (mni_problem if args.data == "mni" else bundled_problem)(args.regime, args.size, args.slices,
                                                                        args.seed)
    if args.compile:
        score_fn = compile_score_fn(score_fn)
    if args.compile or device.type == "cuda":  # warm-up (compilation, cuDNN autotuning) outside the timing
        x0 = problem.degraded.to(device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            score_fn(x0, torch.full((x0.shape[0],), 0.5, device=device))

    common = dict(snr=args.snr, dc_weight=args.dc_weight, autocast=args.bf16, sde=sde)
    runs = [("pc", build_sampler("pc", steps=args.steps_ref, **common))]
    runs += [(name, build_sampler(name, steps=steps, t0=t0, **common))
             for name, steps, t0 in parse_fast(args.fast)]
    rows = []
    for label, sampler in runs:
        rows.append(run_one(label, sampler, score_fn, problem, device, args.seed))
        print(f"done {label}: {rows[-1]['wall_s']:.1f} s", flush=True)
    ref = rows[0]
    deg, clean = magnitude(problem.degraded), magnitude(problem.clean)
    base_ssim, psnr_deg = ssim_volume(deg, clean), psnr_volume(deg, clean)
    for row in rows:
        row["nfe_speedup"] = ref["nfe"] / row["nfe"]
        row["wall_speedup"] = ref["wall_s"] / row["wall_s"]
        row["d_ssim"] = row["ssim"] - ref["ssim"]
        row["matched"] = abs(row["d_ssim"]) <= args.match_tol

    print(f"\nmodel: {model_label}; data: {args.data}, regime {args.regime}, {problem.clean.shape[0]} slices "
          f"of {args.size}x{args.size}; device {device}; bf16 {args.bf16}; compile {args.compile}")
    print(f"degraded input: SSIM {base_ssim:.4f}, PSNR {psnr_deg:.2f} dB")
    head = (f"{'sampler':<10} {'steps':>5} {'t0':>6} {'NFE':>6} {'wall s':>8} {'s/slice':>8} {'s/30sl':>8} "
            f"{'SSIM':>7} {'PSNR':>6} {'NFE x':>6} {'wall x':>7} {'dSSIM':>7} matched")
    print(head)
    for r in rows:
        print(f"{r['sampler']:<10} {r['steps']:>5} {r['t0']:>6.3f} {r['nfe']:>6} {r['wall_s']:>8.2f} "
              f"{r['s_per_slice']:>8.3f} {r['s_per_30_slices']:>8.1f} {r['ssim']:>7.4f} {r['psnr']:>6.2f} "
              f"{r['nfe_speedup']:>6.1f} {r['wall_speedup']:>7.1f} {r['d_ssim']:>+7.4f} {r['matched']}"
              + (f"  peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "model": model_label, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
