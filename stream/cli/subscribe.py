"""`echopulse subscribe`: watch a protocol-v1 stream, one line per message, optionally save it.

    echopulse subscribe tcp://127.0.0.1:5556 [--topic echo/dev1] [--out FILE.npz]
                        [--count N] [--timeout S] [--summary]

Lines go to stdout (that is this command's output):

    frame  DEVICE seq=S beat=B frame=I/F t=T hr=H latency_ms=L [gap=G]
    status DEVICE CODE: MESSAGE

The .npz holds `frames` (uint8 N×H×W), `device`, `seq`, `beat`, `frame`, `t`, `hr`
(one entry per frame), `headers` (each frame's header as JSON) and `statuses` (JSON).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from .args import CliError, positive_int, ranged

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("subscribe", help="print (and save) the frames and statuses of a running engine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", help="ZeroMQ endpoint of the engine's publisher, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--topic", action="append", default=None,
                   help="topic prefix to subscribe to (repeatable; default: echo/ and status/)")
    p.add_argument("--out", default=None, help="save the frames and headers received to this .npz")
    p.add_argument("--count", type=positive_int("count"), default=None, help="stop after N frames")
    p.add_argument("--timeout", type=ranged(float, 0.001, 1e9, "timeout"), default=None,
                   help="stop when nothing arrives for S seconds (default: wait forever)")
    p.add_argument("--summary", action="store_true", help="print one summary line at the end, not a line per message")
    p.set_defaults(handler=handle)


def frame_line(header: dict, gap: int) -> str:
    line = (f"frame  {header['device']} seq={header['seq']} beat={header['beat']} "
            f"frame={header['frame']}/{header['frames']} t={header['t']:.3f} hr={header['hr']:.1f} "
            f"latency_ms={1000 * header['latency']:.1f}")
    return line + (f" gap={gap}" if gap else "")


def status_line(status: dict) -> str:
    return f"status {status['device']} {status['code']}: {status['message']}"


def handle(args: argparse.Namespace) -> int:
    from ..protocol import FrameMessage
    from ..subscribe import DEFAULT_TOPICS, Subscriber

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".npz":
        raise CliError(f"--out must end in .npz, got {out.name}")
    if out is not None and not out.parent.is_dir():
        raise CliError(f"--out: folder {out.parent} does not exist")
    try:
        sub = Subscriber(args.endpoint, topics=args.topic or DEFAULT_TOPICS)
    except OSError as err:
        raise CliError(str(err)) from None
    frames: list[np.ndarray] = []
    headers: list[dict] = []
    statuses: list[dict] = []
    started = time.monotonic()
    try:
        while args.count is None or len(headers) < args.count:
            msg = sub.recv(timeout=args.timeout)
            if msg is None:
                break
            if isinstance(msg, FrameMessage):
                headers.append(msg.header)
                if out is not None:
                    frames.append(msg.pixels.copy())  # the view dies with the message
                if not args.summary:
                    print(frame_line(msg.header, msg.gap), flush=True)
            else:
                statuses.append(msg.status)
                if not args.summary:
                    print(status_line(msg.status), flush=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a watch normally: save what came
    finally:
        lost, errors = sum(sub.lost.values()), sub.errors
        sub.close()
    if args.summary:
        devices = sorted({h["device"] for h in headers})
        print(f"frames={len(headers)} statuses={len(statuses)} devices={len(devices)} lost={lost} "
              f"malformed={errors} seconds={time.monotonic() - started:.1f}")
    if out is not None:
        save(out, frames, headers, statuses)
    return 0


def save(out: Path, frames: list[np.ndarray], headers: list[dict], statuses: list[dict]) -> None:
    from ..protocol import header_json

    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise CliError(f"frames of several shapes {sorted(shapes)} cannot be saved in one array; use --topic")
    stacked = np.stack(frames) if frames else np.zeros((0, 0, 0), np.uint8)
    column = lambda key, dtype: np.array([h[key] for h in headers], dtype=dtype)  # noqa: E731
    np.savez(
        out,
        frames=stacked,
        device=np.array([h["device"] for h in headers], dtype=str),
        seq=column("seq", np.int64),
        beat=column("beat", np.int64),
        frame=column("frame", np.int64),
        t=column("t", np.float64),
        hr=column("hr", np.float64),
        headers=np.array([header_json(h) for h in headers], dtype=str),  # the beat's binary ECG left out
        statuses=np.array([json.dumps(s) for s in statuses], dtype=str),
    )
    log.info("saved %d frames to %s", len(headers), out)
