"""Argument parsing shared by every subcommand: one-line errors, exit status 2, range checks."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class CliError(Exception):
    """A user error found after parsing (bad file, bad combination): printed as one line, exit 2."""


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one clear line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def ranged(kind: Callable[[str], float], low: float, high: float, name: str) -> Callable[[str], float]:
    """An argparse type that parses with `kind` and accepts only low <= value <= high."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be between {_number(low)} and {_number(high)}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"  # 10,000,000 rather than 1e+07


def at_least(low: int, name: str) -> Callable[[str], int]:
    """An argparse type for integers >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be {low} or more, got {value}")
        return value

    parse.__name__ = name
    return parse


def positive_int(name: str) -> Callable[[str], int]:
    """An argparse type for integers >= 1."""
    return at_least(1, name)


# seeds: numpy's generators refuse negative ones
seed = at_least(0, "seed")
