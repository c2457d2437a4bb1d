"""Seeds that are the same on every machine, Python version and process (hashlib, never `hash()`)."""

from __future__ import annotations

import hashlib

from lfmri_utils.errors import InputError

__all__ = ["SEED_MAX", "SEED_MOD", "check_seed", "stable_hash"]

#: `torch.manual_seed` / `Generator.manual_seed` take seeds below this; hashes are reduced modulo it
SEED_MOD = 2**63 - 1
#: the largest seed a user may give, the same for every command (Lightning's `seed_everything` and NumPy take
#: unsigned 32-bit seeds)
SEED_MAX = 2**32 - 1


def check_seed(value: object, label: str = "--seed") -> int:
    """A user's seed: an integer in [0, SEED_MAX] (bools refused), else InputError naming `label`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise InputError(f"{label}: must be an integer from 0 to {SEED_MAX}, got {value!r}")
    return value


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from the parts' string forms, identical on every machine and run (sha256)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
