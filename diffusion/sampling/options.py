"""The fields of `samplers.SamplerOptions`, a sampler as a user chooses it: the one type of every entry point
that takes one.

`lfmri reconstruct` / `lfmri evaluate` (`--sampling.<field>`, generated from these fields by
`lfmri.commands.sampler_options`), `lfmri predict` (`--sampling.<field>`, LightningCLI) and the validation
`SamplerCallback` (`init_args.sampling.<field>`) spell each option as its field name here. Each field's help
text is its `metadata["help"]`.

Nothing here imports torch, nor the sampler code: the argparse commands build their parsers from these fields
before any heavy import; `samplers.SamplerOptions` adds `build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: the data-consistency kinds of a sampler
DCKind = Literal["proximal", "gradient", "none"]
#: the image a sampler starts from on undersampled data: the zero-filled coil-combined image, a TV
#: compressed-sensing reconstruction (`degradations.classical.cs_reconstruct`), or per slice the TV image
#: where the zero-filled image's aliasing exceeds its noise and the zero-filled image elsewhere
StartKind = Literal["degraded", "tv", "auto"]

__all__ = ["FORMER_SPELLINGS", "DCKind", "SamplerOptionFields", "StartKind"]

#: the options that had a spelling of their own before issue 23 (`--dc-lambda`, the validation callback's flat
#: `dc_lambda:`), kept as deprecated aliases; options added since have only `sampling.<field>`
FORMER_SPELLINGS = ("sampler", "steps", "t0", "dc", "dc_weight", "dc_lambda", "dc_floor", "t0_ratio",
                    "stop_ratio")


def _option(help_text: str) -> Any:
    """A field that defaults to None (the registry's default) with its help text."""
    return field(default=None, metadata={"help": help_text})


@dataclass(frozen=True)
class SamplerOptionFields:
    """The fields of `samplers.SamplerOptions` (which adds `build`): a `samplers.SAMPLERS` name and the
    options a user sets; None takes the registry's default (`SAMPLERS[sampler]`)."""

    sampler: str | None = _option(
        "sampler name (pc, warm_pc, ddim, warm_ddim, pnp, tweedie; default: the registry's default)")
    steps: int | None = _option("sampler steps, 1 to 10000 (default: the sampler's)")
    t0: float | None = _option(
        "start time in (0, 1]; with t0_ratio the latest start (default: the sampler's)")
    dc: DCKind | None = _option(
        "data consistency: noise-aware proximal step or the paper's gradient step (default: the sampler's)")
    dc_weight: float | None = _option("gradient DC step weight (default: the sampler's)")
    dc_lambda: float | None = _option(
        "proximal DC coupling: x0's error std is sigma_t / sqrt(lambda) (default: the sampler's)")
    dc_floor: float | None = _option(
        "proximal DC: std of x0's error as sigma_t -> 0, normalised image units (default: the sampler's)")
    t0_ratio: float | None = _option(
        "DDIM's and PnP's noise-aware start: each slice starts where the diffusion noise is this many times "
        "the measurement noise (at most t0); 0 = every slice at t0 (default: the sampler's)")
    stop_ratio: float | None = _option(
        "the noise-aware stop: each slice ends where the diffusion noise is this many times the measurement "
        "noise and returns its Tweedie estimate there (an approximation of the posterior mean); 0 = run to "
        "t ~ 0 (default: the sampler's)")
    start: StartKind | None = _option(
        "undersampled data (a mask): start from the zero-filled image (degraded), a TV compressed-sensing "
        "reconstruction (tv), or per slice TV where the aliasing exceeds the noise (auto) (default: the "
        "sampler's)")
    start_lam: float | None = _option(
        "the TV start's regularisation lam = start_lam x the image noise std, as tv_cs's lam_factor "
        "(default: the sampler's)")
    start_error: float | None = _option(
        "undersampled data: the TV start image's error std as a fraction of the zero-filled image's "
        "aliasing; the noise-aware start follows it with the noise (default: the sampler's)")
