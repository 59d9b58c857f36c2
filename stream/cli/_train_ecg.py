"""`echopulse train ecg`: pretrain the ECG encoder as a masked autoencoder on simulated ECG
beat windows (1 to 12 leads, sample rates from 130 to 512 Hz resampled to the encoder's).
`--resume` continues the run saved in `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._targets import add_run_options
from .args import CliError, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ecg", help="pretrain the ECG encoder (MAE)", description=__doc__)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, paper)")
    add_run_options(p, steps=2000, batch=32, warmup=100)
    p.add_argument("--out", required=True, help="run directory (ecg.safetensors/json, log.jsonl)")
    p.add_argument("--leads", type=int, default=0, help="leads per window (0: 1, 2, 3 or 12 in turn)")
    p.add_argument("--seed", type=seed, default=0, help="first training window index")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.config import preset
    from echopulse.core.train_generator import Recipe, train_ecg

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        chosen = preset(args.preset)
    except ValueError as err:
        raise CliError(str(err)) from None
    if not 0 <= args.leads <= chosen.ecg.max_leads:
        raise CliError(f"--leads must be 0..{chosen.ecg.max_leads}")
    recipe = Recipe(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed, checkpoint_every=args.checkpoint_every)
    try:
        train_ecg(chosen, recipe, Path(args.out), resume=args.resume, device=args.device, leads=args.leads)
    except (FileExistsError, RuntimeError, ValueError) as err:
        raise CliError(str(err)) from None
    return 0
