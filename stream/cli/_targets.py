"""Commands with one sub-command per model ("train tokenizer", "evaluate generator", ...).

A target is a module of this package named `_<command>_<target>.py` (the leading
underscore keeps the top-level discovery from treating it as a command) exposing
``register(subparsers) -> None``, exactly like a top-level command. `add_targets`
finds them at start-up, so adding `train ecg` is one new file, `_train_ecg.py`, with
no edit to `train.py`. As elsewhere, keep registration cheap (import torch in handlers).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil

from .args import CliParser


def add_targets(parser: argparse.ArgumentParser, command: str) -> None:
    """Add a required sub-command for every `_<command>_*.py` module of this package."""
    subparsers = parser.add_subparsers(dest="target", metavar="TARGET", parser_class=CliParser)
    subparsers.required = True
    package = __name__.rpartition(".")[0]
    prefix = f"_{command}_"
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if info.name.startswith(prefix):
            importlib.import_module(f"{package}.{info.name}").register(subparsers)
