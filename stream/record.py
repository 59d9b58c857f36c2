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

Each segment's MP4 is encoded on its own thread from a bounded queue, so ffmpeg (slow on
big frames or a loaded machine, or hung) never holds up receiving: ZeroMQ would buffer
meanwhile and then drop frames. When the queue is full (`mp4_queue_frames` frames waiting)
the frame is left out of the MP4 only: the NPZ keeps every frame, the segment's meta counts
the frames left out (`mp4_skipped`), `Recorder.mp4_skipped` adds them up, and a
rate-limited warning says so. A closed segment's NPZ is written once its MP4 has finished,
by `add`, `tick` or `close`, or after `mp4_timeout_s`: an ffmpeg still busy then is
abandoned (killed), its queued frames counted as skipped, the MP4 kept as far as it got and
marked in `mp4_error`, logged and counted in `Recorder.mp4_abandoned`. So `close()` returns
within `mp4_timeout_s` plus the time to write the NPZs, whatever ffmpeg does.

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
fps, `mp4_frames` (frames handed to ffmpeg: those it holds unless `mp4_error` is set),
`mp4_skipped` (frames left out because the encoder fell behind, or still queued when it
was abandoned) and `mp4_error` (why it failed or was abandoned, or null)).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .datadir import device_dirname
from .logs import RateLimitedLog
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
# The queue holds the frames the segment keeps for its NPZ anyway (no copies); its bound is
# how far the MP4 may lag the stream, hence how long a closed segment's MP4 takes to finish.
MP4_QUEUE_FRAMES = 120  # ~4 s at 30 fps; several beats of every device's bursts
MP4_TIMEOUT_S = 10.0    # a closed segment's MP4 not finished by then is abandoned


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


def _open_writer(path: Path, fps: float) -> Any:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    # Fragmented MP4: readable up to the last fragment even if the recorder is killed.
    return imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
        macro_block_size=2, ffmpeg_log_level="error", output_params=["-movflags", "+frag_keyframe+empty_moov"],
    )


