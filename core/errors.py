"""Errors the command line turns into one line and exit status 2 (no torch import here:
the CLI catches them without loading the models)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, of another kind, or for another
    model shape. The message is one line and names the file."""
