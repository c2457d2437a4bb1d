"""`ScoreModel`: the LightningModule that trains / fine-tunes a score network under its SDE.

Thin over the plain parts: `ddpm.DDPM` (the network, `self.net`), `sde.VPSDE` (`self.sde`), `losses` (DSM and
the supervised one-step reconstruction loss) and `ema.EMA` (`self.ema`). With `pretrained_family` the network,
SDE and score function are instead a public checkpoint family's (`networks.families`: score_sde, hfs_sde,
score_mri, dds), so fine-tuning and sampling follow that family's conventions (VP, discrete VP or VE SDE).
Which of the two is chosen once, in `__init__`: `self.prior_kind` (`priors.DDPMPrior` or `priors.FamilyPrior`,
one `priors.PriorKind` interface) holds the network, the SDE, the score convention, the data range and the
pretrained import, and the model only calls it.
Batches are `datamodules.SliceSample`s (training, validation, test: the losses use `clean` and `degraded`
float [B, 2, H, W]) and `datamodules.MeasuredSample`s (predict).

- Loss: `dsm_weight * DSM(clean) + supervised_weight * supervised(degraded -> clean)`; a term with weight 0
  is not computed in training. `supervised_conditioning` 'shared' (default) calls the network for the
  supervised term with the score's own time labels; 'separate' (score_sde's DDPM only) with labels shifted
  past the score's range (`losses.SUPERVISED_LABEL_OFFSET`), a conditioning the score never reads, so DSM,
  sampling and the checkpoint's score stay plain score_sde. Checkpoints without the option load as 'shared'.
  Validation and test always compute and log both, with a generator seeded by `val_seed + batch_idx`, so
  they are deterministic.
- Optimiser: AdamW with a linear warm-up of the learning rate over `warmup_steps` optimiser steps (a LambdaLR
  stepped every step: factor min(1, (step + 1) / warmup_steps)). Gradient clipping is the Trainer's
  (`trainer.gradient_clip_val: 1.0`, score_sde's value); bf16 is the Trainer's `precision: bf16-mixed`.
- EMA: updated after every optimiser step, stored in the Lightning checkpoint under `"ema"` (score_sde's
  layout), swapped into the network for validation, test and predict; `score_fn()` gives samplers a
  score function on a frozen copy of the EMA weights.
- Pretrained weights (`pretrained`, a score_sde checkpoint, or a family's with `pretrained_family`) are loaded
  when fit / validate / test / predict start (after Lightning restored any `ckpt_path`), not in `__init__`:
  `load_from_checkpoint` and resuming with `ckpt_path` never re-read the clinical file. A family's network is
  built in `__init__` from its config alone, which is then kept in the hyperparameters
  (`pretrained_config`), so a Lightning checkpoint of such a model rebuilds without the original files.
  Without `pretrained_family` the family is detected from the checkpoint's config (`pretrained_config`, else
  `config.json` beside the file) where it names one other than score_sde (HFS-SDE's data.normalize_* fields,
  an NCSN++ or a guided-diffusion config; `networks.families.config_family`).
- A family trained on another data range (`Family.data_scale`; HFS-SDE: k-space / (1.5 x its std)) sees
  each slice multiplied by its factor (`data_scale`): the training batch (from the clean slice's k-space)
  and, through `inference.Reconstructor`, every reconstruction (from the measured k-space).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from datamodules.samples import MeasuredSample, SliceSample
from degradations import Measurement, channels_to_complex, fft2c
from diffusion.inference import DataScale, Reconstructor
from diffusion.losses import SUPERVISED_LABEL_OFFSET, dsm_loss, supervised_loss
from diffusion.networks.ddpm import CONFIG_FIELDS, DDPMConfig
from diffusion.networks.families import FAMILIES, Pretrained
from diffusion.sampling.samplers import SamplerOptions
from diffusion.sampling.sde import ScoreFn
from lfmri_utils.errors import InputError
from lfmri_utils.options import Rule, check_options, number, ordered_range
from lightning_modules.ema import EMA
from lightning_modules.priors import PretrainedSource, PriorKind, prior_kind


def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A `ScoreModel` checkpoint's hyper-parameters in today's layout: the network fields of older
    checkpoints (flat nf, ch_mult, ... arguments) gathered into `net`, their reconstruction options
    (predict_sampler, predict_steps, ...: no longer the model's, see `ScoreModel.predict_options`) dropped.
    Today's hyper-parameters come back unchanged (a copy)."""
    out = {k: v for k, v in hparams.items() if not k.startswith("predict_")}
    flat = {k: out.pop(k) for k in CONFIG_FIELDS if k in out}
    if flat:
        out["net"] = {**dict(out.get("net") or {}), **flat}
    return out


