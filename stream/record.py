"""Record a protocol-v1 stream: per device, segments of one MP4 and one NPZ each.

    rec = Recorder(Path("rec"), rotate_s=600, rotate_frames=3000)
    for msg in subscriber.messages(timeout=1.0):
        rec.add(msg)
        rec.tick()
    rec.close()

Layout under the output folder::

    <device>/<device>_<UTC start, YYYYmmddTHHMMSSZ>_<n>.mp4   frames as video (H.264, fragmented)
                                                              (<device>: the id as `datadir` names folders)
    <device>/<device>_<UTC start>_<n>.npz                     frames and every header field
    segments.jsonl                                            one line per closed segment
    statuses.jsonl                                            every status message received

A segment closes, and the device's next frame opens a new one, when it is `rotate_s`
seconds old (wall clock) or holds `rotate_frames` frames, when the frame shape changes,
when the device's seq goes back (its publisher restarted), and on `close()`. Frames lost
in transit (a forward jump of seq) do not split a segment: the NPZ's `gap` says how many
were lost before each frame. The MP4 is written as frames come, in fragments, so a crash
leaves a playable file; the NPZ is written whole when the segment closes, which is why
`rotate_frames` bounds the memory a segment holds.

The NPZ does not depend on the MP4: when the video writer fails (ffmpeg missing or
crashing, a frame size the encoder refuses, a disk error while encoding) the segment's
frames still go to the NPZ, whose `meta` says why the MP4 is missing (`mp4` null) or cut
short (`mp4_frames` below the segment's frames); the error is logged, counted in
`Recorder.mp4_failed`, and the device's next segment tries the MP4 again. A JSON line
that cannot be written (full disk) is logged and counted in `Recorder.lines_failed`.

NPZ arrays, one entry per frame: ``frames`` (uint8 N×H×W), ``seq``, ``beat``, ``frame``,
``beat_frames`` (frames in that beat), ``t`` (ECG time, s), ``r_time``, ``rr``, ``hr``,
``capture``, ``publish``, ``latency``, ``recv`` (wall clock when recorded), ``gap``,
``model``, ``headers`` (each header as JSON; binary fields left out) and ``meta`` (JSON:
device, segment, why it opened and closed, the MP4's name (null when there is none), its
fps, `mp4_frames` (frames it holds) and `mp4_error` (why it failed, or null)).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .datadir import device_dirname
from .protocol import FrameMessage, Message, StatusMessage, header_json, to_json

log = logging.getLogger(__name__)

# (npz name, header field, dtype) of the per-frame columns.
_COLUMNS = (
    ("seq", "seq", np.int64), ("beat", "beat", np.int64), ("frame", "frame", np.int64),
    ("beat_frames", "frames", np.int64), ("t", "t", np.float64), ("r_time", "r_time", np.float64),
    ("rr", "rr", np.float64), ("hr", "hr", np.float64), ("capture", "capture", np.float64),
    ("publish", "publish", np.float64), ("latency", "latency", np.float64),
)


_SPLITS = ("restart", "shape", "rotate_time", "rotate_frames")  # close reasons the next segment opens with
CLOSED_KEPT = 1000  # index lines a Recorder keeps in memory: a run of months must not grow without bound
_ERROR_CHARS = 500  # imageio's errors carry ffmpeg's whole command line


@dataclass(frozen=True)
class RotatePolicy:
    """When a segment closes: whichever of its age and its frame count comes first."""

    rotate_s: float = 600.0
    rotate_frames: int = 3000  # ~100 s at 30 fps; 3000 frames of 128×128 hold 49 MB in memory

    def __post_init__(self) -> None:
        if not self.rotate_s > 0 or self.rotate_frames < 1:
            raise ValueError("rotate_s must be > 0 and rotate_frames >= 1")


def _video_fps(header: dict[str, Any]) -> float:
    """The beat's own frame rate (frames per RR interval), the rate the MP4 plays at."""
    return float(min(max(header["frames"] / header["rr"], 1.0), 120.0))


def _column(values: list[Any], dtype: type) -> np.ndarray:
    """One NPZ column; an int beyond int64 (valid in v1: msgpack carries up to 2**64 - 1) makes
    it uint64 rather than cost the segment its NPZ."""
    try:
        return np.array(values, dtype=dtype)
    except OverflowError:
        return np.array(values, dtype=np.uint64)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:_ERROR_CHARS]


