"""`echopulse record`: record a running engine's frames to rotating per-device MP4 + NPZ files.

    echopulse record ENDPOINT --out DIR [--rotate-s 600] [--rotate-frames 3000]
                     [--topic PREFIX] [--fps F] [--duration S] [--mp4-queue 120] [--mp4-timeout 10]

Writes DIR/<device>/<device>_<UTC start>_<n>.mp4 and .npz per segment, DIR/segments.jsonl
(one line per closed segment) and DIR/statuses.jsonl. A segment closes after --rotate-s
seconds or --rotate-frames frames, when its device's publisher restarts (seq goes back)
and on SIGINT/SIGTERM (files flushed, exit status 0). ZeroMQ reconnects by itself, so
the recorder outlives engine restarts. The MP4 plays at the beat's frame rate
(frames / RR) unless --fps is given; the NPZ's `t` is the frames' true ECG time. When
the MP4 cannot be written (ffmpeg missing or failing) the NPZ is written all the same,
its `meta` saying why; the summary line at exit counts such segments.

Each segment's MP4 is encoded on its own thread, so a slow or hung ffmpeg never holds up
receiving. When the encoder falls --mp4-queue frames behind, frames are left out of the
MP4 (never the NPZ), counted in its `mp4_skipped` and logged. A closed segment's MP4 has
--mp4-timeout seconds to finish; an ffmpeg still busy then is abandoned (killed, the MP4
marked incomplete in `mp4_error`), so SIGINT/SIGTERM exits within that bound plus the
time to write the NPZs.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .args import CliError, positive_int, ranged

if TYPE_CHECKING:
    from ..record import Recorder

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("record", help="record a running engine's frames to rotating MP4 + NPZ files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", help="ZeroMQ endpoint of the engine's publisher, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--out", required=True, help="folder to write into (made if missing)")
    p.add_argument("--rotate-s", type=ranged(float, 1.0, 1e7, "rotate-s"), default=600.0,
                   help="start a new segment after S seconds (default %(default)s)")
    p.add_argument("--rotate-frames", type=positive_int("rotate-frames"), default=3000,
                   help="start a new segment after N frames of a device (default %(default)s)")
    p.add_argument("--topic", action="append", default=None,
                   help="topic prefix to record (repeatable; default: echo/ and status/)")
    p.add_argument("--fps", type=ranged(float, 1.0, 120.0, "fps"), default=None,
                   help="MP4 frame rate (default: each segment's first beat's frames / RR)")
    p.add_argument("--duration", type=ranged(float, 0.001, 1e9, "duration"), default=None,
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    # Defaults stay the recorder's (record.MP4_QUEUE_FRAMES, MP4_TIMEOUT_S): importing it here would load numpy
    # for every command's registration.
    p.add_argument("--mp4-queue", type=positive_int("mp4-queue"), default=None,
                   help="frames a segment's MP4 encoder may fall behind before frames are left out of the MP4 "
                        "(never the NPZ) (default 120)")
    p.add_argument("--mp4-timeout", type=ranged(float, 0.1, 3600.0, "mp4-timeout"), default=None,
                   help="seconds a closed segment's MP4 may take to finish before its ffmpeg is abandoned "
                        "(default 10)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ..record import Recorder, RotatePolicy
    from ..subscribe import DEFAULT_TOPICS, Subscriber

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--out {out}: {err}") from None
    try:
        sub = Subscriber(args.endpoint, topics=args.topic or DEFAULT_TOPICS)
    except OSError as err:
        raise CliError(str(err)) from None
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: stopping.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    mp4 = {key: value for key, value in (("mp4_queue_frames", args.mp4_queue), ("mp4_timeout_s", args.mp4_timeout))
           if value is not None}
    recorder = Recorder(out, RotatePolicy(args.rotate_s, args.rotate_frames), fps=args.fps, **mp4)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    log.warning("recording %s into %s", args.endpoint, out)
    try:
        while not stopping and (deadline is None or time.monotonic() < deadline):
            msg = sub.recv(timeout=0.2)  # short, so a signal or the deadline is seen at once
            if msg is not None:
                recorder.add(msg)
            recorder.tick()
    finally:
        recorder.close("stopped")
        sub.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.warning("recorded %d frames in %d segment(s), %d lost in transit%s", recorder.frames, recorder.segments,
                recorder.lost, _problems(recorder))
    return 0


def _problems(recorder: Recorder) -> str:
    """The end of the summary line: what could not be written, if anything."""
    counts = ((recorder.failed, "segment(s) failed to write"), (recorder.mp4_failed, "segment(s) without a whole MP4"),
              (recorder.mp4_abandoned, "MP4 writer(s) abandoned (ffmpeg did not finish in time)"),
              (recorder.mp4_skipped, "frame(s) left out of the MP4s (in the NPZs)"),
              (recorder.lines_failed, "index line(s) not written"))
    return "".join(f", {n} {what}" for n, what in counts if n)
