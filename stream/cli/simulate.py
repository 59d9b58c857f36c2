"""`echopulse simulate`: write paired ECG + echo samples (and a preview) to a folder.

    echopulse simulate --n 100 --size 64 --frames 11 --seed 0 --out data/sim [--preview sim.mp4]

Writes DIR/index.json (the arguments and one entry per sample) and one compressed .npz per
sample with keys video, video_t, ecg, ecg_fs, r_peaks, lv_mask, lv_volume, ef, ed, es and
more ground truth. Every argument is checked before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .args import CliError, positive_int, ranged, seed

log = logging.getLogger(__name__)

NPZ_KEYS = (
    "video", "video_t", "ecg", "ecg_fs", "r_peaks", "lv_mask", "lv_volume", "ef", "ed", "es",
    "p_on", "t_end", "beat_kind", "lv_area", "lv_volume_true", "ef_mask", "hr", "edv", "esv", "pixel_cm",
)
PREVIEW_SIDE = 256
STRIP_HEIGHT = 80


def _size(text: str) -> int:
    if text not in ("64", "128"):
        raise argparse.ArgumentTypeError(f"size must be 64 or 128, got {text!r}")
    return int(text)


_size.__name__ = "size"




def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write simulated paired ECG + echo samples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=positive_int("n"), default=1, help="number of samples (default 1)")
    p.add_argument("--size", type=_size, default=64, help="frame side, 64 or 128 (default 64)")
    p.add_argument("--frames", type=positive_int("frames"), default=11, help="frames per clip (default 11)")
    p.add_argument("--seed", type=seed, default=0, help="first seed; sample i uses seed + i (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fps", type=ranged(float, 1.0, 1000.0, "fps"), default=None,
                   help="fixed frame rate instead of beat-locked frames")
    p.add_argument("--ef", type=ranged(float, 5.0, 90.0, "ef"), default=None, help="ejection fraction, 5..90 %%")
    p.add_argument("--hr", type=ranged(float, 30.0, 200.0, "hr"), default=None, help="heart rate, 30..200 bpm")
    p.add_argument("--leads", type=ranged(int, 1, 12, "leads"), default=1, help="ECG leads, 1..12 (default 1)")
    p.add_argument("--ecg-fs", type=ranged(float, 50.0, 2000.0, "ecg-fs"), default=250.0, help="ECG sample rate (default 250)")
    p.add_argument("--ecg-seconds", type=ranged(float, 2.0, 600.0, "ecg-seconds"), default=10.0,
                   help="ECG recording length around the clip (default 10)")
    p.add_argument("--view", choices=("a4c", "a2c"), default="a4c", help="apical view (default a4c)")
    p.add_argument("--noise", type=ranged(float, 0.0, 5.0, "noise"), default=1.0, help="ECG and image noise scale (default 1)")
    p.add_argument("--pvc-rate", type=ranged(float, 0.0, 0.5, "pvc-rate"), default=0.0,
                   help="share of beats that are premature ventricular contractions, never two in a row "
                        "(0.5 gives 4 in 9, the most; default 0)")
    p.add_argument("--pacing", choices=("none", "ventricular", "dual"), default="none",
                   help="a paced patient: pacing spikes before each QRS (ventricular) or before each P and QRS "
                        "(dual) (default none)")
    p.add_argument("--preview", default=None, metavar="FILE.mp4",
                   help="also write an MP4 of the first sample's subject with its ECG under the echo (beat-locked "
                        "clips are shown over 3 s at 30 fps) and FILE.png, a contact sheet of the sample")
    p.add_argument("--workers", type=positive_int("workers"), default=1, help="processes (default 1)")
    p.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    """Combinations argparse cannot see; raises CliError before anything is written."""
    if args.fps is None and args.frames < 3:
        raise CliError("--frames must be at least 3 for beat-locked clips (or give --fps)")
    if args.fps is not None and args.frames < 2:
        raise CliError("--frames must be at least 2")
    if args.preview is not None and Path(args.preview).suffix.lower() != ".mp4":
        raise CliError(f"--preview must name an .mp4 file, got {args.preview!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a folder")


def _pair_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(size=args.size, frames=args.frames, fps=args.fps, ef=args.ef, hr=args.hr, leads=int(args.leads),
                ecg_fs=args.ecg_fs, view=args.view, ecg_seconds=args.ecg_seconds, noise=args.noise,
                pvc_rate=args.pvc_rate, pacing=args.pacing)


def run(args: argparse.Namespace) -> int:
    _check(args)
    from echopulse.core.simulate import iter_pairs

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--out {args.out}: {err}") from None
    kw = _pair_kwargs(args)
    entries: list[dict[str, Any]] = []
    first = None
    pairs = iter_pairs(args.seed, args.n, workers=args.workers, **kw)
    try:
        with _sigterm_exits():
            first = _write_samples(args, out, pairs, entries)
    finally:  # an interrupted run (Ctrl-C, SIGTERM) still indexes the samples it wrote
        index = {"args": {k: v for k, v in vars(args).items() if k != "handler"}, "samples": entries,
                 "complete": len(entries) == args.n}
        (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    if args.preview is not None and first is not None:
        write_preview(Path(args.preview), first, args)
    log.info("wrote %d samples to %s", len(entries), out)
    return 0


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a job scheduler's stop, `kill`) unwinds like Ctrl-C, so `finally` blocks run;
    the exit status is 143, the shell's for SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_samples(args: argparse.Namespace, out: Path, pairs: Any, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Write each sample as it comes, appending its index entry; returns the first sample."""
    from tqdm import tqdm

    first = None
    for i, sample in enumerate(tqdm(pairs, total=args.n, desc="simulate", unit="clip", file=sys.stderr)):
        seed = args.seed + i
        name = f"sample_{seed:08d}.npz"
        partial = out / f".{name}.partial.npz"  # renamed into place: an interrupt leaves no half file
        np.savez_compressed(partial, **{k: np.asarray(sample[k]) for k in NPZ_KEYS})
        os.replace(partial, out / name)
        entries.append({
            "seed": seed, "file": name, "ef": sample["ef"], "ef_mask": _json_number(sample["ef_mask"]), "hr": sample["hr"],
            "edv": sample["edv"], "esv": sample["esv"], "view": args.view, "size": args.size,
            "frames": int(sample["video"].shape[0]), "ed": sample["ed"].tolist(), "es": sample["es"].tolist(),
            "subject": sample["subject"],
        })
        if first is None:
            first = sample
    return first