def _size(path: Path) -> int:
    """The file's size, 0 when it is missing or cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Segment:
    """One device's open recording."""

    def __init__(self, folder: Path, device: str, index: int, first: FrameMessage, opened: str,
                 wall: float, fps: float | None) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall))
        # Names from `device_dirname`, built whole: a device id may hold dots (with_suffix
        # would cut "ward3.bed12" at the first one) or be "..", and may be too long.
        self.folder, self.base = folder, f"{device_dirname(device)}_{stamp}_{index:04d}"
        self.device, self.index, self.opened, self.started = device, index, opened, wall
        self.shape = first.pixels.shape
        self.fps = fps or _video_fps(first.header)
        self.frames: list[np.ndarray] = []
        self.headers: list[dict[str, Any]] = []
        self.recv: list[float] = []
        self.gaps: list[int] = []
        self.mp4_error = ""  # why the MP4 failed ("" while it is fine); its frames go on to the NPZ
        self.mp4_frames = 0
        self._writer: Any = None
        try:
            self._writer = self._open_video()
        except Exception as err:
            self._mp4_failed(_error_text(err))

    def _open_video(self) -> Any:
        import imageio.v2 as imageio

        self.folder.mkdir(parents=True, exist_ok=True)
        # Fragmented MP4: readable up to the last fragment even if the recorder is killed.
        return imageio.get_writer(
            self.path(".mp4"), format="FFMPEG", fps=self.fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=2, ffmpeg_log_level="error", output_params=["-movflags", "+frag_keyframe+empty_moov"],
        )

    def _append_video(self, pixels: np.ndarray) -> None:
        """One frame to the MP4; if the writer fails, note why and write no more of this MP4."""
        h, w = pixels.shape
        try:
            # yuv420p needs even sides; pad with one black row/column rather than let imageio rescale.
            self._writer.append_data(np.pad(pixels, ((0, h % 2), (0, w % 2))))
        except Exception as err:
            self._mp4_failed(_error_text(err))
            return
        self.mp4_frames += 1

    def _mp4_failed(self, why: str) -> None:
        self.mp4_error = why
        log.error("%s: segment %d: MP4 writer failed, frames go on to the NPZ only: %s",
                  self.device, self.index, why.partition("\n")[0])  # the first line; meta keeps more
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # already broken: this only reaps ffmpeg and its pipes
                writer.close()

    def path(self, suffix: str) -> Path:
        return self.folder / (self.base + suffix)

    @property
    def last_seq(self) -> int:
        return self.headers[-1]["seq"]

    def add(self, msg: FrameMessage, recv: float) -> None:
        pixels = np.array(msg.pixels)  # a copy: the message's buffer is reused by ZeroMQ
        # The NPZ's lists first: they must not depend on the MP4 writer.
        self.frames.append(pixels)
        self.headers.append(msg.header)
        self.recv.append(recv)
        self.gaps.append(msg.gap)
        if self._writer is not None:
            self._append_video(pixels)

    def _finish_video(self) -> str | None:
        """Close the MP4 writer; the MP4's file name, or None when there is no video in it."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as err:
                self._mp4_failed(_error_text(err))
        mp4 = self.path(".mp4")
        if _size(mp4) == 0:
            # ffmpeg that gave up (a frame size the encoder refuses) leaves an empty file, and imageio says nothing
            if not self.mp4_error:
                self._mp4_failed("ffmpeg wrote no video (see its messages on stderr)")
            with contextlib.suppress(OSError):
                mp4.unlink(missing_ok=True)
            self.mp4_frames = 0
            return None
        return mp4.name

    def close(self, reason: str) -> dict[str, Any]:
        """Finish the MP4, write the NPZ (atomically), and return the segment's index line."""
        meta = {"device": self.device, "segment": self.index, "opened": self.opened, "closed": reason,
                "mp4": self._finish_video(), "fps": self.fps, "started": self.started,
                "mp4_frames": self.mp4_frames, "mp4_error": self.mp4_error or None}
        self._write_npz(meta)
        return {**meta, "npz": self.path(".npz").name, "frames": len(self.frames),
                "seq": [self.headers[0]["seq"], self.last_seq], "t": [self.headers[0]["t"], self.headers[-1]["t"]],
                "lost": int(sum(self.gaps))}

    def _write_npz(self, meta: dict[str, Any]) -> None:
        columns = {name: _column([h[key] for h in self.headers], dtype) for name, key, dtype in _COLUMNS}
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path(".partial.npz")
        try:
            np.savez(
                partial, frames=np.stack(self.frames), recv=np.array(self.recv), gap=_column(self.gaps, np.int64),
                model=np.array([h["model"] for h in self.headers], dtype=str),
                headers=np.array([header_json(h) for h in self.headers], dtype=str), meta=np.array(json.dumps(meta)),
                **columns,
            )
            os.replace(partial, self.path(".npz"))  # a reader never sees half an NPZ
        except BaseException:
            with contextlib.suppress(OSError):  # a half-written file per failure would pile up on a long run
                partial.unlink(missing_ok=True)
            raise


