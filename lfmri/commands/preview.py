"""`lfmri preview --config C --out F.png`: look at the data before training.

For a few subjects of each split, the middle kept slice of the volume, clean and under each of the four
regimes (the val/test degradation for that slice: a pure function of the seed), side by side in one PNG, with
the realised parameters in the titles. Prints the split sizes and the parameters. The config is a LightningCLI
YAML (only its `data:` block is read) or a data block itself (`class_path` + `init_args`, or just the init
args), read by `lfmri.data_config.load_datamodule` (only LightningDataModule subclasses are instantiated).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from lfmri.commands import documented_parser
from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `preview` subcommand."""
    p = documented_parser(subparsers, "preview", "PNG grid of clean slices and their four low-field regimes",
                          __doc__)
    p.add_argument("--config", required=True, help="LightningCLI YAML with a data: block, or a data block")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--volumes-per-split", type=int, default=2, help="volumes shown per split (default 2)")
    p.set_defaults(func=run)


def _title(regime: str, p: dict[str, float | None]) -> str:
    from degradations import regime_label

    parts = [f"SNR {p['snr_db']:.1f} dB"]
    if p.get("fwhm_px"):
        parts.append(f"FWHM {p['fwhm_px']:.2f} px")
    if p.get("t2star_ms") is not None and math.isfinite(p["t2star_ms"]):
        parts.append(f"T2* {p['t2star_ms']:.0f} ms")
    if p.get("b0_max_hz"):
        parts.append(f"B0 {p['b0_max_hz']:.0f} Hz")
    return regime_label(regime) + "\n" + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Write the preview PNG; print split sizes and realised parameters."""
    out = Path(args.out)
    check_output_file(out, "--out", (".png",), (args.config,))  # before any work: suffix, folder, writable
    import torch

    from degradations import REGIMES, params_to_jsonable
    from lfmri.data_config import load_datamodule
    from lightning_modules.figures import Panel, image_grid

    if args.volumes_per_split < 1:
        raise InputError(f"--volumes-per-split must be >= 1, got {args.volumes_per_split}")
    dm = load_datamodule(args.config)
    sizes = dm.split.sizes()
    print("split sizes (subjects): " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    rows = []
    for split in ("train", "val", "test"):
        if not sizes[split]:
            continue
        infos = dm.volume_infos(split)
        print(f"  {split}: {len(infos)} volumes, {sum(len(i.slices) for i in infos)} kept slices")
        picked = [
            dataclasses.replace(i, slices=(i.slices[len(i.slices) // 2],))
            for i in infos[: args.volumes_per_split]
        ]
        ds = dm.eval_dataset(picked, list(REGIMES))
        for v, info in enumerate(picked):
            samples = [ds[i] for i, item in enumerate(ds.items) if item[0] == v]
            rows.append((split, info, samples))
    if not rows:
        raise InputError(f"{args.config}: no usable volume to preview in any split")
    cells = []
    for split, info, samples in rows:
        clean = torch.view_as_complex(samples[0].clean.permute(1, 2, 0).contiguous()).abs()
        vmax = float(clean.max()) or 1.0
        row = [Panel(clean.numpy(), vmax=vmax,
                     title=f"{split}: {info.record.volume_id}\nclean, slice {info.slices[0]}")]
        for sample in samples:
            img = torch.view_as_complex(sample.degraded.permute(1, 2, 0).contiguous()).abs()
            params = params_to_jsonable({k: v[None] for k, v in sample.params.items()})[0]
            row.append(Panel(img.numpy(), vmax=vmax, title=_title(sample.regime, params)))
            shown = {k: round(v, 3) if v is not None else None for k, v in params.items()}
            print(f"  {split} {info.record.volume_id} slice {info.slices[0]} {sample.regime}: {shown}")
        cells.append(row)
    fig = image_grid(cells, cell_size=(3.0, 3.6), fontsize=8)
    fig.suptitle(
        f"{dm.source.name} data: "
        + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + " subjects; "
        + (f"resized to {size}x{size}" if (size := dm.slices.image_size) else "native matrix")
        + "; magnitude, same grey scale per row"
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.6 * len(rows))))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    print(f"wrote {out}")
    return 0
