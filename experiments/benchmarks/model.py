"""Benchmark the 34.4M DDPM U-Net at 256x256: forward / backward / training-step time, peak memory, slices/s.

One training step = the DSM loss forward (network included), backward, and an AdamW step, under fp32 or bf16
autocast. Peak memory (weights, gradients, optimiser state and activations): on CUDA
`torch.cuda.max_memory_allocated`; on CPU each configuration runs in a fresh process and the peak is the
increase of its resident set size (RSS, sampled every 2 ms) over its value before the network is built.

    python experiments/benchmarks/model.py                              # CUDA if available, batch 1 2 4 8
    python experiments/benchmarks/model.py --device cpu --batch-sizes 1 --iters 2 --warmup 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from diffusion.losses import dsm_loss
from diffusion.networks.ddpm import DDPM, DDPMConfig
from diffusion.sampling.sde import VPSDE

NET_34M = DDPMConfig()  # score_sde's 34.4M DDPM at 256 px: the defaults


class RssPeak:
    """Peak resident set size (bytes) of this process while the context is open, sampled in a thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_net(device: torch.device, channels: int, grad_checkpointing: bool) -> DDPM:
    torch.manual_seed(0)
    config = dataclasses.replace(NET_34M, num_channels=channels)
    net = DDPM(config, grad_checkpointing=grad_checkpointing).to(device)
    return net.train()


def bench(net: DDPM, batch: int, dtype: str, device: torch.device, iters: int, warmup: int,
          channels: int) -> dict:
    """Time `warmup + iters` training steps at one batch size and precision; medians over the last iters."""
    sde = VPSDE()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, NET_34M.image_size, NET_34M.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    fwd, bwd, step = [], [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = dsm_loss(net, sde, x)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0), bwd.append(t2 - t1), step.append(t3 - t0)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    ms = statistics.median
    return {"device": device.type, "dtype": dtype, "batch": batch, "forward_ms": 1e3 * ms(fwd),
            "backward_ms": 1e3 * ms(bwd), "step_ms": 1e3 * ms(step), "slices_per_s": batch / ms(step),
            "peak_mib": peak_mib}


def cpu_config_in_this_process(batch: int, dtype: str, iters: int, warmup: int, channels: int,
                               grad_checkpointing: bool) -> dict:
    """One CPU configuration with the RSS peak measured from before the network is built (run in a child)."""
    device = torch.device("cpu")
    with RssPeak() as mem:
        row = bench(build_net(device, channels, grad_checkpointing), batch, dtype, device, iters, warmup,
                    channels)
    return {**row, "peak_mib": (mem.peak - mem.base) / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--iters", type=int, default=None, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 CUDA, 1 CPU)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    iters = args.iters or (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    net = build_net(device, args.channels, args.grad_checkpointing) if cuda else None
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} torch threads)"
    print(f"DDPM 34.4M U-Net, 256x256, {args.channels} channels, grad checkpointing "
          f"{args.grad_checkpointing}; torch {torch.__version__} on {name}; median of {iters} steps after "
          f"{warmup} warm-up")
    print("| device | precision | batch | forward ms | backward ms | train step ms | slices/s | peak MiB |")
    print("|---" * 8 + "|")
    rows = []
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            try:
                if cuda:
                    r = bench(net, batch, dtype, device, iters, warmup, args.channels)
                else:
                    spawn = multiprocessing.get_context("spawn")
                    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                        r = pool.submit(cpu_config_in_this_process, batch, dtype, iters, warmup,
                                        args.channels, args.grad_checkpointing).result()
            except torch.cuda.OutOfMemoryError:
                print(f"| {device.type} | {dtype} | {batch} | OOM | | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(r)
            print(f"| {r['device']} | {dtype} | {batch} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
                  f"{r['step_ms']:.1f} | {r['slices_per_s']:.3g} | {r['peak_mib']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
