"""`echopulse subscribe`: watch a protocol-v1 stream, one line per message, optionally save it.

    echopulse subscribe tcp://127.0.0.1:5556 [--topic echo/dev1] [--out FILE.npz]
                        [--count N] [--timeout S] [--summary]

Lines go to stdout (that is this command's output):

    frame  DEVICE seq=S beat=B frame=I/F t=T hr=H latency_ms=L [gap=G]
    status DEVICE CODE: MESSAGE

The .npz holds `frames` (uint8 N×H×W), `device`, `seq`, `beat`, `frame`, `t`, `hr`
(one entry per frame), `headers` (each frame's header as JSON) and `statuses` (JSON).
Frames of a size other than the first one received (devices served by different
models) go to FILE_<H>x<W>.npz beside it, with the same arrays, so nothing is lost.
Without --out only counts are kept, so a long watch does not grow in memory. When
stdout closes (`| head -1`) the watch stops as Ctrl-C would, and the capture is saved.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .args import CliError, positive_int, ranged

if TYPE_CHECKING:
    from ..subscribe import Subscriber

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


class Capture:
    """What a watch keeps: counts for the summary always, frames and headers only when saving."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.frames = 0
        self.statuses = 0
        self.devices: set[str] = set()
        # frame size -> (pixels, headers), in arrival order; one file per size at save time
        self.by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[dict]]] = {}
        self.status_maps: list[dict] = []

    def add_frame(self, header: dict, pixels: np.ndarray) -> None:
        self.frames += 1
        self.devices.add(header["device"])
        if self.keep:
            frames, headers = self.by_shape.setdefault(pixels.shape, ([], []))
            frames.append(pixels.copy())  # the view dies with the message
            headers.append(header)

    def add_status(self, status: dict) -> None:
        self.statuses += 1
        if self.keep:
            self.status_maps.append(status)


def handle(args: argparse.Namespace) -> int:
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
    capture = Capture(keep=out is not None)
    started = time.monotonic()
    printing = True
    try:
        watch(sub, args, capture)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a watch normally: save what came
    except BrokenPipeError:
        printing = _stdout_gone()  # the reader (`| head -1`) is done: stop as Ctrl-C would, and save
    finally:
        lost, errors = sum(sub.lost.values()), sub.errors
        sub.close()
    if out is not None:
        save_all(out, capture)  # before the summary: a closed stdout must not cost the capture
    if args.summary and printing:
        try:
            print(f"frames={capture.frames} statuses={capture.statuses} devices={len(capture.devices)} lost={lost} "
                  f"malformed={errors} seconds={time.monotonic() - started:.1f}", flush=True)
        except BrokenPipeError:
            _stdout_gone()
    return 0


def watch(sub: "Subscriber", args: argparse.Namespace, capture: Capture) -> None:
    """Receive until --count frames, --timeout of silence, or an exception (Ctrl-C, closed stdout)."""
    from ..protocol import FrameMessage

    while args.count is None or capture.frames < args.count:
        msg = sub.recv(timeout=args.timeout)
        if msg is None:
            return
        if isinstance(msg, FrameMessage):
            capture.add_frame(msg.header, msg.pixels)
            if not args.summary:
                print(frame_line(msg.header, msg.gap), flush=True)
        else:
            capture.add_status(msg.status)
            if not args.summary:
                print(status_line(msg.status), flush=True)


def _stdout_gone() -> bool:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again; False: stop printing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is no real file (tests, embedding): nothing will flush it at exit
    return False


def shape_path(out: Path, shape: tuple[int, ...], first: bool) -> Path:
    """Where the frames of one size go: FILE.npz for the first size received, FILE_HxW.npz for others."""
    return out if first else out.with_name(f"{out.stem}_{'x'.join(map(str, shape))}{out.suffix}")


def save_all(out: Path, capture: Capture) -> list[Path]:
    """Save the capture, one .npz per frame size (statuses in the first); return the paths written."""
    groups = list(capture.by_shape.items()) or [((0, 0), ([], []))]
    paths = []
    for i, (shape, (frames, headers)) in enumerate(groups):
        path = shape_path(out, shape, first=i == 0)
        try:
            save(path, frames, headers, capture.status_maps if i == 0 else [])
        except OSError as err:
            raise CliError(f"--out: cannot write {path}: {err}") from None
        paths.append(path)
    if len(paths) > 1:
        log.warning("frames of %d sizes: saved %s", len(paths), ", ".join(
            f"{'x'.join(map(str, shape))} to {path.name}" for (shape, _), path in zip(groups, paths)))
    return paths


def save(out: Path, frames: list[np.ndarray], headers: list[dict], statuses: list[dict]) -> None:
    """Save frames of one size, their headers and `statuses` to one .npz."""
    from ..protocol import header_json, to_json

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
        statuses=np.array([to_json(s) for s in statuses], dtype=str),
    )
    log.info("saved %d frames to %s", len(headers), out)
