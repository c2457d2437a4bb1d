"""Reading a file `torch.save` wrote, safely, with one-line errors: `load_torch_file` (`weights_only`: a
crafted file cannot run code), `is_torch_file`, and `CheckpointError`.

The lowest layer of checkpoint reading: `checkpoint` (score_sde import / export) and `networks.families`
(the public prior families) both import it, and it imports neither; `checkpoint` re-exports its names.
"""

from __future__ import annotations

import codecs
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lfmri_utils.errors import InputError
from lfmri_utils.files import check_input_file


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the network; a one-line message naming the file."""


#: the legacy (non-zip) `torch.save` format starts with this pickled magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file `torch.save` wrote (a zip archive with a `data.pkl`, or the legacy format)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
        with open(path, "rb") as fh:
            return fh.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC
    except (OSError, zipfile.BadZipFile):
        return False


def load_torch_file(path: str | os.PathLike, label: str = "",
                    error: type[InputError] = CheckpointError) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`: never unpickles arbitrary objects (a crafted
    file cannot run code). Any failure -> `error`, one line naming the file and the reason: missing, a
    folder, empty, not a PyTorch file (a text file, other data), refused (objects other than tensors and plain
    containers, with the first one named), or damaged (torch's reason, whole)."""
    path = check_input_file(path, label, "checkpoint file", error)
    name = f"{label} {path}".strip()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoints (pickle, zip, EOF, Runtime)
        raise error(f"{name}: {_load_failure(path, err)}") from None


def _load_failure(path: Path, err: Exception) -> str:
    """Why `torch.load` failed on `path`, in words, on one line."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError as read_err:
        return f"cannot read it ({read_err.strerror or type(read_err).__name__})"
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}".rstrip(": ")
    if not head:
        return "not a PyTorch checkpoint (the file is empty)"
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(b"PK\x03\x04") and not is_zip:
        return f"a damaged or truncated PyTorch checkpoint ({reason})"
    if is_zip and not is_torch_file(path):
        return "not a PyTorch checkpoint (a zip archive without torch's data.pkl)"
    if not is_zip and not head.startswith(_LEGACY_TORCH_MAGIC):
        try:  # incremental: a character cut by the 256-byte window is not an error
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            text = None
        if text and all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"not a PyTorch checkpoint (a text file starting {' '.join(text.split())[:40]!r})"
        return (f"not a PyTorch checkpoint (it starts with the bytes {head[:8]!r}, neither torch's zip nor "
                "its legacy format)")
    message = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in message:
        lines = [line for line in message.splitlines() if "WeightsUnpickler error:" in line]
        detail = lines[0].split("error:", 1)[1].split(" was not an allowed global")[0] if lines else ""
        detail = " ".join(detail.split())
        return ("refused to load: it holds objects other than tensors and plain containers"
                + (f" ({detail})" if detail else "") + "; unpickling them could run code")
    return f"a damaged or truncated PyTorch checkpoint ({reason})"
