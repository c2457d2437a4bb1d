"""The error type for bad user input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input (a file or an argument). The message names it and the problem, on one line.

    The CLI prints it as `lfmri <command>: error: <message>` and exits with code 2, without a traceback.
    """