def _even(pixels: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: pad with one black row/column rather than let imageio rescale."""
    h, w = pixels.shape
    return np.pad(pixels, ((0, h % 2), (0, w % 2)))


def _ffmpeg_process(writer: Any) -> subprocess.Popen | None:
    """The ffmpeg behind an imageio writer, or None. imageio keeps no handle on it: the process
    is the local `p` of imageio-ffmpeg's `write_frames` generator, the only way to stop an
    ffmpeg that hangs (otherwise it and the thread waiting on it stay for good)."""
    frame = getattr(getattr(writer, "_write_gen", None), "gi_frame", None)
    try:
        process = frame.f_locals.get("p") if frame is not None else None
    except Exception:  # another imageio-ffmpeg: nothing to stop, the thread is left behind
        return None
    return process if isinstance(process, subprocess.Popen) else None


class _Encoder:
    """A segment's MP4, written by its own thread from a bounded queue so that ffmpeg never
    holds up the thread that receives. `offer` never waits; `done` is set when the thread ends."""

    def __init__(self, path: Path, fps: float, capacity: int, name: str) -> None:
        self.path, self.fps, self.capacity, self.name = path, fps, capacity, name
        self.frames = 0        # handed to ffmpeg
        self.skipped = 0       # left out: the queue was full, or still queued (or in flight) when abandoned
        self.behind = 0        # of those, left out because the queue was full
        self.error = ""        # why the MP4 failed or was abandoned ("" while it is fine)
        self.abandoned = False
        self.done = threading.Event()
        self._queue: deque[np.ndarray] = deque()
        self._cond = threading.Condition()
        self._ending = False    # the segment closed: encode what is queued, then close ffmpeg
        self._stopped = False   # failed or abandoned: the MP4 takes no more frames
        self._in_flight = False  # a frame is inside append_data
        self._writer: Any = None
        self._process: subprocess.Popen | None = None  # the ffmpeg killed when abandoned
        try:
            threading.Thread(target=self._run, name=f"mp4 {name}", daemon=True).start()
        except RuntimeError as err:  # no thread to be had: the NPZ must not depend on it
            self.error, self._stopped = _error_text(err), True
            self.done.set()

    def offer(self, pixels: np.ndarray) -> bool:
        """Queue a frame for the MP4; False when the queue is full and the frame is left out (counted)."""
        with self._cond:
            if self._stopped:
                return True  # failed: `error` says why the rest is missing
            if len(self._queue) >= self.capacity:
                self.skipped += 1
                self.behind += 1
                return False
            self._queue.append(pixels)
            self._cond.notify()
            return True

    def end(self) -> None:
        """No more frames: encode those queued, then close ffmpeg."""
        with self._cond:
            self._ending = True
            self._cond.notify()

    def _take(self) -> np.ndarray | None:
        """The next frame; None when the segment has closed and none is left, or the MP4 stopped."""
        with self._cond:
            while not (self._queue or self._ending or self._stopped):
                self._cond.wait()
            if self._stopped or not self._queue:
                return None
            self._in_flight = True
            return self._queue.popleft()

    def _encoded(self) -> None:
        with self._cond:
            self._in_flight = False
            if not self._stopped:  # abandoned meanwhile: that frame was counted as skipped
                self.frames += 1

    def _run(self) -> None:
        try:
            self._writer = _open_writer(self.path, self.fps)
            while (pixels := self._take()) is not None:
                self._writer.append_data(_even(pixels))
                self._encoded()
            self._writer.close()  # kept in _writer meanwhile: abandon() kills the ffmpeg it waits for
        except Exception as err:
            self._fail(_error_text(err))
        finally:
            self._close_pipe()
            self.done.set()

    def _close_pipe(self) -> None:
        """After a kill, imageio leaves ffmpeg's input pipe open with data in its buffer: closed
        here (on this thread, free now), not by the garbage collector, which reports the broken pipe."""
        with self._cond:
            process = self._process
        if process is not None and process.stdin is not None:
            with contextlib.suppress(Exception):
                process.stdin.close()

    def _fail(self, why: str) -> None:
        with self._cond:
            if self._stopped:  # abandoned: this is ffmpeg killed under it
                return
            self._stopped, self._in_flight, self.error = True, False, why
            self._queue.clear()
        log.error("%s: MP4 writer failed, frames go on to the NPZ only: %s", self.name,
                  why.partition("\n")[0])  # the first line; meta keeps more
        if self._writer is not None:
            with contextlib.suppress(Exception):  # already broken: this only reaps ffmpeg and its pipes
                self._writer.close()

    def abandon(self, waited_s: float) -> int:
        """Stop waiting for ffmpeg: count the frames it has not taken as skipped, mark the MP4
        incomplete, and kill ffmpeg. Returns the frames counted; 0 if it finished meanwhile."""
        with self._cond:
            if self.done.is_set():
                return 0
            dropped = len(self._queue) + int(self._in_flight)
            self.skipped += dropped
            self._queue.clear()
            self._stopped, self.abandoned = True, True
            reason = f"abandoned: ffmpeg did not finish within {waited_s:g} s"
            self.error = f"{self.error}; {reason}" if self.error else reason
            self._cond.notify()
        process = _ffmpeg_process(self._writer)
        if process is not None:
            with self._cond:
                self._process = process  # before the kill, which wakes the thread that closes its pipe
            with contextlib.suppress(OSError):
                process.kill()
        return dropped


class Segment:
    """One device's open recording; after `end`, one whose MP4 is finishing."""

    def __init__(self, folder: Path, device: str, index: int, first: FrameMessage, opened: str,
                 wall: float, fps: float | None, queue_frames: int = MP4_QUEUE_FRAMES) -> None:
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
        self.closed = ""       # why it closed ("" while open)
        self.mp4_error = ""    # why the MP4 failed or was abandoned, once closed
        self._timeout_s = MP4_TIMEOUT_S
        self._deadline = float("inf")  # time.monotonic() by which its MP4 must have finished
        self.video = _Encoder(self.path(".mp4"), self.fps, queue_frames, f"{device}: segment {index}")

    def path(self, suffix: str) -> Path:
        return self.folder / (self.base + suffix)

    @property
    def last_seq(self) -> int:
        return self.headers[-1]["seq"]

    def add(self, msg: FrameMessage, recv: float) -> bool:
        """Keep the frame for the NPZ and offer it to the MP4; False when the MP4 left it out."""
        pixels = np.array(msg.pixels)  # a copy: the message's buffer is reused by ZeroMQ
        # The NPZ's lists first: they must not depend on the MP4 writer.
        self.frames.append(pixels)
        self.headers.append(msg.header)
        self.recv.append(recv)
        self.gaps.append(msg.gap)
        return self.video.offer(pixels)

    def end(self, reason: str, timeout_s: float) -> None:
        """No more frames: the MP4 finishes on its thread, given `timeout_s` before it is abandoned."""
        self.closed, self._timeout_s = reason, timeout_s
        self._deadline = time.monotonic() + timeout_s
        self.video.end()

    def ready(self) -> bool:
        """Ended, and its MP4 finished or out of time: `close` will not wait."""
        return self.video.done.is_set() or time.monotonic() >= self._deadline

    def wait(self) -> None:
        """Wait for the MP4 to finish, at most until the deadline `end` set."""
        self.video.done.wait(max(0.0, self._deadline - time.monotonic()))

    def _finish_video(self) -> tuple[str | None, int]:
        """Abandon the MP4 if it has not finished; its file name (None when it holds no video) and frames."""
        video = self.video
        if not video.done.is_set():
            dropped = video.abandon(self._timeout_s)
            if video.abandoned:
                log.error("%s: segment %d: ffmpeg did not finish within %g s, MP4 abandoned incomplete "
                          "(%d frame(s) not encoded, counted as skipped); the NPZ has every frame",
                          self.device, self.index, self._timeout_s, dropped)
        self.mp4_error = video.error
        mp4 = self.path(".mp4")
        if _size(mp4) > 0:
            return mp4.name, video.frames
        # ffmpeg that gave up (a frame size the encoder refuses) leaves an empty file, and imageio says nothing
        if not self.mp4_error:
            self.mp4_error = "ffmpeg wrote no video (see its messages on stderr)"
            log.error("%s: segment %d: MP4 writer failed, frames go on to the NPZ only: %s",
                      self.device, self.index, self.mp4_error)
        with contextlib.suppress(OSError):
            mp4.unlink(missing_ok=True)
        return None, 0

    def close(self) -> dict[str, Any]:
        """Finish the MP4 (abandoning it if still busy), write the NPZ (atomically), and return
        the segment's index line."""
        mp4, mp4_frames = self._finish_video()
        if self.video.behind:
            log.warning("%s: segment %d: %d of %d frame(s) left out of the MP4 (its encoder fell behind); "
                        "the NPZ has them", self.device, self.index, self.video.behind, len(self.frames))
        meta = {"device": self.device, "segment": self.index, "opened": self.opened, "closed": self.closed,
                "mp4": mp4, "fps": self.fps, "started": self.started, "mp4_frames": mp4_frames,
                "mp4_skipped": self.video.skipped, "mp4_error": self.mp4_error or None}
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
    """Write every device's frames to rotating segments under `out`; statuses to statuses.jsonl.

    `mp4_queue_frames`: how many frames a segment's MP4 encoder may fall behind before frames
    are left out of the MP4 (never the NPZ). `mp4_timeout_s`: how long a closed segment's MP4
    may take to finish before its ffmpeg is abandoned.
    """

    def __init__(self, out: Path, policy: RotatePolicy | None = None, *, fps: float | None = None,
                 clock: Callable[[], float] = time.time, mp4_queue_frames: int = MP4_QUEUE_FRAMES,
                 mp4_timeout_s: float = MP4_TIMEOUT_S) -> None:
        if mp4_queue_frames < 1 or not mp4_timeout_s > 0:
            raise ValueError("mp4_queue_frames must be >= 1 and mp4_timeout_s > 0")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy = policy or RotatePolicy()
        self.fps = fps
        self.clock = clock
        self.mp4_queue_frames, self.mp4_timeout_s = mp4_queue_frames, mp4_timeout_s
        self.open: dict[str, Segment] = {}
        self.closing: list[Segment] = []  # closed, their MP4 finishing: their NPZ and line come next
        self.closed: deque[dict[str, Any]] = deque(maxlen=CLOSED_KEPT)  # index lines of the latest segments written
        self.frames = 0
        self.segments = 0     # segments written (their NPZ)
        self.lost = 0         # frames lost in transit, in the segments written
        self.failed = 0       # segments that could not be written (each logged)
        self.mp4_failed = 0   # segments whose MP4 failed or was abandoned, their frames in the NPZ only (each logged)
        self.mp4_abandoned = 0  # of those, MP4s whose ffmpeg did not finish in time (each logged)
        self.mp4_skipped = 0  # frames left out of the MP4s, in the segments written (in the NPZ all the same)
        self.lines_failed = 0  # lines of segments.jsonl / statuses.jsonl that could not be written (each logged)
        self._behind = RateLimitedLog(log, "MP4 encoder behind, frames left out of the MP4 (the NPZ keeps them)")
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
            segment = self._open(device, msg, now)
        if not segment.add(msg, now):
            self._behind(f"{device}: segment {segment.index}: {self.mp4_queue_frames} frames waiting")
        self.frames += 1
        if len(segment.frames) >= self.policy.rotate_frames:
            self._close(device, "rotate_frames")
        self._reap()

    def _open(self, device: str, msg: FrameMessage, now: float) -> Segment:
        last = self._last_close.pop(device, "")
        reason = last if last in _SPLITS else "start"  # after close(): a new start
        index = self._count.get(device, 0)
        self._count[device] = index + 1
        segment = Segment(self.out / device_dirname(device), device, index, msg, reason, now, self.fps,
                          self.mp4_queue_frames)
        self.open[device] = segment
        log.info("%s: segment %d opened (%s)", device, index, reason)
        return segment

    def _split_reason(self, segment: Segment, msg: FrameMessage, now: float) -> str:
        if msg.seq <= segment.last_seq:
            return "restart"  # seq went back: the publisher (or engine) started again
        if msg.pixels.shape != segment.shape:
            return "shape"
        if now - segment.started >= self.policy.rotate_s:
            return "rotate_time"
        return ""

    def tick(self) -> None:
        """Close the segments older than rotate_s and write those whose MP4 has finished (call
        it now and then, also when no frames come)."""
        now = self.clock()
        for device, segment in list(self.open.items()):
            if now - segment.started >= self.policy.rotate_s:
                self._close(device, "rotate_time")
        self._reap()
        self._behind.flush()

    def close(self, reason: str = "stopped") -> None:
        """Close every open segment and write every closed one: waits for their MP4s, at most
        `mp4_timeout_s` in all, abandoning those still busy."""
        for device in list(self.open):
            self._close(device, reason)
        self._reap(wait=True)
        self._behind.flush(force=True)  # the count held back would be lost at exit

    def _close(self, device: str, reason: str) -> None:
        """End the device's segment; it is written (`_reap`) once its MP4 has finished."""
        segment = self.open.pop(device)
        self._last_close[device] = reason
        segment.end(reason, self.mp4_timeout_s)
        self.closing.append(segment)

    def _reap(self, wait: bool = False) -> None:
        """Write the closed segments whose MP4 has finished or run out of time (with `wait`: all,
        each waited for until its deadline). A device's segments are written in order."""
        held: set[str] = set()  # devices with an older segment still finishing
        for segment in list(self.closing):
            if wait:
                segment.wait()
            if segment.device in held or not segment.ready():
                held.add(segment.device)
                continue
            self.closing.remove(segment)
            self._write(segment)

    def _write(self, segment: Segment) -> None:
        device = segment.device
        try:
            line = segment.close()
        except Exception as err:  # one segment that cannot be written must not stop the recording
            self.failed += 1
            log.error("%s: segment %d could not be written (%s): %s", device, segment.index, type(err).__name__, err)
            return
        finally:
            self.mp4_failed += bool(segment.mp4_error)
            self.mp4_abandoned += segment.video.abandoned
            self.mp4_skipped += segment.video.skipped
        self.segments += 1
        self.lost += line["lost"]
        self.closed.append(line)
        self._append_line("segments.jsonl", line)
        log.info("%s: segment %d closed (%s): %d frames", device, segment.index, segment.closed, line["frames"])

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
