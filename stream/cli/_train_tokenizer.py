"""`echopulse train tokenizer`: train the C-ViViT video tokenizer, or a LoRA adapter on one.

Data: the paired simulator on the fly (default), a folder of .npz clips (`--data DIR`),
or `--data synthetic` (moving rings; a smoke test that needs no simulator).
Interrupt at any time; `--resume` continues from the last checkpoint in `--out`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._targets import add_run_options
from .args import CliError, positive_int, ranged, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train the video tokenizer", description=__doc__)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, paper)")
    add_run_options(p, steps=4000, batch=8, warmup=200)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl)")
    p.add_argument("--lora", type=positive_int("lora rank"), default=0, metavar="RANK", help="train LoRA adapters of this rank on --init")
    p.add_argument("--init", help="trained tokenizer directory to start from (required with --lora and --decoder-only); "
                   "its preset replaces --preset")
    p.add_argument("--decoder-only", action="store_true",
                   help="train only what follows the quantizer of --init: tokens stay the same, so a transformer trained on them stays valid")
    p.add_argument("--refine-width", type=ranged(int, 0, 512, "refine width"), metavar="W",
                   help="the per-frame conv refiner after the patch head, W channels wide (grafted onto an --init without one); "
                   "0: none, the paper's linear head (default: the preset's)")
    p.add_argument("--lfq-bits", type=ranged(int, 1, 18, "lfq bits"), metavar="K",
                   help="a codebook of 2**K codes, K bits per token (default: the preset's; not with --init: "
                   "its tokens are fixed)")
    p.add_argument("--data", help="folder of .npz clips, or 'synthetic' (default: simulator on the fly)")
    p.add_argument("--cache", type=ranged(int, 0, 10_000_000, "cache"), default=0, metavar="N", help="cycle through N clips kept in memory (0: a new clip every time)")
    p.add_argument("--workers", type=positive_int("workers"), metavar="N",
                   help="make the whole --cache pool before training, in N processes (for a GPU that trains faster than one core simulates)")
    p.add_argument("--seed", type=seed, default=0, help="first training clip index (evaluate on seeds beyond the run)")
    p.add_argument("--vgg", help="local VGG16 weights (safetensors) for the perceptual loss; default: gradient+SSIM fallback")
    p.add_argument("--perceptual-weight", type=ranged(float, 0.0, 100.0, "perceptual weight"), default=1.0)
    p.add_argument("--gan-weight", type=ranged(float, 0.0, 100.0, "gan weight"), default=0.1)
    p.add_argument("--gan-start", type=int, default=2000, help="step at which the GAN loss switches on")
    p.add_argument("--half", action="store_true", help="store tokenizer.safetensors in fp16 (for shipping)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.checkpoint import load_preset
    from echopulse.core.config import preset
    from echopulse.core.train_tokenizer import RunPaths, TokenizerRecipe, train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora and not args.init:
        raise CliError("--lora needs --init (a trained tokenizer directory)")
    if args.init and not (Path(args.init) / "tokenizer.json").is_file():
        raise CliError(f"--init {args.init}: no tokenizer.json there")
    if args.data not in (None, "synthetic") and not Path(args.data).is_dir():
        raise CliError(f"--data {args.data}: not a directory")
    if args.vgg and not Path(args.vgg).is_file():
        raise CliError(f"--vgg {args.vgg}: no such file")
    if args.decoder_only and not args.init:
        raise CliError("--decoder-only needs --init (the tokenizer whose tokens it keeps)")
    if args.decoder_only and args.lora:
        raise CliError("choose --lora or --decoder-only, not both")
    if args.workers and not args.cache:
        raise CliError("--workers fills the clip pool: give --cache N")
    if args.lfq_bits is not None and args.init:
        raise CliError("--lfq-bits changes the codebook: train from scratch (no --init)")
    try:
        chosen = load_preset(Path(args.init) / "tokenizer.json", "tokenizer") if args.init else preset(args.preset)
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.refine_width is not None:
        chosen.tokenizer.refine_width = args.refine_width
    if args.lfq_bits is not None:
        chosen.tokenizer.lfq_bits = args.lfq_bits
    recipe = TokenizerRecipe(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
        perceptual_weight=args.perceptual_weight, gan_weight=args.gan_weight, gan_start=args.gan_start,
        checkpoint_every=args.checkpoint_every, cache=args.cache, lora_rank=args.lora, half_weights=args.half, vgg_weights=args.vgg,
        decoder_only=args.decoder_only,
    )
    paths = RunPaths(out=Path(args.out), init=Path(args.init) if args.init else None, data=args.data)
    try:
        train_tokenizer(chosen, recipe, paths, resume=args.resume, device=args.device, workers=args.workers or 0)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as err:
        raise CliError(str(err)) from None
    return 0
