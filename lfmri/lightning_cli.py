"""LightningCLI wiring: `lfmri fit|validate|test|predict --config configs/….yaml`.

Models and data modules are given as `class_path` + `init_args` (class swapping), YAML may use OmegaConf
interpolation, and `config.yaml` is written into the run's log directory (overwritten on resume).
W&B runs offline unless an API key is configured, so `--trainer.logger=WandbLogger` never blocks on a login.
Every logger also receives the whole resolved config (`trainer`, `model`, `data`, ... as nested
hyper-parameters: W&B's run config), and checkpoints are written atomically (`AtomicCheckpointIO`).
SIGINT / SIGTERM during `fit` save a resumable `last.ckpt` at the end of the current step and stop the run
(`lightning_modules.callbacks.InterruptCheckpoint`; `lfmri fit` then exits with 128 + the signal number).

Bad input is refused before any model or data work, as `InputError` (one line): a config that does not parse
(YAML syntax, a Python tag, a `class_path` of the wrong kind, a wrongly typed value: jsonargparse's error,
condensed by `parse_error_message` to the file, the key and the problem), a required value left `???`, and an
output folder that cannot be written (`output_folders`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import netrc
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from jsonargparse import ActionConfigFile
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch import __version__ as lightning_version
from lightning.pytorch.callbacks import BasePredictionWriter, Checkpoint, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf.errors import OmegaConfBaseException

import datamodules.datamodule  # noqa: F401  (defines the classes, so `--data LowFieldDataModule` works)
from datamodules.datamodule import moved_option_message
from diffusion.checkpoint import resolve_checkpoint
from diffusion.sampling.samplers import SamplerOptions
from lfmri.models import read_lightning_checkpoint
from lfmri_utils.errors import InputError
from lfmri_utils.files import atomic_path, check_input_file, check_writable_folder
from lfmri_utils.seeding import check_seed
from lightning_modules.callbacks import InterruptCheckpoint
from lightning_modules.module import legacy_option_message, upgrade_hparams


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint to a temporary file in its own directory, fsyncs it, then `os.replace`s it
    (`lfmri_utils.files.atomic_path`): a crash leaves the previous file or the new one, never a truncated
    one. A `last.ckpt` that is a symbolic link (`ModelCheckpoint(save_last="link")`) is replaced, not
    written through, so the checkpoint it points at is kept.

    Lightning's own save stages the bytes in `$TMPDIR` (fsspec transaction) and `shutil.move`s them, which
    is a plain, interruptible copy when `$TMPDIR` is another file system than the checkpoint directory
    (local /tmp, checkpoints on a cluster's shared file system). Remote URLs keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(os.fspath(path), follow_symlinks=False) as tmp:
            torch.save(checkpoint, tmp)


class LogConfigCallback(SaveConfigCallback):
    """Writes `config.yaml` into the log directory and logs the resolved config to every logger (rank 0)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the YAML files' paths: their content is what follows
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def missing_values(config: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a parsed config whose value is OmegaConf's mandatory marker `???` (a required path a
    config leaves to the command line)."""
    if isinstance(config, dict) or hasattr(config, "items"):
        return [k for key, value in config.items() for k in missing_values(value, f"{prefix}{key}.")]
    if isinstance(config, (list, tuple)):
        return [k for i, value in enumerate(config) for k in missing_values(value, f"{prefix}{i}.")]
    return [prefix[:-1]] if config == "???" else []


class ConfigFileError(TypeError):
    """A `--config` file jsonargparse could not take (`ConfigFile`): `path`, with the error as the cause.
    A TypeError, as jsonargparse's own config-file errors, so it travels through jsonargparse the same way."""

    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.path = path


