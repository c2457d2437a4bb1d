# Why command modules import lazily: `lfmri` imports only the named command's module, and `--help` or an
# argument error must not pay for torch / Lightning. Measured on a busy 2-core machine: `lfmri --help` 0.05 s,
# `lfmri evaluate --help` 0.11 s, against `import torch` 2.7 s, `import degradations` 2.9 s and
# `import lightning.pytorch` 10.2 s. So a command module imports at its top only light modules (stdlib,
# numpy, h5py, tqdm, `lfmri_utils`, `sampler_options`: nothing that imports torch, Lightning, scipy or
# nibabel) and imports the heavy project modules inside the functions that run the command.

from __future__ import annotations

import argparse


def documented_parser(subparsers: argparse._SubParsersAction, name: str, help: str,
                      doc: str | None) -> argparse.ArgumentParser:
    """Add command `name`'s parser (`help`: its line in `lfmri --help`), whose own `--help` shows `doc`, the
    command module's docstring, as written (line breaks kept: `argparse.RawDescriptionHelpFormatter`)."""
    return subparsers.add_parser(name, help=help, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
