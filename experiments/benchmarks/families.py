"""One fine-tuning step of each public prior family's RELEASED network at 320x320: time and peak memory.

Issue 12's GPU measurement: score_sde / HFS-SDE's 34.4M DDPM, score-MRI's 61.4M NCSN++ and DDS's 361M ADM,
built from the fixture configs (tests/fixtures/*/config.json) with every `fixture.changed_from_real` entry set
back to its released value (sizes only; the fixtures record them), randomly initialised (timing does not need
the weights). One step = the DSM loss in the family's own SDE through its score (`Pretrained.score`, as
`ScoreModel` fine-tunes it: score-MRI's 1-channel prior on the real and imaginary parts apart), backward,
AdamW step; fp32 and bf16 autocast, with and without gradient checkpointing. Medians of `--iters` steps after
`--warmup`; peak memory from `torch.cuda.max_memory_allocated`.

    python experiments/benchmarks/families.py --device cuda                 # 320^2, batch 1, all families
    python experiments/benchmarks/families.py --device cpu --fixture-sizes  # the tiny fixtures: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from diffusion.losses import dsm_loss
from diffusion.networks.families import FAMILIES, family_prior

REPO = Path(__file__).resolve().parents[2]
FIXTURES = {"score_sde": "score_sde_tiny", "hfs_sde": "hfs_sde_vp_tiny",
            "score_mri": "score_mri_ncsnpp_ve_tiny", "dds": "dds_adm_tiny"}


def released_config(family: str, fixture_sizes: bool = False) -> dict:
    """The fixture's config; unless `fixture_sizes`, with each `fixture.changed_from_real` entry set back to
    the released value ('absent ...' removes the key)."""
    cfg = json.loads((REPO / "tests" / "fixtures" / FIXTURES[family] / "config.json").read_text())
    changes = cfg.pop("fixture", {}).get("changed_from_real", {})
    if fixture_sizes:
        return cfg
    for key, change in changes.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = node.setdefault(section, {})
        if isinstance(change["real"], str) and change["real"].startswith("absent"):
            node.pop(name, None)
        else:
            node[name] = change["real"]
    if family == "score_sde":  # the score_sde fixture records no released run: the seed's 34.4M DDPM at 320
        cfg["model"].update(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16])
        cfg["data"].update(image_size=320, num_channels=2)
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(family: str, args: argparse.Namespace, dtype: str, grad_checkpointing: bool) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    prior = family_prior(family, released_config(family, args.fixture_sizes), grad_checkpointing)
    net = prior.network.to(device).train()
    size = args.size or int(prior.config["model"]["image_size"] if prior.family.architecture == "adm"
                            else prior.config["data"]["image_size"])
    channels = 2  # lfmri's complex slices (score_mri: its 1-channel prior on each part)
    x = 0.3 * torch.randn(args.batch, channels, size, size, device=device)
    score_fn = prior.score
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.iters):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = dsm_loss(net, prior.sde, x, score_fn=score_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in net.parameters())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {"family": family, "params": n_params, "size": size, "batch": args.batch, "dtype": dtype,
           "grad_checkpointing": grad_checkpointing, "step_s": statistics.median(times), "peak_gib": peak,
           "loss_finite": bool(torch.isfinite(loss))}
    print(f"{family:<10} {n_params:>12,} params {size}^2 batch {args.batch} {dtype:<4} ckpt "
          f"{grad_checkpointing!s:<5}: {row['step_s']:.3f} s/step, peak {peak:.2f} GiB", flush=True)
    del net, opt, prior
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="image size (default: the config's, 320 released)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--checkpointing", default="false,true", help="gradient checkpointing settings to run")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fixture-sizes", action="store_true", help="the tiny fixture networks (CPU smoke run)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    rows = []
    for family in args.families.split(","):
        for dtype in args.dtypes.split(","):
            for flag in args.checkpointing.split(","):
                try:
                    rows.append(bench(family, args, dtype, flag == "true"))
                except torch.OutOfMemoryError:
                    print(f"{family} {dtype} checkpointing {flag}: out of memory", flush=True)
                    rows.append({"family": family, "dtype": dtype, "grad_checkpointing": flag == "true",
                                 "oom": True})
                    torch.cuda.empty_cache()
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