class ConfigFile(ActionConfigFile):
    """`-c/--config`: jsonargparse's config-file option, whose errors name the file (`ConfigFileError`)."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
        try:
            super().__call__(parser, cfg, values, option_string)
        except (TypeError, ValueError, argparse.ArgumentError) as err:
            path = str(values)
            raise ConfigFileError(path if os.path.exists(path) else option_string or "--config", err) from err


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?\s*')
#: jsonargparse's phrasings -> lfmri's (regex, replacement), applied in turn
_REPHRASE = ((re.compile(r"Import path (\S*) does not correspond to a subclass of (\w+)"),
              r"class_path '\1' is not a \2 subclass"),
             (re.compile(r"Expected a (.+?)\. Got value: (.*)"), r"expected \1, got \2"),
             (re.compile(r"<class '([\w.]+)'>"), r"\1"),
             (re.compile(r"typing\.Literal\[([^\]]*)\]"), r"one of \1"))


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions that caused it (`__cause__`, else `__context__`), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def parse_error_message(err: BaseException) -> str:
    """One line for a jsonargparse parse error (`err` and its causes): the config file the value came from
    (when one did, `ConfigFileError`), the dotted key (`init_args` between a class and its argument) and the
    innermost problem (a YAML error with its line and column), e.g.
    `bad.yaml: model: class_path 'os.system' is not a LightningModule subclass`."""
    chain = _chain(err)
    keys: list[str] = []
    last_key, in_class = None, False
    for cause in chain:
        message = str(cause)
        match = _PARSER_KEY.match(message)
        if match and match[1] != last_key:
            last_key = match[1]
            keys.append(f"init_args.{last_key}" if in_class else last_key)
            in_class = False
        in_class = in_class or message.startswith("Problem with given class_path")
    inner = chain[-1]
    mark = getattr(inner, "problem_mark", None)
    if isinstance(inner, yaml.YAMLError) and mark is not None:
        problem = f"line {mark.line + 1}, column {mark.column + 1}: {getattr(inner, 'problem', '') or inner}"
        if "python/" in problem:
            problem += " (YAML tags that build Python objects are refused)"
    else:
        lines = [line.strip() for line in _PARSER_KEY.sub("", str(inner)).splitlines()]
        problem = next((line for line in lines if line), type(inner).__name__)
        for pattern, replacement in _REPHRASE:
            problem = pattern.sub(replacement, problem)
    where = [e.path for e in chain if isinstance(e, ConfigFileError)][:1]
    key = ".".join(k for k in keys if k != "config")
    key, problem = moved_data_option(key, problem)
    key, problem = moved_model_option(key, problem, chain)
    return ": ".join([*where, *([key] if key else []), problem])


_NOT_ACCEPTED = re.compile(r"^Option '(\w+)' is not accepted$")


def moved_data_option(key: str, problem: str) -> tuple[str, str]:
    """(key, problem) of a parse error, with a former flat data-module option ("data: Option 'crop_size' is
    not accepted") said as its new spelling (`datamodules.datamodule.moved_option_message`)."""
    match = _NOT_ACCEPTED.match(problem)
    moved = moved_option_message(match[1]) if match and key.split(".")[-1] == "data" else None
    return ("", moved) if moved else (key, problem)


#: the string jsonargparse was given where a block (a dataclass) is expected, as its errors end
_GIVEN_STRING = re.compile(r"Given value type: <class 'str'>\s+Given value: (.+?)\s*$")
#: the problems of a block given as a block (a mapping, a list) rather than as a string (a file it then reads)
_BLOCK_PROBLEM = re.compile(r"^(Option '\w+' is not accepted|Not a valid subclass)")


def moved_model_option(key: str, problem: str, chain: list[BaseException]) -> tuple[str, str]:
    """(key, problem) of a parse error (`chain`: the error and its causes), with a former flat `ScoreModel`
    option ("model: Option 'lr' is not accepted"; a string, the former checkpoint path, where the
    `pretrained` block is expected: jsonargparse reads it as an import path or as a file holding the block,
    and fails) said as its new spelling (`lightning_modules.module.legacy_option_message`), and a field of
    the `pretrained` block named as written (`model.init_args.pretrained.weights`, not jsonargparse's
    `...pretrained.init_args.weights`)."""
    key = key.replace("model.init_args.pretrained.init_args.", "model.init_args.pretrained.")
    accepted, moved = _NOT_ACCEPTED.match(problem), None
    if accepted and key.split(".")[-1] == "model":
        moved = legacy_option_message(accepted[1])
    elif key.endswith("model.init_args.pretrained") and not _BLOCK_PROBLEM.match(problem):
        given = [match[1] for cause in chain if (match := _GIVEN_STRING.search(str(cause)))]
        moved = legacy_option_message("pretrained", given[-1] if given else "PATH")
    return ("", moved) if moved else (key, problem)


#: `--<key>.init_args.sampling.<field>=null` (a callback's `SamplerOptions` field set to None on the command
#: line): jsonargparse (4.53) hands a null field of a dataclass inside a class's init_args on as the string
#: 'None' (a str field takes it, a float field refuses it); the same value as a one-key block,
#: `--<key>.init_args.sampling={<field>: null}`, is merged into the block as it should be. The data module's
#: groups (`slices`, `loader`, `predict`: `--data.init_args.slices.crop_size=null`) are read the same way.
_SAMPLING_NULL = re.compile(r"^(--\S+\.init_args\.(?:sampling|slices|loader|predict))\.(\w+)"
                            r"=(null|Null|NULL|~)$")


def sampling_nulls_as_blocks(args: list[str]) -> list[str]:
    """`args` with each `--<key>.init_args.sampling.<field>=null` written as
    `--<key>.init_args.sampling={<field>: null}` (`_SAMPLING_NULL`: the value jsonargparse then reads)."""
    return [_SAMPLING_NULL.sub(r"\1={\2: null}", arg) if isinstance(arg, str) else arg for arg in args]


def _class_of(block: Any) -> type | None:
    """The class a parsed `class_path` block names (None for anything else)."""
    class_path = block.get("class_path") if hasattr(block, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:  # a nested class (`module.Outer.Inner`): not one of the blocks looked for
        return None


def output_folders(config: Any, subcommand: str) -> list[tuple[str, str]]:
    """(what, folder) of each local folder `subcommand` writes into, from the parsed config (nothing built):
    `trainer.default_root_dir` (the working directory when unset: logs, `config.yaml`), each logger's
    `save_dir`, the `ModelCheckpoint`s' `dirpath` (fit) and the prediction writers' `output_dir` (predict)."""
    trainer = config.get("trainer") or {}
    folders = [("trainer.default_root_dir", trainer.get("default_root_dir") or os.getcwd())]
    wanted = {"fit": (ModelCheckpoint, "dirpath"), "predict": (BasePredictionWriter, "output_dir")}
    for field, blocks in (("logger", trainer.get("logger")), ("callbacks", trainer.get("callbacks"))):
        for block in blocks if isinstance(blocks, list) else [blocks]:
            cls = _class_of(block)
            if cls is None:
                continue
            kind, name = (Logger, "save_dir") if field == "logger" else wanted.get(subcommand, (None, ""))
            folder = (block.get("init_args") or {}).get(name) if kind and issubclass(cls, kind) else None
            if folder:
                folders.append((f"trainer.{field} {cls.__name__} {name}", str(folder)))
    return [(what, folder) for what, folder in folders if _is_local_file_protocol(folder)]


class LfmriCLI(LightningCLI):
    """LightningCLI with lfmri's defaults: OmegaConf YAML, subclass mode, config saved per run and logged,
    atomic checkpoints; a config that does not parse, a required value left as `???` and an output folder
    that cannot be written are refused (InputError, one line) before anything is built."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, with a `-c/--config` whose errors name the file (`ConfigFile`)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning_version}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ConfigFile,
                            help="a YAML config file (several are merged in order)")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse the command line; jsonargparse's error (its parser built with `exit_on_error=False`) comes
        out as one line (`parse_error_message`), not a usage dump, and so does OmegaConf's (an interpolation
        naming no key). A callback's `sampling.<field>=null` is read as null (`sampling_nulls_as_blocks`)."""
        argv = sys.argv
        if isinstance(args, list):
            args = sampling_nulls_as_blocks(args)
        elif args is None and sampling_nulls_as_blocks(argv[1:]) != argv[1:]:
            # the rewritten command line goes in as `args`, sys.argv emptied while it is parsed (Lightning
            # warns when given both) and then restored (DDP's launcher starts the other ranks from sys.argv)
            args, sys.argv = sampling_nulls_as_blocks(argv[1:]), argv[:1]
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise InputError(parse_error_message(err)) from None
        except OmegaConfBaseException as err:
            raise InputError(f"config interpolation: {str(err).splitlines()[0]}") from None
        finally:
            sys.argv = argv

    def before_instantiate_classes(self) -> None:
        """Refuse a required value left `???` and an output folder that cannot be written (`output_folders`:
        a read-only folder, a path through a file), before the model or the data are touched."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        missing = missing_values(config)
        if missing:
            raise InputError(f"the config leaves {', '.join(missing)} to the command line (???): give "
                             + " ".join(f"--{k}=..." for k in missing))
        for what, folder in output_folders(config, self.subcommand or "fit"):
            check_writable_folder(Path(folder), f"{what} {folder}")

    def _set_seed(self) -> None:
        """`seed_everything` checked by the one seed rule of every command (`check_seed`), then applied as
        Lightning does (`True`: a random seed), silently: Lightning's "Seed set to N" line is printed when the
        trainer is built (`instantiate_trainer`), so an option refused by the model's or the data module's
        constructor stays the only line on the console."""
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        if seed is not None and not isinstance(seed, bool):
            check_seed(seed, "seed_everything")
        seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        self._seed_message = f"Seed set to {seed}"
        (self.config[self.subcommand] if self.subcommand else self.config)["seed_everything"] = seed

    def instantiate_classes(self) -> None:
        """Build the model, data module and trainer; an InputError raised by a constructor (a bad option,
        found before any data is read) comes out as itself, not wrapped in jsonargparse's errors."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _input_error_in(err)
            if cause is None:
                raise
            raise cause from None

    def _prepare_subcommand_parser(self, klass: type, subcommand: str,
                                   **kwargs: Any) -> LightningArgumentParser:
        """`lfmri predict` also takes the reconstruction's sampler, `--sampling.*` (`SamplerOptions`: sampler,
        steps, t0, dc, dc_weight, dc_lambda, dc_floor, t0_ratio, stop_ratio; unset: the registry's
        defaults)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_class_arguments(SamplerOptions, "sampling")
        return parser

    def before_fit(self) -> None:
        """A fit that starts from `pretrained` weights (no `--ckpt_path` to resume) checks the file exists
        now, before Lightning prints the model summary, rather than when the weights load at fit start."""
        ckpt_path = self._get(self.config, "ckpt_path")
        source = getattr(getattr(self.model, "prior_kind", None), "source", None)
        if ckpt_path is None and source is not None and source.path is not None:
            check_input_file(resolve_checkpoint(source.path), "", "checkpoint file")

    def before_predict(self) -> None:
        """Hand `--sampling.*` to the model (checked now, before any data is read: InputError)."""
        options = self._get(self.config_init, "sampling")
        try:
            options.build(self.model.sde)
        except ValueError as err:
            raise InputError(f"--sampling: {err}") from None
        self.model.predict_options = options

    def _parse_ckpt_path(self) -> None:
        """A local `--ckpt_path` must be an lfmri ScoreModel checkpoint (`_check_ckpt_path`); its
        hyper-parameters, in today's layout (`module.upgrade_hparams`: older checkpoints' flat network
        fields gathered into `net`), then replace the config's model arguments, so the model is built as
        the checkpoint's. Lightning's keywords (last, best, hpc, registry) and remote URLs are left to
        Lightning."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        ckpt = _check_ckpt_path(ckpt_path)
        if ckpt is None:
            return super()._parse_ckpt_path()
        hparams = upgrade_hparams(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return None
        class_path = hparams.pop("_class_path", None)
        model = {"class_path": class_path, "init_args": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except argparse.ArgumentError as err:
            message = parse_error_message(err)
            raise InputError(f"--ckpt_path {ckpt_path}: its model arguments: {message}") from None
        return None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        message = getattr(self, "_seed_message", None)
        if message is not None:  # Lightning's own line and logger (`_set_seed`)
            logging.getLogger("lightning.fabric.utilities.seed").info(message)
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not trainer.loggers and any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
            # `--trainer.logger=false` with the configs' monitor: Lightning would refuse to start the run
            rank_zero_warn("LearningRateMonitor dropped: the run has no logger (trainer.logger is false)")
            trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)]
        if not any(isinstance(cb, InterruptCheckpoint) for cb in trainer.callbacks):
            # SIGINT / SIGTERM during fit: save a resumable last.ckpt at the end of the step, then stop;
            # placed before the checkpoint callbacks so an interrupted step is saved once
            first = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)),
                         len(trainer.callbacks))
            trainer.callbacks.insert(first, InterruptCheckpoint())
        return trainer


