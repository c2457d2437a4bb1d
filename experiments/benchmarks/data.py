"""Training-loader throughput of LowFieldDataModule (bundled data, all four regimes drawn at random).

    .venv/bin/python experiments/benchmarks/data.py [--sizes 128 256 320] [--workers 0 2] [--samples 256]

Prints samples per second for each (image size, num_workers), timed after the first batch (worker start-up and
pseudo-subject generation excluded), plus the per-regime cost of one degradation in the main process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def loader_rate(size: int, workers: int, samples: int, batch_size: int) -> float:
    """Training samples per second of the data module's train_dataloader."""
    from datamodules import BundledSource, LowFieldDataModule

    dm = LowFieldDataModule(
        source=BundledSource(n_train=2, n_val=0),
        slices={"image_size": size},
        loader={"batch_size": batch_size, "num_workers": workers},
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    n, start = 0, time.perf_counter()
    while n < samples:
        n += len(next(it).volume_id)
    return n / (time.perf_counter() - start)


def regime_ms(size: int, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per slice of each regime's draw + apply (one thread)."""
    from degradations import REGIMES, make_regime

    x = torch.randn(1, 1, size, size, dtype=torch.complex64)
    out = {}
    for name in REGIMES:
        deg, g = make_regime(name), torch.Generator().manual_seed(0)
        deg(x, g)
        start = time.perf_counter()
        for _ in range(repeats):
            deg(x, g)
        out[name] = 1000 * (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 320])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}, torch {torch.__version__}, batch size {args.batch_size}")
    print(f"{'image':>7} {'workers':>8} {'samples/s':>10}")
    for size in args.sizes:
        for workers in args.workers:
            rate = loader_rate(size, workers, args.samples, args.batch_size)
            print(f"{size:>5}^2 {workers:>8} {rate:>10.1f}", flush=True)
    torch.set_num_threads(1)
    for size in args.sizes:
        costs = ", ".join(f"{k} {v:.1f}" for k, v in regime_ms(size).items())
        print(f"degradation ms/slice at {size}^2 (1 thread): {costs}")


if __name__ == "__main__":
    main()
