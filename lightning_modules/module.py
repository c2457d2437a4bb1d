"""`ScoreModel`: the LightningModule that trains / fine-tunes a score network under its SDE.

Thin over the plain parts: `ddpm.DDPM` (the network, `self.net`), `sde.VPSDE` (`self.sde`), `losses` (DSM and
the supervised one-step reconstruction loss) and `ema.EMA` (`self.ema`). With `pretrained.family` the network,
SDE and score function are instead a public checkpoint family's (`networks.families`: score_sde, hfs_sde,
score_mri, dds), so fine-tuning and sampling follow that family's conventions (VP, discrete VP or VE SDE).
The constructor's options come in typed blocks (frozen dataclasses, nested blocks in YAML and on the command
line): `net` (`DDPMConfig`), `pretrained` (`priors.PretrainedSource`), `loss` (`LossConfig`) and `optim`
(`OptimConfig`), beside the flat beta_min, beta_max, grad_checkpointing, compile and val_seed.
Which of the two is chosen once, in `__init__`: `self.prior_kind` (`priors.DDPMPrior` or `priors.FamilyPrior`,
one `priors.PriorKind` interface) holds the network, the SDE, the score convention, the data range and the
pretrained import, and the model only calls it.
Batches are `datamodules.SliceSample`s (training, validation, test: the losses use `clean` and `degraded`
float [B, 2, H, W]) and `datamodules.MeasuredSample`s (predict).

- Loss (`loss`): `dsm_weight * DSM(clean) + supervised_weight * supervised(degraded -> clean)`; a term with
  weight 0 is not computed in training. `supervised_conditioning` 'shared' (default) calls the network for the
  supervised term with the score's own time labels; 'separate' (score_sde's DDPM only) with labels shifted
  past the score's range (`losses.SUPERVISED_LABEL_OFFSET`), a conditioning the score never reads, so DSM,
  sampling and the checkpoint's score stay plain score_sde. Checkpoints without the option load as 'shared'.
  Validation and test always compute and log both, with a generator seeded by `val_seed + batch_idx`, so
  they are deterministic.
- Optimiser (`optim`): AdamW with a linear warm-up of the learning rate over `warmup_steps` optimiser steps (a
  LambdaLR stepped every step: factor min(1, (step + 1) / warmup_steps)). Gradient clipping is the Trainer's
  (`trainer.gradient_clip_val: 1.0`, score_sde's value); bf16 is the Trainer's `precision: bf16-mixed`.
- EMA: updated after every optimiser step, stored in the Lightning checkpoint under `"ema"` (score_sde's
  layout), swapped into the network for validation, test and predict; `score_fn()` gives samplers a
  score function on a frozen copy of the EMA weights.
- Pretrained weights (`pretrained.path`, a score_sde checkpoint, or a family's with `pretrained.family`) are
  loaded when fit / validate / test / predict start (after Lightning restored any `ckpt_path`), not in
  `__init__`: `load_from_checkpoint` and resuming with `ckpt_path` never re-read the clinical file. A family's
  network is built in `__init__` from its config alone, which is then kept in the hyperparameters
  (`pretrained.config`), so a Lightning checkpoint of such a model rebuilds without the original files.
  Without `pretrained.family` the family is detected from the checkpoint's config (`pretrained.config`, else
  `config.json` beside the file) where it names one other than score_sde (HFS-SDE's data.normalize_* fields,
  an NCSN++ or a guided-diffusion config; `networks.families.config_family`).
- A family trained on another data range (`Family.data_scale`; HFS-SDE: k-space / (1.5 x its std)) sees
  each slice multiplied by its factor (`data_scale`): the training batch (from the clean slice's k-space)
  and, through `inference.Reconstructor`, every reconstruction (from the measured k-space).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch import LightningModule
from lightning.pytorch.core.saving import load_hparams_from_yaml
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


@dataclass(frozen=True)
class LossConfig:
    """The training objective, `dsm_weight * DSM(clean) + supervised_weight * supervised(degraded -> clean)`
    (`ScoreModel`'s `loss` block: YAML `loss: {supervised_weight: 1.0}`, command line
    `--model.init_args.loss.supervised_weight=1.0`; ranges checked by `ScoreModel`).

    Attributes:
        dsm_weight: weight of denoising score matching (>= 0).
        supervised_weight: weight (lambda) of the supervised one-step reconstruction loss (>= 0).
        supervised_t0: range [min, max] in [0, 1] of the diffusion time t0 the supervised step starts from.
        supervised_loss: 'l1' | 'l2' (per-pixel mean absolute or squared error).
        supervised_conditioning: the supervised term's network call: 'shared' the score's time labels
            sde.labels(t0), as score_sde's DDPM sees them when sampling; 'separate' labels sde.labels(t0) +
            `losses.SUPERVISED_LABEL_OFFSET` (1000: above the score's 0..999), a conditioning only that term
            uses, x_t0 and the Tweedie step unchanged; only for score_sde's DDPM `net` with its time
            conditioning (not with `pretrained.family`, `net.conditional: false` or `net.scale_by_sigma`:
            InputError).
        likelihood_weighting: weight DSM by g(t)^2 (score_sde's likelihood weighting) instead of std(t)^2.
    """

    dsm_weight: float = 1.0
    supervised_weight: float = 0.0
    supervised_t0: tuple[float, float] = (0.05, 0.3)
    supervised_loss: Literal["l1", "l2"] = "l1"
    supervised_conditioning: Literal["shared", "separate"] = "shared"
    likelihood_weighting: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.supervised_t0, list):  # from YAML / JSON / hyper-parameters: a comparable tuple
            object.__setattr__(self, "supervised_t0", tuple(self.supervised_t0))


@dataclass(frozen=True)
class OptimConfig:
    """The optimisation (`ScoreModel`'s `optim` block: YAML `optim: {lr: 1.0e-4}`, command line
    `--model.init_args.optim.lr=1e-4`; ranges checked by `ScoreModel`).

    Attributes:
        lr: AdamW's learning rate after the warm-up (> 0).
        weight_decay: AdamW's decoupled weight decay (>= 0).
        warmup_steps: optimiser steps of the linear learning-rate warm-up (an integer >= 0; 0: none).
        ema_decay: decay of the weights' exponential moving average, per optimiser step, in [0, 1].
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5000
    ema_decay: float = 0.9999


#: the constructor's former flat options -> their dotted names in today's blocks (`upgrade_hparams`; the
#: command line's refusal of the old spelling, `lfmri.lightning_cli`); `pretrained`, the former checkpoint
#: path, is `pretrained.path`
LEGACY_OPTIONS: dict[str, str] = {
    "pretrained_weights": "pretrained.weights", "pretrained_config": "pretrained.config",
    "adapt_channels": "pretrained.adapt_channels", "pretrained_family": "pretrained.family",
    **{f.name: f"loss.{f.name}" for f in fields(LossConfig)},
    **{f.name: f"optim.{f.name}" for f in fields(OptimConfig)}}


def legacy_option_message(name: str, value: str | None = None) -> str | None:
    """The one line for `name`, a former flat option of `ScoreModel` ("lr", or a network field, "nf"):
    "model.init_args.lr moved to model.init_args.optim.lr (YAML: optim: {lr: ...})"; for "pretrained" given a
    checkpoint (`value`, a string where a block is expected) the block's `path`; None for any other name."""
    if name == "pretrained" and value is not None:
        return (f"model.init_args.pretrained is a block now: give the checkpoint as "
                f"model.init_args.pretrained.path={value} (YAML: pretrained: {{path: {value}}})")
    moved = f"net.{name}" if name in CONFIG_FIELDS else LEGACY_OPTIONS.get(name)
    if moved is None:
        return None
    block, _, field = moved.partition(".")
    return (f"model.init_args.{name} moved to model.init_args.{block}.{field} "
            f"(YAML: {block}: {{{field}: ...}})")


def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A `ScoreModel` checkpoint's hyper-parameters in today's layout: older checkpoints' flat network fields
    (nf, ch_mult, ...) gathered into `net`, their flat options gathered into the `pretrained`, `loss` and
    `optim` blocks (`LEGACY_OPTIONS`; a former pretrained block that names no file, config or family is
    None), their reconstruction options (predict_sampler, predict_steps, ...: no longer the model's, see
    `ScoreModel.predict_options`) dropped. Today's hyper-parameters come back unchanged (a copy)."""
    out = {k: v for k, v in hparams.items() if not k.startswith("predict_")}
    flat = {k: out.pop(k) for k in CONFIG_FIELDS if k in out}
    if flat:
        out["net"] = {**dict(out.get("net") or {}), **flat}
    legacy_source = isinstance(out.get("pretrained"), str) or "pretrained_weights" in out
    if isinstance(out.get("pretrained"), str):
        out["pretrained"] = {"path": out["pretrained"]}
    for old, new in LEGACY_OPTIONS.items():
        if old in out:
            block, field = new.split(".")
            out[block] = {**dict(out.get(block) or {}), field: out.pop(old)}
    source = out.get("pretrained")
    if legacy_source and all(source.get(k) is None for k in ("path", "config", "family")):
        out["pretrained"] = None
    return out


def _block(kind: type, value: Any) -> Any:
    """`value` as the dataclass `kind` (a mapping, as checkpoints and Python callers give it, is unpacked)."""
    return kind(**value) if isinstance(value, Mapping) else value


def _plain(block: Any) -> dict[str, Any]:
    """A dataclass block's fields as a plain mapping (tuples as lists): hparams.yaml, checkpoints, loggers."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(block).items()}


def _saved_hparams(checkpoint_path: Any, weights_only: bool | None) -> dict[str, Any]:
    """The hyper-parameters a Lightning checkpoint stores (a local path, read lazily; a URL; a binary file
    object, left where it was), read as Lightning reads it (`weights_only` None: torch's default)."""
    if hasattr(checkpoint_path, "read"):
        start = checkpoint_path.tell()
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only)
        checkpoint_path.seek(start)
    elif _is_local_file_protocol(checkpoint_path):
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only, mmap=True)
    else:
        with get_filesystem(checkpoint_path).open(checkpoint_path, "rb") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=weights_only)
    return dict(ckpt.get("hyper_parameters") or {})


