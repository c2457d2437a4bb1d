"""Range checks of constructor options, declared once per class beside its signature.

Types come from the signatures (jsonargparse enforces them on the command line and in YAML). What a type
cannot say (lr > 0, 0 <= ema_decay <= 1, a non-empty ch_mult, an ordered range) is a table `{option: Rule}`
that the constructor hands to `check_options` before it builds anything: the first bad option raises
`InputError("<option> must be <rule>, got <value>")`, one line, which `lfmri` prints with exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lfmri_utils.errors import InputError

__all__ = ["Rule", "number", "sequence", "ordered_range", "check_options"]


@dataclass(frozen=True)
class Rule:
    """What an option may be: `test(value)` and the words for it ("an integer >= 1")."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) if integer else math.isfinite(value)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False, optional: bool = False) -> Rule:
    """A finite number (an int with `integer`) within the bounds (closed unless `*_open`); `optional`: or
    None (null)."""

    def test(value: Any) -> bool:
        if value is None:
            return optional
        if not _is_number(value, integer):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    words = " ".join(w for w in ("an integer" if integer else "a number",
                                 _bounds(low, high, low_open, high_open)) if w)
    return Rule(test, f"null or {words}" if optional else words)


def sequence(item: Rule, *, min_len: int = 0) -> Rule:
    """A list whose items all follow `item`, with at least `min_len` of them."""

    def test(value: Any) -> bool:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return False
        return len(value) >= min_len and all(item(v) for v in value)

    plural = item.text.replace("an integer", "integers").replace("a number", "numbers")
    if min_len > 1:
        return Rule(test, f"a list of at least {min_len} {plural}")
    return Rule(test, f"a {'non-empty ' if min_len else ''}list of {plural}")


def ordered_range(low: float | None = None, high: float | None = None) -> Rule:
    """A pair [min, max] of finite numbers with min <= max, both within [low, high]."""
    inside = number(low, high)

    def test(value: Any) -> bool:
        return (not isinstance(value, str | bytes) and isinstance(value, Sequence) and len(value) == 2
                and inside(value[0]) and inside(value[1]) and value[0] <= value[1])

    where = _bounds(low, high, False, False)
    return Rule(test, f"a range [min, max] with min <= max{', both ' + where if where else ''}")


def check_options(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """InputError naming the first option of `rules` whose value in `values` breaks its rule."""
    for name, rule in rules.items():
        value = values[name]
        if not rule(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise InputError(f"{name} must be {rule.text}, got {shown!r}")
