"""The options shared by lfmri's model commands: the sampler flags of `lfmri reconstruct` and `lfmri evaluate`
(one definition of each flag) and the `--ckpt` check of those two and `lfmri export`.

Nothing here imports torch until a sampler is built: the commands check their arguments first, so a missing
file is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from lfmri_utils.files import check_input_file

if TYPE_CHECKING:  # the CLI builds its parsers without importing torch
    from lightning_modules.sampling.samplers import Sampler
    from lightning_modules.sampling.sde import SDE


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """`--sampler --steps --t0 --t0-ratio --stop-ratio --dc --dc-lambda --dc-floor --dc-weight` (None: the
    registry's defaults); the destinations are `samplers.SamplerOptions`' fields."""
    p.add_argument("--sampler", default=None,
                   help="sampler name (pc, warm_pc, ddim, warm_ddim, pnp, tweedie; default: the registry's "
                        "default)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps, 1 to 10000 (default: the sampler's)")
    p.add_argument("--t0", type=float, default=None,
                   help="start time in (0, 1]; with --t0-ratio the latest start (default: the sampler's)")
    p.add_argument("--t0-ratio", type=float, default=None,
                   help="DDIM's and PnP's noise-aware start: each slice starts where the diffusion noise is "
                        "this many times the measurement noise (at most --t0); 0 = every slice at --t0 "
                        "(default: the sampler's)")
    p.add_argument("--stop-ratio", type=float, default=None,
                   help="the noise-aware stop: each slice ends where the diffusion noise is this many times "
                        "the measurement noise and returns its Tweedie estimate there (an approximation of "
                        "the posterior mean); 0 = run to t ~ 0 (default: the sampler's)")
    p.add_argument("--dc", default=None, choices=("proximal", "gradient", "none"),
                   help="data consistency: noise-aware proximal step or the paper's gradient step "
                        "(default: the sampler's)")
    p.add_argument("--dc-lambda", type=float, default=None,
                   help="proximal DC coupling: x0's error std is sigma_t / sqrt(lambda) "
                        "(default: the sampler's)")
    p.add_argument("--dc-floor", type=float, default=None,
                   help="proximal DC: std of x0's error as sigma_t -> 0, normalised image units "
                        "(default: the sampler's)")
    p.add_argument("--dc-weight", type=float, default=None,
                   help="gradient DC step weight (default: the sampler's)")


def sampler_from_args(args: argparse.Namespace, sde: SDE | None) -> Sampler:
    """The sampler the options name, on the model's SDE (`ScoreModel.sde`: `VPSDE`, `DiscreteVPSDE` or
    `VESDE`, whatever its family; None: the default `VPSDE`, to check the options before the model is read);
    ValueError on an invalid option or `--samples` K > 1 for a point estimate."""
    from lightning_modules.sampling.samplers import SamplerOptions

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerOptions)}
    sampler = SamplerOptions(**options).build(sde)
    sampler.check_samples(getattr(args, "samples", 1))  # K samples of a point estimate would be identical
    return sampler


def check_checkpoint_argument(value: str) -> None:
    """InputError, before torch is imported, for a `--ckpt` that is a path (with a folder part or a suffix)
    but not a checkpoint file: missing, a folder, not a regular file. A bare name (`reference-small`) may be
    a shipped checkpoint's: `lightning_modules.checkpoint.resolve_checkpoint` resolves it with the model
    (shipped names have neither part, which tests/lfmri/test_fast_refusals.py checks)."""
    path = Path(value)
    if path.is_file() or (path.name == value and not path.suffix):
        return
    check_input_file(path, "", "checkpoint file")
