"""The one inference path of lfmri: measured slices -> posterior mean and std of their reconstruction.

`Reconstructor` (plain torch, no Lightning, no CLI) is what `lfmri reconstruct`, `lfmri evaluate`,
`lfmri predict` (`ScoreModel.predict_step`) and the validation `SamplerCallback` all call. For a stack of
slices of one matrix size, given as one `degradations.Measurement` (the measured k-space, single- or
multi-coil, fully sampled or not, the realised operator parameters, the B0 settings and the k-space noise std
with its origin, all decided when the measurement is made), it

1. takes each batch's forward operator A, measured k-space `[s,C,H,W]` and noise std from the measurement
   (`Measurement.data_term`: A built in one place, `degradations.build_operator`; with coils A maps the
   coil-combined image `[s,1,H,W]` to every coil's k-space);
2. runs the sampler with data consistency (`Sampler.posterior`) in batches, K posterior samples per slice,
   from the measured image `x_init` without the echo phase of a known B0 field map
   (`ForwardOperator.demodulate`: the warm start then sits in the frame of the images A acts on),
   at the slices' own matrix (the score function pads to the U-Net's multiple and crops back:
   `ScoreModel.score_fn`);
3. returns the per-pixel mean and std of the K magnitude images, 0 outside the coil maps' support where the
   measurement has maps (`Measurement.support`: the data say nothing there, ESPIRiT's maps are 0).

Undersampled data (a measurement with a `mask`) get the sampler's undersampled variant
(`Sampler.for_measurement`: the registry's undersampled defaults under the user's options). Its start image
is the zero-filled coil-combined image (`start="degraded"`), a TV compressed-sensing reconstruction
(`start="tv"`, `tv_start`, which then replaces x_init), or per slice the TV image where the zero-filled
image's aliasing std exceeds the noise std and the zero-filled image elsewhere (`start="auto"`). Either holds
aliasing besides noise, so the noise-aware start follows both, `sqrt(sigma_y^2 + alias^2)` with `alias` the
zero-filled image's aliasing std (`Measurement.alias_sigma`, estimated from the sampled k-space), times
`start_error` for a TV start (`Sampler.schedule_for`), while the data consistency and the stop keep the noise
std `sigma_y`. Fully sampled data are sampled exactly as before.

A prior trained on another data range (a checkpoint family's normalisation, `ScoreModel.data_scale`) gets
each slice multiplied by its factor c (`data_scale(k, noise_sigma)`, [S]) before sampling: x_init, y and the
noise std are scaled by c (A is linear and its parameters unitless), and the mean and std are divided by c,
so the output stays in the slices' units. `k` is y for single-coil data and the k-space of the coil-combined
degraded image `fft2c(Measurement.degraded)` `[S,1,H,W]` for multi-coil data (one channel, as the prior's
training data).

Randomness: every slice has its own generator, seeded by (seed, its slice index in the volume's stack), so a
slice's reconstruction depends on the seed and the slice only, not on the batch size or on which other slices
share its batch (up to floating-point summation order; the PC corrector's step size uses batch-averaged norms,
as score_sde does, so only PC depends on the batch's content).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from degradations import Measurement, channels_to_complex, complex_to_channels, fft2c
from diffusion.sampling.samplers import Sampler
from lfmri_utils.seeding import stable_hash

ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: `data_scale(k complex [S,1,H,W], noise_sigma [S]) -> c [S]`: the factor from the slices' units to a prior's
DataScale = Callable[[Tensor, Tensor], Tensor]

__all__ = ["DataScale", "Reconstruction", "Reconstructor", "slice_generators", "tv_start"]


@dataclass
class Reconstruction:
    """Output of `Reconstructor`: magnitude `mean` and `std` float32 `[S,1,H,W]` (the slices' units, on the
    CPU), the k-space noise std used per slice `noise_sigma` `[S]` (the measurement's, on the CPU) and its
    origin `noise_origin` ("recorded", "given" or "estimated"), the network evaluations per slice `nfe`
    (all K samples) and the `settings` of the sampler that ran (`Sampler.settings`; undersampled data get
    `Sampler.for_measurement`'s)."""

    mean: Tensor
    std: Tensor
    noise_sigma: Tensor
    noise_origin: str
    nfe: int
    settings: dict[str, Any]


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
        progress: a label for a progress bar on stderr (None: no bar).
        data_scale: the prior's per-slice data normalisation (`ScoreModel.data_scale`; None: the slices'
            units are the prior's); see the module docstring.
    """

    def __init__(self, score_fn: ScoreFn, sampler: Sampler, batch_size: int = 8,
                 device: torch.device | str = "cpu", progress: str | None = None,
                 data_scale: DataScale | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.score_fn, self.sampler, self.batch_size = score_fn, sampler, int(batch_size)
        self.device = torch.device(device)
        self.progress, self.data_scale = progress, data_scale

    def __call__(self, measurement: Measurement, x_init: Tensor, slice_ids: Sequence[int], seed: int = 0,
                 samples: int = 1) -> Reconstruction:
        """Reconstruct the S slices of a measurement (one matrix size `H x W`).

        Args:
            measurement: measured k-space, operator parameters, B0 settings and noise std of the S slices.
            x_init: float `[S,2,H,W]` (real, imag): the sampler's starting image (usually the degraded,
                coil-combined image `measurement.degraded`; replaced by `tv_start` for undersampled data
                whose sampler starts from TV).
            slice_ids: each slice's index in its volume's stack (seeds its randomness).
            seed: the reconstruction's seed.
            samples: K posterior samples per slice.
        """
        n = len(measurement)
        if tuple(x_init.shape) != (n, 2, *measurement.matrix):
            raise ValueError(f"x_init must be [S,2,H,W] = {(n, 2, *measurement.matrix)} (the measurement's), "
                             f"got {tuple(x_init.shape)}")
        if len(slice_ids) != n:
            raise ValueError(f"{len(slice_ids)} slice ids for {n} slices")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        kspace = measurement.y if measurement.n_coils == 1 else fft2c(measurement.degraded)
        scale = torch.ones(n) if self.data_scale is None else self.data_scale(
            kspace.to(self.device), measurement.noise_sigma.to(self.device)).float().cpu()
        if scale.shape != (n,) or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError(f"data_scale must give {n} finite factors > 0, got {scale.tolist()}")
        undersampled = measurement.mask is not None
        sampler = self.sampler.for_measurement(undersampled)
        # undersampled: each slice's start image (TV or zero-filled) and its error, aliasing beside the noise
        alias, from_tv = None, torch.zeros(n, dtype=torch.bool)
        if undersampled:
            alias = measurement.alias_sigma.cpu()
            from_tv = torch.full((n,), sampler.start == "tv") if sampler.start != "auto" else \
                alias > measurement.noise_sigma.float().cpu()
            alias = torch.where(from_tv, alias * sampler.start_error, alias).to(self.device)
        support = measurement.support
        means, stds, nfe = [], [], 0
        bar = tqdm(total=n, desc=self.progress, unit="slice", file=sys.stderr, leave=False,
                   disable=self.progress is None)
        with bar:
            for first in range(0, n, self.batch_size):
                sl = slice(first, min(first + self.batch_size, n))
                generators = slice_generators(seed, [int(s) for s in slice_ids[sl]], self.device)
                c = scale[sl].to(self.device)
                A, y, sigma = measurement.data_term(sl, self.device, c)
                x0 = complex_to_channels(A.demodulate(channels_to_complex(
                    x_init[sl].to(self.device, torch.float32))))
                tv = from_tv[sl].to(self.device)
                if bool(tv.any()):  # the TV image is already in the frame A acts on
                    image = complex_to_channels(tv_start(measurement, sampler.start_lam, sl).to(self.device))
                    x0 = torch.where(tv[:, None, None, None], image, x0)
                mean, std = sampler.posterior(self.score_fn, x0 * c[:, None, None, None], A, y, samples,
                                              generators, noise_sigma=sigma,
                                              alias_sigma=None if alias is None else alias[sl] * c)
                nfe = sampler.last_nfe
                inside = 1.0 if support is None else support[sl].to(self.device)
                means.append((mean.float() * inside / c[:, None, None, None]).cpu())
                stds.append((std.float() * inside / c[:, None, None, None]).cpu())
                bar.update(sl.stop - sl.start)
        return Reconstruction(torch.cat(means), torch.cat(stds), measurement.noise_sigma.float().cpu(),
                              measurement.noise_origin, nfe, sampler.settings())


def tv_start(measurement: Measurement, lam_factor: float, sl: slice) -> Tensor:
    """The TV compressed-sensing image of the slices `sl` (`degradations.classical.cs_reconstruct`, SigPy's
    PDHG; `lam = lam_factor * sigma_img`), complex64 `[s, 1, H, W]` on the CPU: undersampled data's start
    image where the sampler says `start="tv"`."""
    from degradations.classical import cs_reconstruct  # SigPy: imported on use (~2 s)

    return torch.from_numpy(cs_reconstruct(measurement, "tv", lam_factor, sl))[:, None]
