"""`echopulse train segmenter`: train the small LV segmenter that scores generated echo
(EF by the method of discs, ED/ES timing) on the simulator's LV masks."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import CliError, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segmenter", help="train the LV segmenter used by `evaluate generator`", description=__doc__)
    p.add_argument("--out", required=True, help="directory for segmenter.safetensors/json")
    p.add_argument("--size", type=int, choices=(64, 128), default=64, help="frame size (the preset's image size)")
    p.add_argument("--subjects", type=positive_int("subjects"), default=300)
    p.add_argument("--steps", type=positive_int("steps"), default=500)
    p.add_argument("--threads", type=positive_int("threads"), help="torch CPU threads")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.lv_segmenter import train_segmenter

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after the training
        raise CliError(f"--out {out}: not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train_segmenter(out, size=args.size, subjects=args.subjects, steps=args.steps)
    except OSError as err:
        raise CliError(f"--out {out}: {err}") from None
    return 0
