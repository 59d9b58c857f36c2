"""`echopulse demo`: see an echo beat in step with an ECG, on a laptop, in under two minutes.

    echopulse demo [--out echopulse-demo] [--seconds S] [--speed 2] [--file RECORDING] [--reference ECHO_LOOP]

Streams a synthetic ECG (or, with --file, a recording) through the real engine, a real
ZeroMQ publisher and a real subscriber, then writes into --out: demo.mp4 (the echo above,
the ECG scrolling below with beat marks), contact_sheet.png (a few beats frame by frame),
lv_area.png (LV area of the echo against the ECG) and summary.json (beats, frames,
latency p50/p99, counters). Uses the shipped model when there is one, else the simulator.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from .args import CliError, ranged, seed


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="stream an ECG through the engine and write a video, plots and a latency summary",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("echopulse-demo"), help="output folder (default %(default)s)")
    p.add_argument("--seconds", type=ranged(float, 3.0, 600.0, "seconds"), default=None,
                   help="ECG seconds to stream (default: 20 of synthetic ECG; a --file recording whole)")
    p.add_argument("--speed", type=ranged(float, 0.0, 100.0, "speed"), default=2.0,
                   help="ECG seconds per wall second; 0 = as fast as possible (default %(default)s)")
    p.add_argument("--hr", type=ranged(float, 30.0, 200.0, "hr"), default=72.0, help="synthetic heart rate, bpm (default %(default)s)")
    p.add_argument("--seed", type=seed, default=0, help="synthetic ECG seed (default %(default)s)")
    p.add_argument("--backend", choices=("sim", "model"), default=None, help="frame backend (default: model if shipped, else sim)")
    p.add_argument("--file", type=Path, default=None, help="replay this ECG recording instead of the synthetic ECG")
    p.add_argument("--fs", type=ranged(float, 50.0, 10000.0, "fs"), default=None, help="sample rate of --file when it does not say")
    p.add_argument("--lead", type=int, default=None, help="lead (column) of --file to use")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="model backend: prime with one cardiac cycle of the patient's echo (DICOM, video, NumPy; "
                        "FILE?frames=A:B), as serve --reference; default: a simulated heart")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ..demo import DemoOptions, run_demo

    from ...bridges.recording import ReplayError

    if args.file is not None and not args.file.is_file():
        raise CliError(f"--file {args.file}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out}: not a folder")
    options = DemoOptions(out=args.out, seconds=args.seconds, speed=args.speed, hr=args.hr, seed=args.seed,
                          backend=args.backend, file=args.file, fs=args.fs, lead=args.lead, reference=args.reference)
    try:
        result = asyncio.run(run_demo(options))
    except (RuntimeError, ValueError, ReplayError) as err:
        raise CliError(str(err)) from None
    except OSError as err:  # --out cannot be made or written
        raise CliError(f"--out {args.out}: {err}") from None
    s = result.summary
    lat = s["beat_to_last_frame_latency"]
    primed = {"reference": ", primed with the patient's echo", "simulated": ", primed with a simulated heart"}
    print(f"{s['beats']} beats, {s['frames']} frames from {s['model']}{primed.get(s.get('prime'), '')} in {s['wall_seconds']:.1f} s "
          f"(beat → last frame p50 {lat.get('p50_ms', float('nan')):.0f} ms, p99 {lat.get('p99_ms', float('nan')):.0f} ms)")
    for name, path in result.files.items():
        print(f"  {name:<14} {path}")
    return 0
