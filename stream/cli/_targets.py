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
import json
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Mapping

from .args import CliError, CliParser, positive_int, ranged


def add_targets(parser: argparse.ArgumentParser, command: str) -> None:
    """Add a required sub-command for every `_<command>_*.py` module of this package."""
    subparsers = parser.add_subparsers(dest="target", metavar="TARGET", parser_class=CliParser)
    subparsers.required = True
    package = __name__.rpartition(".")[0]
    prefix = f"_{command}_"
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if info.name.startswith(prefix):
            importlib.import_module(f"{package}.{info.name}").register(subparsers)


def add_run_options(parser: argparse.ArgumentParser, *, steps: int, batch: int, warmup: int = 100) -> None:
    """The options every training run shares (length, optimiser, checkpoints, resume, device),
    with the per-model defaults that differ."""
    parser.add_argument("--steps", type=positive_int("steps"), default=steps, help="total optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--batch", type=positive_int("batch"), default=batch)
    parser.add_argument("--lr", type=ranged(float, 1e-7, 1.0, "lr"), default=1e-3)
    parser.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    parser.add_argument("--checkpoint-every", type=positive_int("checkpoint interval"), default=250)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=positive_int("threads"), help="torch CPU threads (default: torch's choice)")


def check_outputs(paths: Mapping[str, str | None]) -> None:
    """Refuse, before minutes of work, outputs ({flag: path}) it could not write at its end."""
    for flag, path in paths.items():
        if path and Path(path).is_dir():
            raise CliError(f"{flag} {path}: is a folder")
        if path and flag == "--png" and Path(path).suffix.lower() != ".png":
            raise CliError(f"--png must name a .png file, got {path!r}")


def write_report(result: dict[str, Any], out: str | None) -> None:
    """An evaluation's JSON to `out` (its folder made; written whole or not at all) or,
    without one, to stdout."""
    text = json.dumps(result, indent=2) + "\n"
    if not out:
        sys.stdout.write(text)
        return
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as err:
        raise CliError(f"--out {out}: {err}") from None
