"""The two kinds of prior a `module.ScoreModel` trains, behind one interface (`PriorKind`).

- `DDPMPrior`: score_sde's DDPM U-Net (`networks.ddpm.DDPM`, built from the model's `net` config) under the
  VP-SDE (beta_min, beta_max), with score_sde's score convention (`sampling.sde.get_score_fn`); `pretrained`,
  if any, is a score_sde checkpoint (or an lfmri one), loaded by `checkpoint.load_score_sde_checkpoint`.
- `FamilyPrior`: a public checkpoint family's network, SDE, score function and data range
  (`networks.families.Pretrained`: score_sde, hfs_sde, score_mri, dds), built from the family's config alone;
  `pretrained` is that family's checkpoint (`networks.families.load_pretrained`).

`prior_kind` picks one, once, from the model's `pretrained` block (`PretrainedSource`): the family named,
else the one `pretrained`'s config names (`detect_family`), else the DDPM. The model then only calls the
`PriorKind` interface: it never asks which kind it holds.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from diffusion.checkpoint import CheckpointError, load_score_sde_checkpoint, resolve_checkpoint
from diffusion.inference import DataScale
from diffusion.networks.ddpm import DDPM, DDPMConfig
from diffusion.networks.families import (
    Pretrained,
    check_family_config,
    config_family,
    family_prior,
    read_config,
)
from diffusion.networks.families import load_pretrained as load_family_checkpoint
from diffusion.sampling.sde import SDE, VPSDE, ScoreFn, get_score_fn
from lfmri_utils.errors import InputError


@dataclass(frozen=True)
class PretrainedSource:
    """Where a model's pretrained weights come from: `ScoreModel`'s `pretrained` block (YAML
    `pretrained: {path: ..., family: ...}`, command line `--model.init_args.pretrained.path=...`).

    Attributes:
        path: a score_sde checkpoint, an lfmri Lightning checkpoint or a shipped short name
            (`reference-small`); None: no weights to import (a family's network is then built from `config`
            alone, as in the model's own checkpoints).
        weights: 'ema' | 'model' ('family': the family's sampling weights, with `family`).
        config: the checkpoint's config (a JSON / YAML / score_sde `.py` file, or a mapping; None: the
            `config.json` beside `path` for a family, this network's config for score_sde's DDPM).
        adapt_channels: adapt a 1 <-> 2 channel score_sde checkpoint to the network's `net.num_channels`
            (set it to net.num_channels; score_sde's DDPM only).
        family: the checkpoint family ('score_sde' | 'hfs_sde' | 'score_mri' | 'dds'; None: detected from
            the config, else score_sde's DDPM).
    """

    path: str | None = None
    weights: Literal["ema", "model", "family"] = "ema"
    config: str | dict[str, Any] | None = None
    adapt_channels: int | None = None
    family: str | None = None


def checkpoint_config(source: PretrainedSource) -> str | dict[str, Any] | None:
    """`source`'s config: its `config`, else the `config.json` beside its file; None when neither is there."""
    if source.config is not None:
        return source.config
    if source.path is None:
        return None
    beside = resolve_checkpoint(source.path).with_name("config.json")
    return str(beside) if beside.is_file() else None


def detect_family(source: PretrainedSource) -> str | None:
    """The family of `source`'s checkpoint when its config (`checkpoint_config`) says it unambiguously and it
    is not score_sde's (whose DDPM the model's `net` describes); None otherwise, and without a checkpoint
    (`source.path` None: a config alone picks no family)."""
    if source.path is None:
        return None
    config = checkpoint_config(source)
    family = None if config is None else config_family(read_config(config))
    if family is None or family.name == "score_sde":
        return None
    where = "pretrained.config" if source.config is not None else str(config)
    rank_zero_info(f"{where} is a {family.name} checkpoint config ({family.summary}): using "
                   f"pretrained.family={family.name}")
    return family.name


def _family_config(source: PretrainedSource, family: str) -> str | dict[str, Any]:
    """The config to build `family`'s prior from (`checkpoint_config`); InputError, one line, when there is
    none."""
    config = checkpoint_config(source)
    if config is not None:
        return config
    if source.path is None:
        raise InputError(f"pretrained.family {family!r} needs pretrained.path (the checkpoint) "
                         "or pretrained.config (its config)")
    path = Path(source.path)
    if not path.is_file():
        raise InputError(f"pretrained.path {path}: no such file")
    raise InputError(f"pretrained.path {path}: no config.json beside it; pass pretrained.config (the "
                     f"{family} config: JSON, YAML or .py)")


class PriorKind(ABC):
    """What a `ScoreModel` takes from its prior's kind: the network it trains (`network`, the model's `net`)
    and its SDE, the score convention, the data range, the image size and how pretrained weights load.

    Attributes:
        network: the network to train and keep an EMA of (built on the CPU in train mode).
        sde: the SDE it is a score of (`VPSDE`, `DiscreteVPSDE` or `VESDE`).
        family: the checkpoint family the model's hyper-parameters record as `pretrained.family` (None:
            score_sde's DDPM).
        config: what they record as `pretrained.config` (a family's: its resolved config, so a checkpoint
            rebuilds from it alone).
        source: where the pretrained weights come from.
    """

    network: nn.Module
    sde: SDE
    family: str | None
    config: str | dict[str, Any] | None
    source: PretrainedSource

    @property
    @abstractmethod
    def pretrained(self) -> Pretrained | None:
        """The family's prior around `network` (None: score_sde's DDPM)."""

    @property
    @abstractmethod
    def train_size(self) -> int:
        """The image size (pixels) the network was configured for."""

    @property
    @abstractmethod
    def data_scale(self) -> DataScale | None:
        """`(kspace, noise_sigma) -> [B]`, the factor from lfmri's units to the prior's; None where they are
        the same."""

    @property
    @abstractmethod
    def loss_score_fn(self) -> ScoreFn | None:
        """The score function the losses call (`losses.dsm_loss`'s `score_fn`; None: score_sde's DDPM
        convention, `get_score_fn(network, sde)`, which also lets the supervised loss shift the labels)."""

    @abstractmethod
    def score_of(self, net: nn.Module) -> ScoreFn:
        """The score function of `net` (`network` or a copy of it with other weights)."""

    @abstractmethod
    def new_network(self, device: torch.device | str) -> nn.Module:
        """A new network of `network`'s architecture on `device`, to load a state dict into."""

    @abstractmethod
    def load_pretrained(self) -> None:
        """Load `source`'s checkpoint into `network`, strictly (CheckpointError or InputError if it does not
        fit)."""


class DDPMPrior(PriorKind):
    """score_sde's DDPM U-Net for `net` under `VPSDE(beta_min, beta_max)`.

    Raises InputError (one line): `source.weights` 'family' (only a family has those), or
    `conditioning` 'separate' with a network without plain time labels (`net.conditional: false`: the
    offset would change nothing; `net.scale_by_sigma`: it indexes `sigmas` by the label, which the offset
    takes out of range).
    """

    def __init__(self, net: DDPMConfig, source: PretrainedSource, conditioning: str,
                 grad_checkpointing: bool = False, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if source.weights == "family":
            raise InputError("pretrained.weights 'family' needs pretrained.family")
        if conditioning == "separate" and (not net.conditional or net.scale_by_sigma):
            field = "net.conditional: false" if not net.conditional else "net.scale_by_sigma: true"
            raise InputError(f"loss.supervised_conditioning 'separate' needs the DDPM's time labels as a "
                             f"plain embedding, not {field}; use 'shared'")
        self.network = DDPM(net, grad_checkpointing=grad_checkpointing)
        self.sde = VPSDE(beta_min=beta_min, beta_max=beta_max)
        self.family = None
        self.config = source.config
        self.source = source

    @property
    def pretrained(self) -> None:
        return None

    @property
    def train_size(self) -> int:
        return self.network.config.image_size

    @property
    def data_scale(self) -> None:
        return None

    @property
    def loss_score_fn(self) -> None:
        return None

    def score_of(self, net: nn.Module) -> ScoreFn:
        return get_score_fn(net, self.sde)

    def new_network(self, device: torch.device | str) -> nn.Module:
        return DDPM(self.network.config).to(device)

    def load_pretrained(self) -> None:
        """Load the score_sde checkpoint: its config is `source.config` (another family's is refused: it
        would load "strictly" and score wrong), else taken to be this network's (with the other channel
        count when adapting, `source.adapt_channels`); CheckpointError where the checkpoint's network differs
        from this one."""
        source, config = self.source, self.source.config
        if config is not None:
            try:
                check_family_config("score_sde", config)
            except InputError as err:
                raise InputError(f"pretrained.config {err}; set model.init_args.pretrained.family") from None
        if config is None:
            config = self.network.config.score_sde_config()
            if source.adapt_channels is not None:
                config["data"]["num_channels"] = 3 - self.network.config.num_channels
        loaded = load_score_sde_checkpoint(source.path, config, weights=source.weights,
                                           adapt_channels=source.adapt_channels)
        ours = {k: v for k, v in self.network.config.to_dict().items() if k != "dropout"}
        theirs = {k: v for k, v in loaded.config.to_dict().items() if k != "dropout"}
        if ours != theirs:
            diff = ", ".join(f"{k}={theirs[k]!r} (this model {v!r})"
                             for k, v in ours.items() if v != theirs[k])
            raise CheckpointError(f"{source.path}: the pretrained network differs from this model's: "
                                  f"{diff}")
        self.network.load_state_dict(loaded.state_dict(), strict=True)


class FamilyPrior(PriorKind):
    """A checkpoint family's prior (`networks.families.family_prior`), built from its config alone
    (`source.config`, else the `config.json` beside `source.path`); `grad_checkpointing` applies to its
    network.

    Raises InputError (one line): `conditioning` 'separate' (the family's score function has no labels to
    shift), no config, a config of another family, or a prior that cannot take lfmri's 2 channels (real,
    imaginary): it must take 2, or 1 with the family's real / imaginary rule.
    """

    def __init__(self, family: str, source: PretrainedSource, conditioning: str,
                 grad_checkpointing: bool = False) -> None:
        if conditioning == "separate":
            raise InputError(f"loss.supervised_conditioning 'separate' is only for score_sde's DDPM (net), "
                             f"not a checkpoint family (pretrained.family={family}); use 'shared'")
        self._prior = family_prior(family, _family_config(source, family), grad_checkpointing)
        c, rule = self._prior.channels, self._prior.family.complex_rule
        if not (c == 2 or (c == 1 and rule == "real_imag_separately")):
            raise InputError(f"the {family} prior takes {c} channel(s) ({rule}); lfmri's "
                             "images are 2 (real, imaginary)")
        self.network = self._prior.network
        self.sde = self._prior.sde
        self.family = family
        self.config = self._prior.config
        self.source = source

    @property
    def pretrained(self) -> Pretrained:
        return self._prior

    @property
    def train_size(self) -> int:
        """The config's `data.image_size` (dds: `model.image_size`)."""
        config = self._prior.config
        return int(config["model"]["image_size"] if self._prior.family.architecture == "adm"
                   else config["data"]["image_size"])

    @property
    def data_scale(self) -> DataScale | None:
        """`Pretrained.data_scale`; None for a family whose `data_scale` is 'none'."""
        return None if self._prior.family.data_scale == "none" else self._prior.data_scale

    @property
    def loss_score_fn(self) -> ScoreFn:
        return self._prior.score

    def score_of(self, net: nn.Module) -> ScoreFn:
        return dataclasses.replace(self._prior, network=net).score

    def new_network(self, device: torch.device | str) -> nn.Module:
        """The family's architecture, without a second random initialisation."""
        return self._prior.empty_network(device)

    def load_pretrained(self) -> None:
        loaded = load_family_checkpoint(self.source.path, self.config, self.family,
                                        weights=self.source.weights)
        self.network.load_state_dict(loaded.network.state_dict(), strict=True)


def prior_kind(net: DDPMConfig, source: PretrainedSource, conditioning: str, grad_checkpointing: bool = False,
               beta_min: float = 0.1, beta_max: float = 20.0) -> PriorKind:
    """The kind of prior `source` describes, built: `FamilyPrior` for `source.family`, else for the family
    `source`'s config names (`detect_family`), else `DDPMPrior` for `net` under `VPSDE(beta_min,
    beta_max)`. `conditioning`: the model's loss.supervised_conditioning, checked against the kind."""
    family = source.family if source.family is not None else detect_family(source)
    if family is None:
        return DDPMPrior(net, source, conditioning, grad_checkpointing, beta_min, beta_max)
    return FamilyPrior(family, source, conditioning, grad_checkpointing)
