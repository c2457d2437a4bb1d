"""Lazy package exports (PEP 562): a package names what it exports and where each name lives; the module
holding a name is imported the first time the name is used, so importing the package stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """`(__all__, __getattr__)` for the package `package` whose names `exports` maps to their modules
    (`{"ScoreModel": "lightning_modules.module"}`): `__getattr__` imports the module on first use of a name
    and raises AttributeError for any other name."""
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(table), __getattr__
