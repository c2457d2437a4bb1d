"""Subject-level train / val / test splits: from a seed (a stable hash of the subject ids) or a YAML split
file.

A subject is never in two splits. Hash splits rank the subjects by `stable_hash(seed, subject)` (hashlib, so
the same on every machine, Python version and process) and take the first `round(n * test_fraction)` as test,
the next `round(n * val_fraction)` as val and the rest as train; with at least three subjects and a non-zero
fraction, val and test each get at least one subject. A split file is YAML with the keys `train`, `val`,
`test`, each a list of subject ids; subjects of the source that it does not name are left out (e.g. the
paper's protocol: 167 train subjects, 10 test, no val).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lfmri_utils.errors import InputError
from lfmri_utils.seeding import stable_hash

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Disjoint lists of subject ids (sorted)."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in SPLITS:
            for subject in getattr(self, name):
                if subject in seen:
                    raise InputError(f"subject {subject!r} is in both the {seen[subject]} and {name} splits")
                seen[subject] = name

    def __getitem__(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of subjects per split."""
        return {name: len(self[name]) for name in SPLITS}


def hash_split(
    subjects: list[str], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> Split:
    """Split subject ids by their stable hash with `seed` (see the module docstring)."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise InputError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise InputError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    unique = sorted(set(subjects))
    ranked = sorted(unique, key=lambda s: (stable_hash("split", seed, s), s))
    n = len(ranked)

    def count(frac: float) -> int:
        k = round(n * frac)
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_test, n_val = count(test_fraction), count(val_fraction)
    return Split(
        train=sorted(ranked[n_test + n_val :]),
        val=sorted(ranked[n_test : n_test + n_val]),
        test=sorted(ranked[:n_test]),
    )


def load_split_file(path: str | Path, subjects: list[str]) -> Split:
    """Read a YAML split file {train: [...], val: [...], test: [...]} and check it against the source's
    subjects.

    Raises InputError (naming the file) for an unreadable file, unknown keys, a subject in two splits, or a
    subject the source does not have.
    """
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: cannot read split file ({type(err).__name__})") from None
    if not isinstance(content, dict) or not set(content) <= set(SPLITS):
        raise InputError(f"{path}: a split file must be a mapping with keys among {', '.join(SPLITS)}")
    known = set(subjects)
    lists: dict[str, list[str]] = {}
    for name in SPLITS:
        entries = content.get(name) or []
        if not isinstance(entries, list):
            raise InputError(f"{path}: '{name}' must be a list of subject ids")
        for subject in entries:
            if str(subject) not in known:
                raise InputError(f"{path}: subject {subject!r} in '{name}' is not in the data source")
        lists[name] = sorted(str(s) for s in entries)
    try:
        return Split(**lists)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
