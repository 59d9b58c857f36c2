"""`echopulse evaluate tokenizer`: reconstruction metrics of a trained tokenizer on
held-out simulator clips (or a folder of .npz clips), written as JSON.

Clip seeds are S … S+N−1; choose S beyond the seeds the run trained on (training uses
seeds from its --seed upward, batch × steps of them).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ._targets import check_outputs, write_report
from .args import CliError, positive_int, seed

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="reconstruction metrics of a tokenizer", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="directory holding tokenizer.safetensors + tokenizer.json")
    p.add_argument("--lora", help="directory holding lora.safetensors + lora.json to apply on top")
    p.add_argument("--n", type=positive_int("n"), default=200, help="number of clips")
    p.add_argument("--seed", type=seed, default=1_000_000, help="first clip seed (held out from training)")
    p.add_argument("--data", help="folder of .npz clips, or 'synthetic' (default: the simulator)")
    p.add_argument("--batch", type=positive_int("batch"), default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=positive_int("threads"), help="torch CPU threads")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    p.add_argument("--noise-floor", type=int, default=0, metavar="DRAWS",
                   help="also measure the simulator's fresh-noise floor: render each clip DRAWS times (>= 2), noise redrawn")
    p.add_argument("--speckle-floor", type=int, default=0, metavar="DRAWS",
                   help="also measure the speckle floor: render each clip DRAWS times (>= 2), speckle pattern and noise redrawn")
    p.add_argument("--png", help="also save originals / reconstructions / |error|x4 of the first 3 clips as a PNG")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.evaluate_tokenizer import comparison_png, evaluate_tokenizer
    from echopulse.core.lora import load_lora
    from echopulse.core.tokenizer import load_tokenizer
    from echopulse.core.training import select_device
    from echopulse.core.video_clips import clip_source

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, draws in (("--noise-floor", args.noise_floor), ("--speckle-floor", args.speckle_floor)):
        if draws and (draws < 2 or args.data is not None):
            raise CliError(f"{flag} needs at least 2 draws and the simulator (no --data)")
    if not (Path(args.checkpoint) / "tokenizer.json").is_file():
        raise CliError(f"--checkpoint {args.checkpoint}: no tokenizer.json there")
    check_outputs({"--out": args.out, "--png": args.png})
    try:
        device = select_device(args.device)
        model, preset = load_tokenizer(args.checkpoint, device=device)
        if args.lora:
            _check_lora_base(args.lora, args.checkpoint)
            load_lora(model, args.lora)
            model.to(device)
        source = clip_source(args.data, preset.tokenizer.frames, preset.tokenizer.image_size)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    result = evaluate_tokenizer(model, source, range(args.seed, args.seed + args.n), batch_size=args.batch)
    result = {"checkpoint": args.checkpoint, "lora": args.lora, "preset": preset.name, "seed": args.seed,
              "data": args.data or "simulator", **result}
    if args.noise_floor or args.speckle_floor:
        from echopulse.core.noise_floor import noise_floor

        tok, seeds = preset.tokenizer, range(args.seed, args.seed + args.n)
        if args.noise_floor:
            result["noise_floor"] = noise_floor(seeds, tok.frames, tok.image_size, args.noise_floor)
        if args.speckle_floor:
            result["speckle_floor"] = noise_floor(seeds, tok.frames, tok.image_size, args.speckle_floor, speckle=True)
    write_report(result, args.out)  # before the figure: a figure that fails must not cost the report
    if args.png:
        comparison_png(model, source, range(args.seed, args.seed + min(3, args.n)), args.png)
    return 0


def _check_lora_base(lora: str, checkpoint: str) -> None:
    """Adapters trained on another tokenizer load without an error and score nonsense: warn."""
    from echopulse.core.checkpoint import load_json

    try:
        base = load_json(Path(lora) / "lora.json").get("base")
    except (FileNotFoundError, ValueError):
        return  # load_lora names the problem
    if base and Path(base).resolve() != Path(checkpoint).resolve():
        log.warning("--lora %s was trained on %s, not on --checkpoint %s", lora, base, checkpoint)