def _json_number(x: float) -> float | None:
    """NaN (a clip with no ED/ES pair) as null: JSON has no NaN, and strict readers refuse it."""
    return float(x) if np.isfinite(x) else None


# -- preview --------------------------------------------------------------------------------


def write_preview(path: Path, sample: dict[str, Any], args: argparse.Namespace) -> None:
    """MP4 of the sample (beat-locked clips are shown over several beats at 30 fps) with its
    ECG under the echo and a cursor at each frame's time, plus a PNG contact sheet."""
    from PIL import Image, ImageDraw

    from echopulse.core.simulate import simulate_pair

    from .. import media

    path.parent.mkdir(parents=True, exist_ok=True)
    movie = sample
    if args.fps is None:
        # A beat-locked clip is one beat; show the same subject for a few seconds instead.
        movie = simulate_pair(args.seed, **{**_pair_kwargs(args), "fps": 30.0, "frames": 90})
    times = movie["video_t"]
    ecg = movie["ecg"][0]
    media.write_mp4(path, (
        np.concatenate([
            media.gray_to_rgb(frame, PREVIEW_SIDE),
            media.ecg_strip(ecg, movie["ecg_fs"], t - 1.5, t + 0.5, PREVIEW_SIDE, height=STRIP_HEIGHT, cursor=t, marks=movie["r_peaks"]),
        ], axis=0)
        for frame, t in zip(movie["video"], times)
    ), fps=args.fps or 30.0)

    # Contact sheet of the sample itself: every frame, ED/ES labelled, the ECG under all.
    tile = 128
    video, t_s = sample["video"], sample["video_t"]
    row = np.concatenate([media.gray_to_rgb(f, tile) for f in video], axis=1)
    sheet = Image.fromarray(row)
    draw = ImageDraw.Draw(sheet)
    for i in range(len(video)):
        label = "ED" if i in sample["ed"] else ("ES" if i in sample["es"] else "")
        draw.text((i * tile + 4, 2), f"{i} {label}".strip(), fill=(255, 220, 80))
    width = row.shape[1]
    span = t_s[-1] - t_s[0]
    t0, t1 = t_s[0] - 0.5 * tile / width * span - 0.05, t_s[-1] + 0.5 * tile / width * span + 0.05
    strip = Image.fromarray(media.ecg_strip(sample["ecg"][0], sample["ecg_fs"], t0, t1, width, height=STRIP_HEIGHT, marks=sample["r_peaks"]))
    sd = ImageDraw.Draw(strip)
    for t in t_s:
        x = (t - t0) / (t1 - t0) * (width - 1)
        sd.line([(x, STRIP_HEIGHT - 6), (x, STRIP_HEIGHT)], fill=(240, 70, 70), width=2)
    full = np.concatenate([np.asarray(sheet), np.asarray(strip)], axis=0)
    Image.fromarray(full).save(path.with_suffix(".png"))
