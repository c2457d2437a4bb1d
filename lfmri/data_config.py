"""The one way lfmri's own commands (`preview`, `evaluate`, the paper protocol) read a data module from YAML.

A config is read with OmegaConf (`${...}` interpolation resolved, as LightningCLI's `parser_mode: omegaconf`)
and may be
- a LightningCLI config: its `data:` block is used, the other blocks (`trainer:`, `model:`, ...) are ignored;
- a data block itself: `class_path` + `init_args`;
- bare `LowFieldDataModule` init args (a mapping without `class_path`).

An empty file, or an empty data block, describes no data and is refused (it would silently mean the bundled
defaults).

Only subclasses of `LightningDataModule` are instantiated (jsonargparse's `add_subclass_arguments`): a
`class_path` naming any other callable (`subprocess.run`, `os.system`, ...) is refused before anything is
imported from it or called, so a config file cannot run arbitrary code.

`data_block` imports neither torch nor Lightning: commands check their config with it before the heavy
imports.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from lfmri_utils.errors import InputError

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule

#: the data module a block without `class_path` configures
DEFAULT_DATAMODULE = "datamodules.LowFieldDataModule"


def data_block(config: str | os.PathLike) -> dict[str, Any]:
    """`{"class_path": ..., "init_args": {...}}` of the config's data module (see the module docstring).

    InputError (one line naming the file) for a missing or unreadable file, or a config without a data block
    (an empty file or an empty block included).
    """
    path = Path(config)
    if not path.is_file():
        raise InputError(f"--config {path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise InputError(f"--config {path}: cannot read the YAML ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from None
    if not isinstance(content, dict):
        raise InputError(f"--config {path}: a config must be a YAML mapping")
    if not content:
        raise InputError(f"--config {path}: no data: block (class_path + init_args): the file is empty")
    block = content.get("data", content)
    if not isinstance(block, dict):
        raise InputError(f"--config {path}: the data block must be a mapping")
    if not block:
        raise InputError(f"--config {path}: the data: block is empty (expected class_path + init_args)")
    if "class_path" not in block:
        if {"model", "trainer"} & set(block) or "init_args" in block:
            raise InputError(f"--config {path}: no data: block with a class_path "
                             f"(e.g. class_path: {DEFAULT_DATAMODULE})")
        block = {"class_path": DEFAULT_DATAMODULE, "init_args": block}
    extra = set(block) - {"class_path", "init_args"}
    if extra:
        raise InputError(f"--config {path}: unexpected key(s) {', '.join(sorted(extra))} in the data block "
                         "(expected class_path and init_args)")
    init_args = block.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise InputError(f"--config {path}: the data block's init_args must be a mapping")
    return {"class_path": str(block["class_path"]), "init_args": dict(init_args)}


def load_datamodule(config: str | os.PathLike, **init_overrides: Any) -> LightningDataModule:
    """Instantiate the config's data module (a `LightningDataModule` subclass only).

    `init_overrides` replace init_args; a mapping is merged into the config's group of that name (e.g.
    `slices={"eval_per_volume": 2}` keeps the config's other `slices` options). Bad files, classes or
    arguments -> InputError naming the file; a former flat option of `LowFieldDataModule` (`crop_size`, ...)
    -> its new spelling (`datamodules.datamodule.moved_option_message`).
    """
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from datamodules.datamodule import moved_option_message

    block = data_block(config)
    for name, value in init_overrides.items():
        current = block["init_args"].get(name)
        merge = isinstance(value, dict) and isinstance(current, dict)
        block["init_args"][name] = {**current, **value} if merge else value
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        namespace = parser.parse_object({"data": block})
    except Exception as err:
        reason = _first_reason(err)
        moved = re.search(r"Option '(\w+)' is not accepted$", reason)
        if moved and moved_option_message(moved[1]):
            raise InputError(f"--config {config}: {moved_option_message(moved[1])}") from None
        raise InputError(f"--config {config}: bad data block ({reason})") from None
    try:
        return parser.instantiate_classes(namespace).data
    except InputError as err:
        raise InputError(f"--config {config}: {err}") from None
    except Exception as err:
        raise InputError(f"--config {config}: bad data block ({' '.join(str(err).split())[:300]})") from None


def _first_reason(err: Exception) -> str:
    """The first specific reason in a jsonargparse error (e.g. "Import path subprocess.run does not correspond
    to a subclass of LightningDataModule", "Option 'sourcex' is not accepted"), on one line."""
    lines = [line.strip() for line in str(err).splitlines()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    if reasons and reasons[0].startswith("Problem with given class_path"):
        index = lines.index("- " + reasons[0])
        detail = lines[index + 1] if index + 1 < len(lines) else ""
        reasons[0] = f"{reasons[0]} {detail}".strip()
    return " ".join((reasons[0] if reasons else str(err)).split())[:300]
