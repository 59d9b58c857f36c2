"""Replay a recorded ECG file as a stream of chunks, in real time or as fast as possible.

    async for item in FileSource("rec.csv", fs=None, lead=None, realtime=True):
        ...   # EcgChunk, seq 0, 1, 2...; t0 in file time (0 at the first sample)

Readers and formats: `recording.py` (NPY/NPZ/WFDB and dispatch) and `textfiles.py`
(CSV/TXT, Apple Health, OpenSignals). A file that cannot be read, or whose sample rate
is unknown, raises `ReplayError` (one line) on the first `__anext__` (or on `load()`):
that is a configuration error for the caller to show, not bad input in a stream.
"""
from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from .chunk import EcgChunk
from .recording import Recording, ReplayError, read_recording
from .status import new_counters

__all__ = ["FileSource", "Recording", "ReplayError", "read_recording"]


class FileSource:
    """Chunks of `chunk_s` seconds from a file.

    realtime: False = as fast as the consumer takes them (yielding to the loop between
    chunks); True = paced at the recording's rate; a number = that many times real time.
    Each chunk is released when its last sample would have been recorded; pacing follows
    the monotonic clock from the start, so a slow consumer does not accumulate drift.
    """

    def __init__(
        self,
        path: str | Path,
        fs: float | None = None,
        lead: str | int | None = None,
        device: str = "file",
        chunk_s: float = 0.25,
        realtime: bool | float = False,
        unit: str | None = None,
        t0: float = 0.0,
    ) -> None:
        if not chunk_s > 0:
            raise ValueError("chunk_s must be > 0")
        speed = 1.0 if realtime is True else float(realtime)
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("realtime must be a bool or a speed factor > 0")
        self.path = Path(path)
        self.fs = fs
        self.lead = lead
        self.device = device
        self.chunk_s = chunk_s
        self.speed = speed  # 0: as fast as possible
        self.unit = unit
        self.t0 = t0
        self.counters = new_counters()
        self.recording: Recording | None = None
        self._pos = 0
        self._seq = 0
        self._start: float | None = None

    async def load(self) -> Recording:
        """Read the file (in a thread: parsing blocks); raises ReplayError."""
        if self.recording is None:
            self.recording = await asyncio.to_thread(read_recording, self.path, self.fs, self.lead, self.unit)
        return self.recording

    async def __aenter__(self) -> "FileSource":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release (the file is read whole); here so every source closes alike."""

    def __aiter__(self) -> "FileSource":
        return self

    async def __anext__(self) -> EcgChunk:
        rec = await self.load()
        n_total = rec.samples.shape[1]
        if self._pos >= n_total:
            raise StopAsyncIteration
        step = max(1, int(round(self.chunk_s * rec.fs)))
        end = min(self._pos + step, n_total)
        if self.speed > 0:
            if self._start is None:
                self._start = time.monotonic()
            due = self._start + end / rec.fs / self.speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        else:
            await asyncio.sleep(0)  # let other tasks run between chunks
        chunk = EcgChunk(
            device=self.device,
            samples=rec.samples[:, self._pos : end].copy(),  # the consumer may keep it
            fs=rec.fs,
            t0=self.t0 + self._pos / rec.fs,
            seq=self._seq,
            unit="mV",
            received=time.monotonic(),
        )
        self._pos = end
        self._seq += 1
        self.counters["chunks"] += 1
        self.counters["samples"] += chunk.n_samples
        return chunk
