"""`echopulse train transformer`: train the ECG-conditioned masked video-token transformer
on simulated pairs, or with `--data DIR` on your own paired clips (cached once in
OUT/pairs.npz), fine-tuning the ECG encoder slowly.
OUT becomes a complete generator checkpoint (tokenizer, ecg, transformer), loadable
with `Generator.load(OUT)`. `--resume` continues the run saved in `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._targets import add_run_options
from .args import CliError, positive_int, ranged, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transformer", help="train the masked transformer", description=__doc__)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, paper)")
    add_run_options(p, steps=3000, batch=16, warmup=100)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tokenizer", required=True, help="trained tokenizer directory (tokenizer.json)")
    p.add_argument("--ecg", help="pretrained ECG encoder directory (ecg.json); default: from scratch")
    p.add_argument("--init", help="generator directory to start from (its transformer and ECG encoder weights)")
    p.add_argument("--ecg-lr-scale", type=ranged(float, 0.0, 1.0, "ecg lr scale"), default=0.1,
                   help="ECG encoder learning rate as a fraction of --lr (0: frozen)")
    p.add_argument("--subjects", type=positive_int("subjects"), default=2000, help="simulated training pairs")
    p.add_argument("--seed", type=seed, default=0, help="first training subject seed")
    p.add_argument("--workers", type=positive_int("workers"), default=1,
                   help="processes simulating the training pairs (done once, then cached)")
    p.add_argument("--data", help="folder of your own paired .npz clips (the `echopulse simulate` layout) "
                                  "instead of simulated subjects")
    p.add_argument("--pairs-raw", help="simulated pairs .npz to reuse/create (default: OUT/pairs_raw.npz)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.config import preset
    from echopulse.core.train_generator import Recipe, train_transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise CliError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    if args.init and not (Path(args.init) / "transformer.json").is_file():
        raise CliError(f"--init {args.init}: no transformer.json there")
    if args.ecg and not (Path(args.ecg) / "ecg.json").is_file():
        raise CliError(f"--ecg {args.ecg}: no ecg.json there")
    try:
        chosen = preset(args.preset)
    except ValueError as err:
        raise CliError(str(err)) from None
    pairs = {}
    subjects, first = args.subjects, args.seed
    if args.data:
        from echopulse.core.data_pairs import clip_files, npz_pair

        try:
            files = clip_files(args.data)
        except FileNotFoundError as err:
            raise CliError(str(err)) from None
        subjects, first = len(files), 0
        pairs["pairs"] = lambda index, p: npz_pair(files[index], p)
    recipe = Recipe(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=first, checkpoint_every=args.checkpoint_every,
        train_subjects=subjects, ecg_lr_scale=args.ecg_lr_scale, workers=1 if args.data else args.workers,
    )
    try:
        train_transformer(chosen, recipe, Path(args.out), Path(args.tokenizer), Path(args.ecg) if args.ecg else None,
                          resume=args.resume, device=args.device, raw_pairs=Path(args.pairs_raw) if args.pairs_raw else None,
                          init=Path(args.init) if args.init else None, **pairs)
    except (FileExistsError, RuntimeError, ValueError) as err:
        raise CliError(str(err)) from None
    return 0
