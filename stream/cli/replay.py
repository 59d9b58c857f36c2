"""`echopulse replay`: a recorded ECG file through the engine's beat path, as fast as possible.

    echopulse replay REC.csv --out OUT.npz|OUT.mp4 [--publish ENDPOINT] [--fs F] [--lead L]
                     [--backend sim|model] [--device NAME] [--reference ECHO_LOOP]

The recording goes through the same per-device session as live ECG (checker, streaming
beat detector, in 1-s chunks) and the same backend; every detected beat becomes frames.
The .npz holds `frames` uint8 N×H×W, `t` ECG seconds per frame, `beat` index per frame,
`r_peaks` seconds per beat, `hr` bpm per beat (and `rr` seconds per beat), and `prime`:
with the model backend "reference" (primed with --reference, the patient's own echo
loop) or "simulated" (a simulated heart, whose EF is not the patient's); "" for sim. The .mp4 plays
at the recording's pace (frames per ECG second). --publish also sends every frame as
protocol v1 while replaying.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...bridges.validate import MAX_FS, MIN_FS
from .args import CliError, ranged

log = logging.getLogger(__name__)

CHUNK_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("replay", help="turn a recorded ECG file into echo frames (.npz or .mp4)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="ECG recording: CSV/TXT, Apple Health CSV, OpenSignals, NPY/NPZ, WFDB")
    p.add_argument("--out", required=True, help="output file, .npz or .mp4")
    p.add_argument("--publish", default=None, help="also publish the frames on this ZeroMQ endpoint")
    p.add_argument("--fs", type=ranged(float, MIN_FS, MAX_FS, "fs"), default=None,
                   help="sample rate in Hz, where the file does not say")
    p.add_argument("--lead", default=None, help="lead to use (name or index), where the file has several")
    p.add_argument("--backend", choices=("sim", "model"), default=None, help="frame backend (default: model if installed, else sim)")
    p.add_argument("--checkpoint", default=None,
                   help="generator checkpoint folder for --backend model (default: the shipped model)")
    p.add_argument("--device", default="replay", help="device id in headers (default: replay)")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="model backend: prime with one cardiac cycle of the patient's echo (video, DICOM, NumPy; "
                        "FILE?frames=A:B picks the cycle). Default: a simulated heart, whose EF is not the patient's")
    p.set_defaults(handler=handle)


@dataclass
class ReplayResult:
    frames: list[np.ndarray] = field(default_factory=list)   # one F×H×W array per beat
    times: list[np.ndarray] = field(default_factory=list)
    r_peaks: list[float] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    prime: str = ""    # the model backends: "reference" (the patient's loop) or "simulated"

    def arrays(self) -> dict[str, np.ndarray]:
        """The .npz contents."""
        n_beats = len(self.frames)
        if n_beats:
            frames = np.concatenate(self.frames)
            beat = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(self.frames)])
            t = np.concatenate(self.times)
        else:
            frames, beat, t = np.zeros((0, 0, 0), np.uint8), np.zeros(0, np.int64), np.zeros(0)
        rr = np.asarray(self.rr, dtype=np.float64)
        return {"frames": frames, "t": t.astype(np.float64), "beat": beat,
                "r_peaks": np.asarray(self.r_peaks, dtype=np.float64), "hr": 60.0 / rr if n_beats else rr, "rr": rr,
                "prime": np.asarray(self.prime)}


def render_recording(
    samples: np.ndarray,
    fs: float,
    backend: Any,
    device: str = "replay",
    on_beat: Callable[[Any, Any, np.ndarray, np.ndarray, dict], None] | None = None,
) -> ReplayResult:
    """Feed leads×n mV samples through a Session in 1-s chunks and render every beat.

    `on_beat(pending, beat, frames, times, fields)` is called per beat (e.g. to publish;
    `fields` are the backend's extra header fields).
    """
    from ...bridges.chunk import EcgChunk
    from ..session import EngineLimits, Session

    # A queue as long as the recording: offline, no beat is ever dropped.
    session = Session(device, EngineLimits(beat_queue=1_000_000), config=getattr(backend, "ecg_config", None))
    state = backend.new_state(device)
    result = ReplayResult()
    step = max(1, int(round(CHUNK_S * fs)))
    for seq, start in enumerate(range(0, samples.shape[1], step)):
        chunk = EcgChunk(device, samples[:, start : start + step], float(fs), start / fs, seq, "mV")
        result.events.extend(session.ingest(chunk))
        for pending in session.take_all():
            beat = pending.beat
            frames, times = backend.render(state, beat)
            result.frames.append(frames)
            result.times.append(np.asarray(times, dtype=np.float64))
            result.r_peaks.append(float(beat.r_time))
            result.rr.append(float(beat.rr))
            fields = backend.frame_fields(state)
            result.prime = fields.get("prime", result.prime)
            if on_beat is not None:
                on_beat(pending, beat, frames, times, fields)
    return result


def write_mp4(out: Path, arrays: dict[str, np.ndarray]) -> None:
    import imageio.v2 as imageio

    frames, t = arrays["frames"], arrays["t"]
    span = float(t[-1] - t[0]) if len(t) > 1 else 0.0
    fps = (len(t) - 1) / span if span > 0 else 10.0  # plays at the ECG's own pace
    # macro_block_size=1: frame sizes that are not multiples of 16 are kept, not rescaled.
    with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1, quality=8) as writer:
        for frame in frames:
            writer.append_data(frame)


def handle(args: argparse.Namespace) -> int:
    out = Path(args.out)
    kind = out.suffix.lower()
    if kind not in (".npz", ".mp4"):
        raise CliError(f"--out must end in .npz or .mp4, got {out.name}")
    if not out.parent.is_dir():
        raise CliError(f"--out: folder {out.parent} does not exist")
    if out.is_dir():
        raise CliError(f"--out {out}: is a folder")
    if not Path(args.path).exists() and not Path(args.path + ".hea").exists():
        raise CliError(f"{args.path}: no such file")
    existed = out.exists()
    try:  # an output that cannot be written fails now, not after the rendering
        with out.open("ab"):
            pass
    except OSError as err:
        raise CliError(f"--out {out}: {err}") from None
    try:
        return _replay(args, out, kind)
    except BaseException:
        if not existed and out.is_file() and out.stat().st_size == 0:
            out.unlink()  # no empty file left where the run failed
        raise


def _replay(args: argparse.Namespace, out: Path, kind: str) -> int:
    from ...bridges.recording import ReplayError, read_recording
    from .. import backends
    from ..protocol import ProtocolError, check_device

    try:
        check_device(args.device)
    except ProtocolError as err:
        raise CliError(str(err)) from None
    lead = int(args.lead) if args.lead is not None and args.lead.isdigit() else args.lead
    try:
        rec = read_recording(args.path, args.fs, lead)
    except ReplayError as err:
        raise CliError(str(err)) from None
    if not MIN_FS <= rec.fs <= MAX_FS:  # the engine would drop every chunk as bad input
        raise CliError(f"{args.path}: sample rate {rec.fs:g} Hz outside {MIN_FS:g}..{MAX_FS:g} Hz (the beat detector needs >= {MIN_FS:g} Hz)")
    try:
        references = {args.device: args.reference} if args.reference else None
        backend = backends.make_backend(args.backend, checkpoint=args.checkpoint, references=references)
    except (ValueError, RuntimeError, OSError) as err:
        raise CliError(str(err)) from None

    publisher = None
    if args.publish:
        from ..publish import Publisher

        try:
            publisher = Publisher(args.publish)
        except OSError as err:
            raise CliError(str(err)) from None

    def publish(pending: Any, beat: Any, frames: np.ndarray, times: np.ndarray, fields: dict) -> None:
        publisher.publish_frames(args.device, frames, times=times, beat=pending.index, r_time=float(beat.r_time),
                                 rr=float(beat.rr), model=backend.name, capture=pending.capture,
                                 extra={"replay": True, **fields})

    try:
        result = render_recording(rec.samples, rec.fs, backend, args.device, publish if publisher else None)
    finally:
        if publisher is not None:
            publisher.close()
        backend.close()
    for code, message in result.events:
        log.warning("%s: %s", code, message)
    arrays = result.arrays()
    n_beats, n_frames = len(arrays["r_peaks"]), len(arrays["frames"])
    try:
        if kind == ".npz":
            with out.open("wb") as f:  # a handle: np.savez given a name adds ".npz" to "X.NPZ"
                np.savez(f, **arrays)
        elif n_frames == 0:
            raise CliError(f"{args.path}: no beats detected, no video to write")
        else:
            write_mp4(out, arrays)
    except OSError as err:  # a full disk, or the folder gone meanwhile
        raise CliError(f"--out {out}: {err}") from None
    log.info("%s: %d beats, %d frames -> %s", args.path, n_beats, n_frames, out)
    if n_beats == 0:
        log.warning("%s: no beats detected", args.path)
    return 0