def _check_ckpt_path(ckpt_path: Any) -> dict | None:
    """The checkpoint dict of a local `--ckpt_path`, read with `weights_only=True`
    (`lfmri.models.read_lightning_checkpoint`); InputError (one line) unless it is an lfmri ScoreModel
    checkpoint: a missing file, a folder, a truncated file or another model's checkpoint. None for no path,
    Lightning's keywords (last, best, hpc, registry) and remote URLs (left to Lightning)."""
    if not ckpt_path or not _is_local_file_protocol(ckpt_path):
        return None
    if str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).lower().split(":")[0] == "registry":
        return None
    try:
        return read_lightning_checkpoint(ckpt_path)
    except InputError as err:
        raise InputError(f"--ckpt_path {err}") from None


def _input_error_in(err: BaseException) -> Exception | None:
    """The InputError that caused `err` (itself, or along its `__cause__` / `__context__` chain), if any."""
    return next((cause for cause in _chain(err) if isinstance(cause, InputError)), None)


def _wandb_logged_in() -> bool:
    """Whether `wandb login` stored an API key for the W&B host (in ~/.netrc, or the file $NETRC names)."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _default_wandb_mode() -> None:
    """Run W&B offline unless the user configured it: `WANDB_MODE`, an API key (`WANDB_API_KEY` or
    `wandb login`), or a sweep agent's run (`WANDB_SWEEP_ID`: its metric must reach the server)."""
    env = os.environ
    configured = "WANDB_MODE" in env or env.get("WANDB_API_KEY") or "WANDB_SWEEP_ID" in env
    if not configured and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


#: third-party console noise a user cannot act on: (logger name, message start) of Lightning's records, and
#: the warning messages (regexes) of its own use of a deprecated torch API
_QUIET_RECORDS = (("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # the LitLogger advert, every fit
                  ("lightning.pytorch.trainer.connectors.checkpoint_connector", "`weights_only` was not set"))
_QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)  # lightning's _pytree, every fit


class _DropRecords(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet_third_party() -> None:
    """Silence `_QUIET_RECORDS` and `_QUIET_WARNINGS` (idempotent): the console shows lfmri's messages and
    Lightning's useful ones (seed, devices, the model summary), not adverts or deprecations inside
    Lightning."""
    for name, prefix in _QUIET_RECORDS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropRecords(prefix))
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def run_lightning_cli(args: ArgsType = None, run: bool = True) -> LfmriCLI:
    """Build (and by default run) the CLI; `args` as `sys.argv[1:]`."""
    _default_wandb_mode()
    quiet_third_party()
    return LfmriCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