class ScoreModel(LightningModule):
    """Score model with DSM + supervised losses, EMA and checkpoint import: score_sde's DDPM U-Net under the
    VP-SDE, or (`pretrained.family`) a public checkpoint family's network, SDE and score function.

    Args (9; the blocks are frozen dataclasses, nested blocks in YAML and on the command line, plain mappings
    in the hyper-parameters, which are read back as the blocks):
        net: the network, a `networks.ddpm.DDPMConfig` (score_sde's DDPM config fields: nf, ch_mult, ...,
            checked when it is made; YAML `net: {nf: 32, ...}`, command line `--model.init_args.net.nf=32`).
        pretrained: where pretrained weights come from, a `priors.PretrainedSource` (path, weights, config,
            adapt_channels, family; YAML `pretrained: {path: reference-small}`, command line
            `--model.init_args.pretrained.path=knee.pth`); None: train from scratch. `path` is a score_sde
            checkpoint, an lfmri Lightning checkpoint or a shipped short name (`reference-small`,
            checkpoint.SHIPPED_CHECKPOINTS), loaded strictly into `net` (`weights` 'ema' | 'model';
            `config` the checkpoint's score_sde config.json, default this network's, with the other channel
            count when `adapt_channels` is set, see `checkpoint` for the rule).
            With `family` ('score_sde' | 'hfs_sde' | 'score_mri' | 'dds'; None: detected from the config,
            else the DDPM above) `path` is that family's public checkpoint
            (`networks.families.load_pretrained`, `weights` 'family' its sampling weights) and `config` its
            config (a JSON / YAML / score_sde `.py` file; default: `config.json` beside `path`). The network
            (`self.net`), the SDE (`self.sde`: `VPSDE`, `DiscreteVPSDE` or `VESDE`) and the score function
            then come from the family and its config: `net`, beta_min, beta_max and `adapt_channels` are
            ignored. The prior must take 2 channels (real, imaginary), or 1 channel with the family's real /
            imaginary rule (score_mri: the score of [re, im] is [prior(re), prior(im)]). `__init__` reads only
            the config; `hparams.pretrained` then records the family and its config (resolved, a mapping),
            so the model's Lightning checkpoints rebuild without the original files.
        beta_min, beta_max: the VP-SDE's noise schedule (score_sde's DDPM).
        loss: the training objective, a `LossConfig` (dsm_weight, supervised_weight, supervised_t0,
            supervised_loss, supervised_conditioning, likelihood_weighting). With a family, DSM is the family
            SDE's (`losses`: VP and VE weighted by std(t)^2, discrete VP the noise-prediction loss at integer
            steps) and the supervised loss the Tweedie step through the family's score.
        optim: the optimisation, an `OptimConfig` (lr, weight_decay (AdamW), warmup_steps, ema_decay).
        grad_checkpointing: recompute activations in the backward pass (memory for time); applies to a
            family's network too (with `trainer.precision: bf16-mixed`, what fine-tuning DDS's 361M ADM
            needs).
        compile: torch.compile the network in setup.
        val_seed: the seed of validation and test losses and of `predict_step`'s sampler.

    Prediction is not configured here: `predict_step` samples with `predict_options` (a
    `samplers.SamplerOptions`, the registry's defaults unless `lfmri predict --sampling.*` sets them).
    Checkpoints written before the network became one object and before the option blocks (flat nf,
    ch_mult, ..., lr, dsm_weight, pretrained_family, ... and predict_* hyper-parameters) are read through
    `upgrade_hparams` (`load_from_checkpoint`, `lfmri.models`, `--ckpt_path`).
    """

    #: ranges of the options, by their dotted names (their types are the signature's and the blocks'); checked
    #: first in `__init__`, with a non-zero loss (the network's own fields are checked by `DDPMConfig`)
    OPTION_RULES = {
        "beta_min": number(0),
        "beta_max": number(0, low_open=True),
        "loss.dsm_weight": number(0),
        "loss.supervised_weight": number(0),
        "loss.supervised_t0": ordered_range(0, 1),
        "loss.supervised_conditioning": Rule(lambda v: v in ("shared", "separate"), "'shared' or 'separate'"),
        "optim.lr": number(0, low_open=True),
        "optim.weight_decay": number(0),
        "optim.warmup_steps": number(0, integer=True),
        "optim.ema_decay": number(0, 1),
        "pretrained.family": Rule(lambda v: v is None or v in FAMILIES,
                                  f"null or one of {', '.join(FAMILIES)}"),
    }

    def __init__(self, net: DDPMConfig = DDPMConfig(), pretrained: PretrainedSource | None = None,
                 beta_min: float = 0.1, beta_max: float = 20.0, loss: LossConfig = LossConfig(),
                 optim: OptimConfig = OptimConfig(), grad_checkpointing: bool = False, compile: bool = False,
                 val_seed: int = 0) -> None:
        super().__init__()
        net_config, source = _block(DDPMConfig, net), _block(PretrainedSource, pretrained)
        #: the objective and the optimisation, as typed blocks (the hyper-parameters hold plain mappings)
        self.loss_config: LossConfig = _block(LossConfig, loss)
        self.optim_config: OptimConfig = _block(OptimConfig, optim)
        values = {"beta_min": beta_min, "beta_max": beta_max,
                  "pretrained.family": (source or PretrainedSource()).family,
                  **{f"loss.{k}": v for k, v in vars(self.loss_config).items()},
                  **{f"optim.{k}": v for k, v in vars(self.optim_config).items()}}
        check_options(values, self.OPTION_RULES)  # before anything is built
        if self.loss_config.dsm_weight == 0 and self.loss_config.supervised_weight == 0:
            raise InputError("loss.dsm_weight and loss.supervised_weight are both 0: nothing to train; make "
                             "one > 0")
        # `save_hyperparameters` reads the arguments from this frame: the blocks are made plain mappings
        # first (plain values in hparams.yaml, checkpoints and the loggers, which cannot take a dataclass)
        net, loss, optim = net_config.to_dict(), _plain(self.loss_config), _plain(self.optim_config)
        pretrained = None if source is None else _plain(source)
        self.save_hyperparameters()
        #: the prior's kind (`priors`: score_sde's DDPM under `VPSDE`, or a checkpoint family's), chosen once;
        #: the network, SDE, score convention, data range and pretrained import all come from it
        self.prior_kind: PriorKind = prior_kind(net_config, source or PretrainedSource(),
                                                self.loss_config.supervised_conditioning, grad_checkpointing,
                                                beta_min, beta_max)
        if source is not None:  # recorded so the checkpoint rebuilds alone: a detected family, its config
            self.hparams.pretrained = _plain(dataclasses.replace(
                source, family=self.prior_kind.family, config=self.prior_kind.config))
        self.net = self.prior_kind.network
        self.sde = self.prior_kind.sde
        self.ema = EMA(self.net.parameters(), decay=self.optim_config.ema_decay)
        #: the sampler `predict_step` reconstructs with (`lfmri predict --sampling.*`; default the registry's)
        self.predict_options = SamplerOptions()
        self._weights_ready = self.prior_kind.source.path is None  # False: still to load (_ensure_weights)
        self._compiled = False
        self._ema_swap: ExitStack | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None,
                             **kwargs: Any) -> ScoreModel:
        """Lightning's `load_from_checkpoint`, with the checkpoint's hyper-parameters (or `hparams_file`'s)
        read in today's layout first (`upgrade_hparams`), so a checkpoint written before the option blocks
        builds the model it was trained as rather than one with default options; `kwargs` (either spelling)
        override them, field by field within a block (`optim={"lr": 1e-4}` keeps the other `optim` fields)."""
        saved = (load_hparams_from_yaml(hparams_file) if hparams_file is not None
                 else _saved_hparams(checkpoint_path, weights_only))
        today = {k: v for k, v in upgrade_hparams(saved).items() if not k.startswith("_")}
        for key, value in upgrade_hparams(kwargs).items():
            both = isinstance(value, Mapping) and isinstance(today.get(key), Mapping)
            today[key] = {**today[key], **value} if both else value
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only,
                                            **today)

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
        self.ema = EMA(self.net.parameters(), decay=self.optim_config.ema_decay)
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
        return SUPERVISED_LABEL_OFFSET if self.loss_config.supervised_conditioning == "separate" else 0.0

    def _losses(self, batch: SliceSample, generator: torch.Generator | None, compute_all: bool,
                ) -> dict[str, Tensor]:
        hp = self.loss_config
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

        Uses `degraded` [B, 2, H, W] as the warm start, and `y` [B, C, H, W] (C = 1 for a NIfTI; a k-space
        file's coils) with `params` (the forward operator's, with a k-space file's `mask` [B, 1, H, W] and
        ESPIRiT `sensitivities` [B, C, H, W]: `PredictSliceDataset` serves the slices of
        `datamodules.measured.load_measured_volume`, the volume `lfmri reconstruct` reconstructs) as a
        `degradations.Measurement` whose k-space noise std
        is `params["noise_sigma"]` [B] (normalised units) when the volume's is known (`lfmri predict`'s
        `predict.noise_sigma`, or recorded with a k-space file), else estimated from `y`, slice by slice.
        Sampler: `predict_options`
        (`lfmri predict --sampling.*`; default the registry's); the seed is `val_seed` and each slice's
        randomness depends on its slice index only. Returns
        `reconstruction` and `std` (magnitude [B, 1, H, W], normalised units: multiply by `scale`),
        `noise_sigma` [B] (normalised units), with `volume_id`, `slice` and `scale`
        passed through; `callbacks.NiftiPredictionWriter` writes them as NIfTI volumes.
        """
        hp = self.hparams
        sampler = self.predict_options.build(self.sde)
        # a user's measurement: `noise_sigma` among the params is its known noise std (given or recorded:
        # `PredictSliceDataset`); without it the level is estimated from y
        params = dict(batch.params)
        measured = Measurement.from_kspace(batch.y, params, params.pop("noise_sigma", None))
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
        hp = self.optim_config
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(int(hp.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
