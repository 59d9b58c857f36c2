"""The `echopulse` command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers) -> None``; the parser it adds sets ``handler`` (a function taking
the parsed namespace and returning an exit status). Modules are found at start-up, so a
new command is one new file. Registration must stay cheap: heavy imports (torch, numba)
belong inside the handlers, so `echopulse --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from ...core.errors import CheckpointError
from ..logs import configure as configure_logging
from .args import CliParser, CliError


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="echopulse",
        description="ECG-to-echocardiography engine: simulate, train, evaluate, serve and replay.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log records as text or as JSON lines for a log collector (default text)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "args":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING - 10 * min(args.verbose, 2), args.log_format or "text")
    try:
        return int(args.handler(args) or 0)
    except CliError as err:
        print(f"echopulse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # a damaged or mismatched checkpoint, wherever a command met it
        print(f"echopulse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
