"""`echopulse evaluate generator`: score a generator on held-out simulator subjects, as JSON.

SSIM against the true clip; EF from the generated clip (LV segmenter + method of discs)
against the true clip's and the simulator's (MAE, RMSE, R²), for one-frame and
reference-loop priming; ED/ES frame within one frame; heart-rate tracking across a jump
from 60 to 120 bpm; FVD in the LV segmenter's feature space, with anchors (another beat
of the same subjects; the prime frame held still). Scored with the shipped LV segmenter (or `--segmenter`, from
`echopulse train segmenter`). Subject seeds are
S … S+N−1: keep them apart from the training seeds.
"""
from __future__ import annotations

import argparse

from ._targets import check_outputs, write_report
from .args import CliError, positive_int, ranged, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generator", help="EF, SSIM, ED/ES timing and HR tracking of a generator", description=__doc__)
    p.add_argument("--checkpoint", help="generator directory (default: the shipped tiny model)")
    p.add_argument("--segmenter", help="directory holding segmenter.safetensors + segmenter.json (default: the shipped one)")
    p.add_argument("--n", type=positive_int("n"), default=100, help="number of held-out subjects")
    p.add_argument("--seed", type=seed, default=1_000_000, help="first subject seed (held out from training)")
    p.add_argument("--leads", type=ranged(int, 1, 12, "leads"), default=1, help="ECG leads given to the generator (1..12)")
    p.add_argument("--critic", action="store_true", help="remask by the token critic (if the checkpoint has one)")
    p.add_argument("--steps", type=positive_int("steps"), help="MaskGIT decoding steps (default: the checkpoint's)")
    p.add_argument("--cfg-scale", type=ranged(float, 0.0, 100.0, "cfg-scale"), help="guidance scale (default: the checkpoint's)")
    p.add_argument("--temperature", type=ranged(float, 0.0, 100.0, "temperature"), help="sampling temperature (default: the checkpoint's)")
    p.add_argument("--confidence-noise", type=ranged(float, 0.0, 100.0, "confidence-noise"),
                   help="Gumbel noise on remasking confidence (default: the checkpoint's)")
    p.add_argument("--threads", type=positive_int("threads"), help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="cpu (default: the figures in the docs were made there), cuda[:N] or auto: where the generator runs")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    p.add_argument("--png", help="also draw the first subject: ECG, true and generated frames, LV areas")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from echopulse.core.evaluate_generator import evaluate_generator, subject_figure
    from echopulse.core.generator import DEFAULT_WEIGHTS, Generator
    from echopulse.core.lv_segmenter import load_segmenter
    from echopulse.core.training import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    check_outputs({"--out": args.out, "--png": args.png})
    try:
        gen = Generator.load(args.checkpoint, device=select_device(args.device), use_critic=args.critic)
        segmenter = load_segmenter(args.segmenter or DEFAULT_WEIGHTS)
        gen.set_sampling(args.steps, args.cfg_scale, args.temperature, args.confidence_noise)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise CliError(str(err)) from None
    result = evaluate_generator(gen, segmenter, range(args.seed, args.seed + args.n), leads=args.leads)
    tcfg = gen.preset.transformer
    sampling = {"steps": tcfg.steps, "cfg_scale": tcfg.cfg_scale, "temperature": tcfg.temperature,
                "confidence_noise": tcfg.confidence_noise}
    # every setting that changes the figures, so two reports can be told apart
    result = {"checkpoint": args.checkpoint or "shipped", "model": gen.name, "critic": gen.critic is not None,
              "sampling": sampling, "segmenter": args.segmenter or "shipped", "leads": args.leads, "seed": args.seed,
              "n": args.n, "device": str(gen.device), **result}
    write_report(result, args.out)  # before the figure: a figure that fails must not cost the report
    if args.png:
        subject_figure(gen, segmenter, args.seed, args.png, leads=args.leads)
    return 0
