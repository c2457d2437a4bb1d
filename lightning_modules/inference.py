"""The one inference path of lfmri: measured slices -> posterior mean and std of their reconstruction.

`Reconstructor` (plain torch, no Lightning, no CLI) is what `lfmri reconstruct`, `lfmri evaluate`,
`lfmri predict` (`ScoreModel.predict_step`) and the validation `SamplerCallback` all call. For a stack of
slices of one matrix size it

1. builds the forward operator A of each batch of slices from their realised parameters, in one place:
   `ForwardOperator.from_params(params, b0_method, n_segments)` (blur FWHM, T2*, timing, field maps, B0
   method; with time-segmented B0 and no `n_segments` given, one number of segments for the whole stack);
2. takes the k-space noise std per slice (`noise_sigma`, std of the complex noise per k-space sample in the
   slices' units): the known value where the caller has it (`lfmri degrade`'s records, the data module's
   simulation), else `degradations.estimate_noise_sigma` of the measured k-space; a slice whose noise cannot
   be estimated (e.g. all zero) takes the median of the volume's other slices (one noise level per
   acquisition); when no slice can be estimated it is an error;
3. runs the sampler with data consistency (`Sampler.posterior`) in batches, K posterior samples per slice,
   from the measured image `x_init` without the echo phase of a known B0 field map
   (`ForwardOperator.demodulate`: the warm start then sits in the frame of the images A acts on),
   at the slices' own matrix (the score function pads to the U-Net's multiple and crops back:
   `ScoreModel.score_fn`);
4. returns the per-pixel mean and std of the K magnitude images.

A prior trained on another data range (a checkpoint family's normalisation, `ScoreModel.data_scale`) gets
each slice multiplied by its factor c (`data_scale(y, noise_sigma)`, [S]) before sampling: x_init, y and the
noise std are scaled by c (A is linear and its parameters unitless), and the mean and std are divided by c,
so the output stays in the slices' units.

Randomness: every slice has its own generator, seeded by (seed, its slice index in the volume's stack), so a
slice's reconstruction depends on the seed and the slice only, not on the batch size or on which other slices
share its batch (up to floating-point summation order; the PC corrector's step size uses batch-averaged norms,
as score_sde does, so only PC depends on the batch's content).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from degradations import (
    ForwardOperator,
    LowFieldDegradation,
    channels_to_complex,
    complex_to_channels,
    estimate_noise_sigma,
)
from degradations.b0 import segment_count
from lfmri_utils.errors import InputError
from lfmri_utils.seeding import stable_hash
from lightning_modules.sampling.samplers import Sampler

ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: `data_scale(y complex [S,1,H,W], noise_sigma [S]) -> c [S]`: the factor from the slices' units to a prior's
DataScale = Callable[[Tensor, Tensor], Tensor]

__all__ = ["DataScale", "Reconstruction", "Reconstructor", "slice_generators"]


@dataclass
class Reconstruction:
    """Output of `Reconstructor`: magnitude `mean` and `std` float32 `[S,1,H,W]` (the slices' units, on the
    CPU), the k-space noise std used per slice `noise_sigma` `[S]` and whether it was estimated `estimated`
    `[S]` (bool), and the network evaluations per slice `nfe` (all K samples)."""

    mean: Tensor
    std: Tensor
    noise_sigma: Tensor
    estimated: Tensor
    nfe: int


def stack_noise_sigma(y: Tensor, params: Mapping[str, Tensor],
                      operator: Callable[[Mapping[str, Tensor]], ForwardOperator],
                      noise_sigma: Tensor | None = None, device: torch.device | str | None = None,
                      ) -> tuple[Tensor, Tensor]:
    """(sigma [S] float32 CPU, estimated [S] bool) of a stack: the known noise std where given
    (`noise_sigma`, else `params["noise_sigma"]`; NaN = unknown), else `estimate_noise_sigma` of y [S,1,H,W]
    with each slice's `operator(params of that slice)` on `device` (default y's); see the module docstring.
    InputError when no slice's noise can be estimated or a value is negative or not finite."""
    n = y.shape[0]
    device = y.device if device is None else device
    known = noise_sigma if noise_sigma is not None else params.get("noise_sigma")
    sigma = torch.full((n,), float("nan")) if known is None else \
        torch.as_tensor(known, dtype=torch.float32).detach().cpu().reshape(n).clone()
    unknown = torch.isnan(sigma)
    for i in torch.nonzero(unknown).flatten().tolist():
        p = {k: v[i:i + 1].to(device) for k, v in params.items()}
        try:
            sigma[i] = float(estimate_noise_sigma(y[i:i + 1].to(device), operator(p))[0])
        except ValueError:
            pass  # e.g. an all-zero slice: below, the median of the volume's other slices
    failed = torch.isnan(sigma)
    if bool(failed.all()):
        raise InputError("cannot estimate the k-space noise level of any slice (all empty?); give the "
                         "noise std (e.g. lfmri degrade's parameters) or a volume with signal")
    if bool(failed.any()):
        sigma[failed] = sigma[~failed].median()
    if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
        raise InputError(f"noise_sigma must be finite and >= 0, got {sigma.tolist()}")
    return sigma, unknown


