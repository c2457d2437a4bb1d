"""Seeds that are the same on every machine, Python version and process (hashlib, never `hash()`)."""

from __future__ import annotations

import hashlib

__all__ = ["SEED_MOD", "stable_hash"]

#: `torch.manual_seed` / `Generator.manual_seed` take seeds below this; hashes are reduced modulo it
SEED_MOD = 2**63 - 1


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from the parts' string forms, identical on every machine and run (sha256)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