class ScoreModel(LightningModule):
    """Score model with DSM + supervised losses, EMA and checkpoint import: score_sde's DDPM U-Net under the
    VP-SDE, or (`pretrained_family`) a public checkpoint family's network, SDE and score function.

    Network: `net`, a `networks.ddpm.DDPMConfig` (score_sde's DDPM config fields: nf, ch_mult, ..., checked
    when it is made; YAML `net: {nf: 32, ...}`, command line `--model.init_args.net.nf=32`; a checkpoint's
    hyper-parameters keep it as a plain mapping, which is read back as the config); grad_checkpointing
    (recompute activations in the backward pass: memory for time).
    Pretrained: `pretrained` a score_sde checkpoint path, an lfmri Lightning checkpoint, or a shipped short
    name (`reference-small`, checkpoint.SHIPPED_CHECKPOINTS); `pretrained_weights` 'ema' | 'model' ('family':
    the family's sampling weights, with `pretrained_family`);
    `pretrained_config` the checkpoint's score_sde config.json (default: this network's config, with the
    other channel count when `adapt_channels` is set);
    `adapt_channels` adapt a 1 <-> 2 channel checkpoint to this network's `net.num_channels` (set it to
    net.num_channels; see `checkpoint` for the rule).
    Family (`pretrained_family`: 'score_sde' | 'hfs_sde' | 'score_mri' | 'dds'; None: the DDPM above):
    `pretrained` is then that family's public checkpoint (`networks.families.load_pretrained`) and
    `pretrained_config` its config (a JSON / YAML / score_sde `.py` file; default: `config.json` beside
    `pretrained`). The network (`self.net`), the SDE (`self.sde`: `VPSDE`, `DiscreteVPSDE` or `VESDE`) and
    the score function come from the family and its config: `net`, beta_min, beta_max and `adapt_channels`
    are ignored; `grad_checkpointing` applies to the family's network too (with `trainer.precision:
    bf16-mixed`, what fine-tuning DDS's 361M ADM needs). The
    prior must take 2 channels (real, imaginary), or 1 channel with the family's real / imaginary rule
    (score_mri: the score of [re, im] is [prior(re), prior(im)]). `__init__` reads only the config;
    `hparams.pretrained_config` then holds it (resolved, a mapping), so the model's Lightning checkpoints
    rebuild without the original files.
    SDE and losses: beta_min, beta_max; dsm_weight; supervised_weight (lambda); supervised_t0 (range of t0);
    supervised_loss 'l1' | 'l2'; supervised_conditioning 'shared' | 'separate' (the supervised term's network
    call: 'shared' the score's time labels sde.labels(t0), as score_sde's DDPM sees them when sampling;
    'separate' labels sde.labels(t0) + `losses.SUPERVISED_LABEL_OFFSET` (1000: above the score's 0..999), a
    conditioning only that term uses, x_t0 and the Tweedie step unchanged; only for score_sde's DDPM `net`
    with its time conditioning (not with `pretrained_family`, `net.conditional: false` or
    `net.scale_by_sigma`: InputError)); likelihood_weighting (DSM). With a family, DSM is the family SDE's
    (`losses`: VP and VE weighted by std(t)^2, discrete VP the noise-prediction loss at integer steps) and the
    supervised loss the Tweedie step through the family's score.
    Optimisation: lr, weight_decay (AdamW), warmup_steps, ema_decay, compile (torch.compile the network in
    setup), val_seed.
    Prediction is not configured here: `predict_step` samples with `predict_options` (a
    `samplers.SamplerOptions`, the registry's defaults unless `lfmri predict --sampling.*` sets them).
    Checkpoints written before the network became one object (flat nf, ch_mult, ... and predict_*
    hyper-parameters) are read through `upgrade_hparams`.
    """

    #: ranges of the options (their types are the signature's); checked first in `__init__`, with a non-zero
    #: loss (the network's own fields are checked by `DDPMConfig`)
    OPTION_RULES = {
        "beta_min": number(0),
        "beta_max": number(0, low_open=True),
        "dsm_weight": number(0),
        "supervised_weight": number(0),
        "supervised_t0": ordered_range(0, 1),
        "supervised_conditioning": Rule(lambda v: v in ("shared", "separate"), "'shared' or 'separate'"),
        "lr": number(0, low_open=True),
        "weight_decay": number(0),
        "warmup_steps": number(0, integer=True),
        "ema_decay": number(0, 1),
        "pretrained_family": Rule(lambda v: v is None or v in FAMILIES,
                                  f"null or one of {', '.join(FAMILIES)}"),
    }

    def __init__(self, net: DDPMConfig = DDPMConfig(), grad_checkpointing: bool = False,
                 pretrained: str | None = None, pretrained_weights: Literal["ema", "model", "family"] = "ema",
                 pretrained_config: str | dict[str, Any] | None = None, adapt_channels: int | None = None,
                 pretrained_family: str | None = None,
                 beta_min: float = 0.1, beta_max: float = 20.0, dsm_weight: float = 1.0,
                 supervised_weight: float = 0.0, supervised_t0: tuple[float, float] = (0.05, 0.3),
                 supervised_loss: Literal["l1", "l2"] = "l1",
                 supervised_conditioning: Literal["shared", "separate"] = "shared",
                 likelihood_weighting: bool = False,
                 lr: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 5000,
                 ema_decay: float = 0.9999, compile: bool = False, val_seed: int = 0) -> None:
        super().__init__()
        # a checkpoint's hyper-parameters hold the plain mapping; `save_hyperparameters` reads the arguments
        # from this frame, so `net` is made that mapping first (plain values in hparams.yaml, checkpoints and
        # the loggers, which cannot take a frozen dataclass)
        net_config = DDPMConfig(**net) if isinstance(net, Mapping) else net
        net = net_config.to_dict()
        self.save_hyperparameters()
        hp = self.hparams
        check_options(hp, self.OPTION_RULES)  # before anything is built
        if hp.dsm_weight == 0 and hp.supervised_weight == 0:
            raise InputError("dsm_weight and supervised_weight are both 0: nothing to train; make one > 0")
        source = PretrainedSource(pretrained, pretrained_weights, pretrained_config, adapt_channels,
                                  pretrained_family)
        #: the prior's kind (`priors`: score_sde's DDPM under `VPSDE`, or a checkpoint family's), chosen once;
        #: the network, SDE, score convention, data range and pretrained import all come from it
        self.prior_kind: PriorKind = prior_kind(net_config, source, supervised_conditioning,
                                                grad_checkpointing, beta_min, beta_max)
        # recorded so the checkpoint rebuilds alone: a detected family, a family's resolved config
        hp.pretrained_family = self.prior_kind.family
        hp.pretrained_config = self.prior_kind.config
        self.net = self.prior_kind.network
        self.sde = self.prior_kind.sde
        self.ema = EMA(self.net.parameters(), decay=ema_decay)
        #: the sampler `predict_step` reconstructs with (`lfmri predict --sampling.*`; default the registry's)
        self.predict_options = SamplerOptions()
        self._weights_ready = pretrained is None  # False: `pretrained` still to load (_ensure_weights)
        self._compiled = False
        self._ema_swap: ExitStack | None = None

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def prior(self) -> Pretrained | None:
        """The checkpoint family's prior around `net` (`networks.families.Pretrained`: its family, config,
        score and data range); None for score_sde's DDPM."""
        return self.prior_kind.pretrained

    def load_pretrained(self) -> None:
        """Load `pretrained` into the network (strictly; CheckpointError, or InputError for a family, if it
        does not fit: `PriorKind.load_pretrained`) and restart the EMA from those weights."""
        self.prior_kind.load_pretrained()
        self.ema = EMA(self.net.parameters(), decay=self.hparams.ema_decay)
        self._weights_ready = True

    def _ensure_weights(self) -> None:
        # runs after Lightning restored any checkpoint (ckpt_path), whose weights then win over `pretrained`
        if not self._weights_ready:
            self.load_pretrained()

    def setup(self, stage: str) -> None:
        if self.hparams.compile and not self._compiled:
            self.net.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        self._ensure_weights()

    def on_validation_start(self) -> None:
        self._ensure_weights()

    def on_test_start(self) -> None:
        self._ensure_weights()

    def on_predict_start(self) -> None:
        self._ensure_weights()

    @property
    def train_size(self) -> int:
        """The image size the network was configured for (pixels): `image_size`, or with a family its
        config's (`data.image_size`; dds: `model.image_size`)."""
        return self.prior_kind.train_size

    # ------------------------------------------------------------------------------------------- forward
    def _score_of(self, net: nn.Module) -> ScoreFn:
        """The score function of `net` (this model's network or a copy): score_sde's convention
        (`get_score_fn`) or the family's (`Pretrained.score`)."""
        return self.prior_kind.score_of(net)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Score [B, C, H, W] at x [B, C, H, W] (any H x W: the network pads to its `size_multiple` and crops
        back), t [B], with the network's current weights."""
        return self._score_of(self.net)(x, t)

    def frozen_net(self, use_ema: bool = True) -> nn.Module:
        """A frozen eval-mode copy of the network (on the module's device) with the EMA or current weights."""
        net = self.prior_kind.new_network(self.device)
        net.load_state_dict(self.net.state_dict())
        if use_ema:
            self.ema.copy_to(net.parameters())
        return net.eval().requires_grad_(False)

    def score_fn(self, use_ema: bool = True) -> ScoreFn:
        """score_fn(x [B, 2, H, W] (real, imaginary), t [B]) -> score [B, 2, H, W] for samplers, on a frozen
        copy of the EMA (or current) weights; with a family, its score (`Pretrained.score`; score_mri's
        1-channel prior on the real and the imaginary part apart).

        It runs at any H x W (a slice's native matrix): the network pads x at the bottom and right to
        multiples of its `size_multiple` and crops its output back (`sde.pad_to_multiple`; exactly the
        unpadded network where H and W are multiples)."""
        return self._score_of(self.frozen_net(use_ema))

    @property
    def data_scale(self) -> DataScale | None:
        """The family's per-slice data normalisation (`Pretrained.data_scale`: `(kspace, noise_sigma) -> [B]`,
        the factor from lfmri's units to the prior's); None where lfmri's units are the prior's (score_sde's
        DDPM, and the families whose `data_scale` is 'none'). The `inference.Reconstructor` and the losses
        apply it."""
        return self.prior_kind.data_scale

    # ------------------------------------------------------------------------------------------ losses
    @property
    def supervised_label_offset(self) -> float:
        """What the supervised term adds to the network's time labels: 0 ('shared'), or
        `losses.SUPERVISED_LABEL_OFFSET` ('separate'; score_sde's DDPM only)."""
        return SUPERVISED_LABEL_OFFSET if self.hparams.supervised_conditioning == "separate" else 0.0

    def _losses(self, batch: SliceSample, generator: torch.Generator | None, compute_all: bool,
                ) -> dict[str, Tensor]:
        hp = self.hparams
        score_fn = self.prior_kind.loss_score_fn  # None: score_sde's DDPM convention
        if self.data_scale is not None:  # in the prior's data range, from each clean slice's k-space
            c = self.data_scale(fft2c(channels_to_complex(batch.clean)))[:, None, None, None]
            batch = batch._replace(clean=batch.clean * c, degraded=batch.degraded * c)
        out: dict[str, Tensor] = {}
        if compute_all or hp.dsm_weight > 0:
            out["dsm"] = dsm_loss(self.net, self.sde, batch.clean,
                                  likelihood_weighting=hp.likelihood_weighting, generator=generator,
                                  score_fn=score_fn)
        if compute_all or hp.supervised_weight > 0:
            out["supervised"] = supervised_loss(self.net, self.sde, batch.degraded, batch.clean,
                                                t0_range=tuple(hp.supervised_t0), loss=hp.supervised_loss,
                                                generator=generator, score_fn=score_fn,
                                                label_offset=self.supervised_label_offset)
        weights = {"dsm": hp.dsm_weight, "supervised": hp.supervised_weight}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    def training_step(self, batch: SliceSample, batch_idx: int) -> Tensor:
        losses = self._losses(batch, None, compute_all=False)
        n = batch.clean.shape[0]
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=n, prog_bar=k == "loss")
        return losses["loss"]

    def _eval_step(self, batch: SliceSample, batch_idx: int, prefix: str) -> None:
        gen = torch.Generator(device=self.device).manual_seed(self.hparams.val_seed + batch_idx)
        losses = self._losses(batch, gen, compute_all=True)
        n = batch.clean.shape[0]
        for k, v in losses.items():
            self.log(f"{prefix}/{k}", v, batch_size=n, sync_dist=True, prog_bar=k == "loss")

    def validation_step(self, batch: SliceSample, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: SliceSample, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: MeasuredSample, batch_idx: int) -> dict[str, Any]:
        """Reconstruct a batch of measured slices through the one inference path (`inference.Reconstructor`).

        Uses `degraded` [B, 2, H, W] as the warm start, and `y` [B, 1, H, W] with `params` (the forward
        operator's: `PredictSliceDataset` serves the slices of `datamodules.measured.load_measured_volume`,
        the volume `lfmri reconstruct` reconstructs, whose NIfTI has no recorded noise level) as a
        `degradations.Measurement` whose k-space noise level is estimated from `y`, slice by slice (a
        `noise_sigma` among `params` is no measurement's and is dropped). Sampler: `predict_options`
        (`lfmri predict --sampling.*`; default the registry's); the seed is `val_seed` and each slice's
        randomness depends on its slice index only. Returns
        `reconstruction` and `std` (magnitude [B, 1, H, W], normalised units: multiply by `scale`),
        `noise_sigma` [B] (normalised units), with `volume_id`, `slice` and `scale`
        passed through; `callbacks.NiftiPredictionWriter` writes them as NIfTI volumes.
        """
        hp = self.hparams
        sampler = self.predict_options.build(self.sde)
        # a user's measurement: its neutral params' noise_sigma (0) is no record, the level is estimated
        params = {k: v for k, v in batch.params.items() if k != "noise_sigma"}
        measured = Measurement.from_kspace(batch.y, params)
        reconstruct = Reconstructor(self.score_fn(), sampler, len(measured), self.device,
                                    data_scale=self.data_scale)
        result = reconstruct(measured, batch.degraded, batch.slice.tolist(), seed=hp.val_seed)
        return {"reconstruction": result.mean, "std": result.std, "noise_sigma": result.noise_sigma,
                "volume_id": batch.volume_id, "slice": batch.slice, "scale": batch.scale}

    # --------------------------------------------------------------------------------------------- EMA
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (once per optimiser step, before any callback such as
        ModelCheckpoint sees the step, so checkpoints and resumes hold the EMA of exactly that step)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net.parameters())

    def _swap_in_ema(self) -> None:
        if self._ema_swap is None:
            self._ema_swap = ExitStack()
            self._ema_swap.enter_context(self.ema.average_parameters(self.net.parameters()))

    def _swap_out_ema(self) -> None:
        if self._ema_swap is not None:
            self._ema_swap.close()
            self._ema_swap = None

    def on_validation_epoch_start(self) -> None:
        self._swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._swap_out_ema()

    def on_test_epoch_start(self) -> None:
        self._swap_in_ema()

    def on_test_epoch_end(self) -> None:
        self._swap_out_ema()

    def on_predict_epoch_start(self) -> None:
        self._swap_in_ema()

    def on_predict_epoch_end(self) -> None:
        self._swap_out_ema()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        self._weights_ready = True  # the checkpoint's weights replace any pretrained ones

    # ------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(int(hp.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