class Recorder:
    """Write every device's frames to rotating segments under `out`; statuses to statuses.jsonl."""

    def __init__(self, out: Path, policy: RotatePolicy | None = None, *, fps: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy = policy or RotatePolicy()
        self.fps = fps
        self.clock = clock
        self.open: dict[str, Segment] = {}
        self.closed: deque[dict[str, Any]] = deque(maxlen=CLOSED_KEPT)  # index lines of the latest segments written
        self.frames = 0
        self.segments = 0     # segments written (their NPZ)
        self.lost = 0         # frames lost in transit, in the segments written
        self.failed = 0       # segments that could not be written (each logged)
        self.mp4_failed = 0   # segments whose MP4 failed, their frames in the NPZ only (each logged)
        self.lines_failed = 0  # lines of segments.jsonl / statuses.jsonl that could not be written (each logged)
        self._count: dict[str, int] = {}  # segments started per device
        self._last_close: dict[str, str] = {}  # device -> why its last segment closed: its next one's "opened"

    def add(self, msg: Message) -> None:
        if isinstance(msg, StatusMessage):
            self._append_line("statuses.jsonl", msg.status)
            return
        now = self.clock()
        device = msg.device
        segment = self.open.get(device)
        if segment is not None:
            reason = self._split_reason(segment, msg, now)
            if reason:
                self._close(device, reason)
                segment = None
        if segment is None:
            last = self._last_close.pop(device, "")
            reason = last if last in _SPLITS else "start"  # after close(): a new start
            index = self._count.get(device, 0)
            self._count[device] = index + 1
            segment = Segment(self.out / device_dirname(device), device, index, msg, reason, now, self.fps)
            self.open[device] = segment
            log.info("%s: segment %d opened (%s)", device, index, reason)
        segment.add(msg, now)
        self.frames += 1
        if len(segment.frames) >= self.policy.rotate_frames:
            self._close(device, "rotate_frames")

    def _split_reason(self, segment: Segment, msg: FrameMessage, now: float) -> str:
        if msg.seq <= segment.last_seq:
            return "restart"  # seq went back: the publisher (or engine) started again
        if msg.pixels.shape != segment.shape:
            return "shape"
        if now - segment.started >= self.policy.rotate_s:
            return "rotate_time"
        return ""

    def tick(self) -> None:
        """Close the segments older than rotate_s (call it now and then, also when no frames come)."""
        now = self.clock()
        for device, segment in list(self.open.items()):
            if now - segment.started >= self.policy.rotate_s:
                self._close(device, "rotate_time")

    def close(self, reason: str = "stopped") -> None:
        """Flush and close every open segment."""
        for device in list(self.open):
            self._close(device, reason)

    def _close(self, device: str, reason: str) -> None:
        segment = self.open.pop(device)
        self._last_close[device] = reason
        try:
            line = segment.close(reason)
        except Exception as err:  # one segment that cannot be written must not stop the recording
            self.failed += 1
            log.error("%s: segment %d could not be written (%s): %s", device, segment.index, type(err).__name__, err)
            return
        finally:
            self.mp4_failed += bool(segment.mp4_error)
        self.segments += 1
        self.lost += line["lost"]
        self.closed.append(line)
        self._append_line("segments.jsonl", line)
        log.info("%s: segment %d closed (%s): %d frames", device, segment.index, reason, line["frames"])

    def _append_line(self, name: str, record: dict[str, Any]) -> None:
        text = to_json(record)  # a status's extra fields may hold bytes or NaN: never a failed write
        try:
            with open(self.out / name, "a", encoding="utf-8") as f:  # opened per line: always flushed
                f.write(text + "\n")
        except OSError as err:  # a full disk: the NPZs and the next lines may still get through
            self.lines_failed += 1
            log.error("cannot append to %s (%d line(s) lost so far): %s", name, self.lines_failed, err)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
