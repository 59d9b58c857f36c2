"""`echopulse train critic`: train the token critic on a trained transformer's own samples
(a token is real when the sample equals the ground truth). Writes critic.* into `--out`;
pass the generator directory itself as `--out` to make the critic part of it.
`--resume` continues the run saved in `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._targets import add_run_options
from .args import CliError, positive_int, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("critic", help="train the token critic", description=__doc__)
    p.add_argument("--generator", required=True, help="generator directory (transformer.json, ecg.json, tokenizer.json)")
    p.add_argument("--out", required=True, help="run directory (critic.safetensors/json, log.jsonl)")
    add_run_options(p, steps=1000, batch=16, warmup=100)
    p.add_argument("--subjects", type=positive_int("subjects"), default=2000, help="simulated training pairs")
    p.add_argument("--seed", type=seed, default=0, help="first training subject seed")
    p.add_argument("--workers", type=positive_int("workers"), default=1,
                   help="processes simulating the training pairs (done once, then cached)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.train_generator import Recipe, train_critic

    if args.threads:
        torch.set_num_threads(args.threads)
    gen_dir = Path(args.generator)
    for name in ("transformer", "ecg", "tokenizer"):
        if not (gen_dir / f"{name}.json").is_file():
            raise CliError(f"--generator {gen_dir}: no {name}.json there")
    recipe = Recipe(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed, checkpoint_every=args.checkpoint_every,
        train_subjects=args.subjects, workers=args.workers,
    )
    try:
        train_critic(recipe, Path(args.out), gen_dir, resume=args.resume, device=args.device)
    except (FileExistsError, RuntimeError, ValueError) as err:
        raise CliError(str(err)) from None
    return 0