def stack_segment_count(params: Mapping[str, Tensor], width: int, b0_method: str,
                        n_segments: int | None = None) -> int | None:
    """`n_segments`, or where it is None and the segmented B0 method has a field map, one number of B0
    time segments for the whole stack (readout length `width`), so a batch's operator does not depend on
    which slices share it."""
    if n_segments is None and b0_method == "segmented" and "b0_map_hz" in params \
            and bool((params["b0_map_hz"] != 0).any()):
        return segment_count(params["b0_map_hz"], params["readout_ms"], width)
    return n_segments


def slice_generators(seed: int, slice_ids: Sequence[int],
                     device: torch.device | str) -> list[torch.Generator]:
    """One generator per slice, seeded by (seed, slice index): the randomness of a slice's reconstruction."""
    return [torch.Generator(device=device).manual_seed(stable_hash("lfmri-reconstruct", int(seed), int(s)))
            for s in slice_ids]


class Reconstructor:
    """Reconstruct stacks of measured slices with a score prior and a `Sampler` (see the module docstring).

    Args:
        score_fn: `score_fn(x [B,2,H,W], t [B]) -> [B,2,H,W]` at any H, W (e.g. `ScoreModel.score_fn()`).
        sampler: from `samplers.build_sampler` (its DC kind and strength, steps, t0).
        batch_size: slices sampled together.
        device: where the sampler runs; inputs may be anywhere, outputs come back on the CPU.
        b0_method, n_segments: how A evaluates off-resonance (`degradations.b0`); the regime's settings.
        progress: a label for a progress bar on stderr (None: no bar).
        data_scale: the prior's per-slice data normalisation (`ScoreModel.data_scale`; None: the slices'
            units are the prior's); see the module docstring.
    """

    def __init__(self, score_fn: ScoreFn, sampler: Sampler, batch_size: int = 8,
                 device: torch.device | str = "cpu", b0_method: str = "segmented",
                 n_segments: int | None = None, progress: str | None = None,
                 data_scale: DataScale | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.score_fn, self.sampler, self.batch_size = score_fn, sampler, int(batch_size)
        self.device = torch.device(device)
        self.b0_method, self.n_segments, self.progress = b0_method, n_segments, progress
        self.data_scale = data_scale

    @classmethod
    def for_degradation(cls, score_fn: ScoreFn, sampler: Sampler, degradation: LowFieldDegradation,
                        batch_size: int = 8, device: torch.device | str = "cpu",
                        progress: str | None = None, data_scale: DataScale | None = None) -> Reconstructor:
        """A Reconstructor whose A evaluates B0 as the regime `degradation` simulates it (its method and
        number of segments; the defaults when the regime has no B0)."""
        b0 = degradation.b0
        if b0 is None:
            return cls(score_fn, sampler, batch_size, device, progress=progress, data_scale=data_scale)
        return cls(score_fn, sampler, batch_size, device, b0.method, b0.n_segments, progress, data_scale)

    def operator(self, params: Mapping[str, Tensor]) -> ForwardOperator:
        """The forward operator A of a batch of realised parameters (the one place inference builds A)."""
        return ForwardOperator.from_params(dict(params), self.b0_method, self.n_segments)

    def noise_sigma(self, y: Tensor, params: Mapping[str, Tensor],
                    noise_sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`stack_noise_sigma` with this reconstructor's operator and device."""
        return stack_noise_sigma(y, params, self.operator, noise_sigma, self.device)

    def __call__(self, x_init: Tensor, y: Tensor, params: Mapping[str, Tensor], slice_ids: Sequence[int],
                 seed: int = 0, samples: int = 1, noise_sigma: Tensor | None = None) -> Reconstruction:
        """Reconstruct S slices of one matrix size.

        Args:
            x_init: float `[S,2,H,W]` (real, imag): the sampler's starting image (usually `ifft2c(y)`).
            y: complex `[S,1,H,W]` measured k-space (centred orthonormal FFT), the slices' units.
            params: the realised degradation parameters, batched (`fwhm_px`, `t2star_ms`, `t2star_gre`,
                `readout_ms`, `te_ms` `[S]`, `b0_map_hz` `[S,1,H,W]`; optional `noise_sigma` `[S]`).
            slice_ids: each slice's index in its volume's stack (seeds its randomness).
            seed: the reconstruction's seed.
            samples: K posterior samples per slice.
            noise_sigma: `[S]` known k-space noise std (NaN = estimate); overrides `params["noise_sigma"]`.
        """
        n = x_init.shape[0]
        if x_init.dim() != 4 or x_init.shape[1] != 2:
            raise ValueError(f"x_init must be [S,2,H,W], got {tuple(x_init.shape)}")
        if tuple(y.shape) != (n, 1, *x_init.shape[-2:]) or not y.is_complex():
            raise ValueError(f"y must be complex [S,1,H,W] = {(n, 1, *x_init.shape[-2:])}, got "
                             f"{tuple(y.shape)} {y.dtype}")
        if len(slice_ids) != n:
            raise ValueError(f"{len(slice_ids)} slice ids for {n} slices")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        sigma, estimated = self.noise_sigma(y, params, noise_sigma)
        scale = torch.ones(n) if self.data_scale is None else \
            self.data_scale(y.to(self.device, torch.complex64), sigma.to(self.device)).float().cpu()
        if scale.shape != (n,) or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError(f"data_scale must give {n} finite factors > 0, got {scale.tolist()}")
        n_segments = stack_segment_count(params, y.shape[-1], self.b0_method, self.n_segments)
        means, stds, nfe = [], [], 0
        bar = tqdm(total=n, desc=self.progress, unit="slice", file=sys.stderr, leave=False,
                   disable=self.progress is None)
        with bar:
            for start in range(0, n, self.batch_size):
                sl = slice(start, min(start + self.batch_size, n))
                p = {k: v[sl].to(self.device) for k, v in params.items()}
                generators = slice_generators(seed, [int(s) for s in slice_ids[sl]], self.device)
                A = ForwardOperator.from_params(p, self.b0_method, n_segments)
                c = scale[sl].to(self.device)
                start = complex_to_channels(A.demodulate(channels_to_complex(x_init[sl].to(self.device,
                                                                                           torch.float32))))
                mean, std = self.sampler.posterior(
                    self.score_fn, start * c[:, None, None, None], A,
                    y[sl].to(self.device, torch.complex64) * c[:, None, None, None], samples, generators,
                    noise_sigma=sigma[sl].to(self.device) * c)
                nfe = self.sampler.last_nfe
                means.append((mean.float() / c[:, None, None, None]).cpu())
                stds.append((std.float() / c[:, None, None, None]).cpu())
                bar.update(sl.stop - sl.start)
        return Reconstruction(torch.cat(means), torch.cat(stds), sigma, estimated, nfe)
