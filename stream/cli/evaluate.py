"""`echopulse evaluate TARGET ...`: measure a trained model, write JSON. Targets live in
`_evaluate_<target>.py` modules (see `_targets.py`); `evaluate tokenizer` is
`_evaluate_tokenizer.py`."""
from __future__ import annotations

import argparse

from ._targets import add_targets


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a trained model (tokenizer, ...)", description=__doc__)
    add_targets(parser, "evaluate")
