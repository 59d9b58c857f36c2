"""`echopulse train TARGET ...`: train one model. Targets live in `_train_<target>.py`
modules (see `_targets.py`); `train tokenizer` is `_train_tokenizer.py`."""
from __future__ import annotations

import argparse

from ._targets import add_targets


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model (tokenizer, ...)", description=__doc__)
    add_targets(parser, "train")
