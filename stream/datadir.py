"""Raw ECG persistence: every chunk of every device is appended to disk as it arrives.

Layout, one folder per device (the id percent-encoded where it is not a safe file name;
an id whose encoding passes MAX_DIRNAME bytes is cut and given a hash, and the id itself
is written in the folder's device.txt)::

    DATA_DIR/<device>/ecg.f32      float32 little-endian samples, appended chunk after chunk;
                                   within a chunk, time-major (n × leads interleaved)
    DATA_DIR/<device>/index.jsonl  one JSON object per chunk, written after its samples:
        {"seq": int, "t0": float, "fs": float, "n": int, "leads": int, "unit": str,
         "offset": int (index of the chunk's first float32 in ecg.f32),
         "received": float (wall clock, Unix s)}

Samples are stored exactly as received (units as the chunk says, NaN included), valid
or not: this is the record of what came in. Both files are written through to the OS
chunk by chunk (unbuffered), so a crash of the process loses nothing received;
``fsync=True`` also survives a power cut at a cost per chunk. A chunk the disk refuses
(full) is cut back out, so the chunks after it keep their offsets. A restart appends to
the same files, after cutting both back to the last chunk written whole (a crash
mid-write leaves a torn tail). A reader that meets a half-written last index line ignores it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import quote, unquote

import numpy as np

from ..bridges.chunk import EcgChunk

SAMPLES_FILE = "ecg.f32"
INDEX_FILE = "index.jsonl"
_DTYPE = np.dtype("<f4")


MAX_DIRNAME = 200  # bytes; file systems allow 255, and percent-encoding triples non-ASCII ids
ID_FILE = "device.txt"  # the id itself, for folders whose name had to be shortened


def device_dirname(device: str) -> str:
    """A file-system-safe folder name for a device id: the id percent-encoded, or when that
    is too long, its head and a hash (the id then also lies in the folder's ID_FILE).
    Raises ValueError for an empty id (its folder would be the data dir itself)."""
    if not device:
        raise ValueError("empty device id")
    name = quote(device, safe="-_:@+=,")
    name = "%2E" + name[1:] if name.startswith(".") else name
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(device.encode()).hexdigest()[:16]
        head = re.sub(r"%[0-9A-F]?$", "", name[: MAX_DIRNAME - 18])  # no escape cut in half
        name = f"{head}~~{digest}"
    return name


class RawEcgWriter:
    """Append-only writer of one device's raw ECG."""

    def __init__(self, data_dir: str | Path, device: str, *, fsync: bool = False) -> None:
        self.device = device
        self.folder = Path(data_dir) / device_dirname(device)
        self.folder.mkdir(parents=True, exist_ok=True)
        if unquote(self.folder.name) != device:
            (self.folder / ID_FILE).write_text(device, encoding="utf-8")
        self._fsync = fsync
        _cut_torn_tail(self.folder)
        # Unbuffered: a write the disk refused must not wait in a buffer and land later,
        # behind another chunk's index line (every later offset would be off).
        self._samples = open(self.folder / SAMPLES_FILE, "ab", buffering=0)
        self._index = open(self.folder / INDEX_FILE, "ab", buffering=0)
        self._offset = os.fstat(self._samples.fileno()).st_size // _DTYPE.itemsize
        self._index_size = os.fstat(self._index.fileno()).st_size
        self._torn = False  # a failed append left a tail not yet cut back
        self.chunks_written = 0

    def append(self, chunk: EcgChunk) -> None:
        """Write one chunk's samples, then its index line. OSError (a full disk) leaves
        both files as they were before the chunk, so the next chunk lands at its offset."""
        if self._torn:
            self._cut_back()
        data = np.ascontiguousarray(np.asarray(chunk.samples, dtype=_DTYPE).T)  # n × leads
        entry = {
            "seq": int(chunk.seq), "t0": float(chunk.t0), "fs": float(chunk.fs), "n": chunk.n_samples,
            "leads": chunk.n_leads, "unit": chunk.unit, "offset": self._offset, "received": time.time(),
        }
        line = (json.dumps(entry) + "\n").encode("utf-8")
        try:
            _write_all(self._samples, data.tobytes())
            _write_all(self._index, line)
            if self._fsync:
                os.fsync(self._samples.fileno())
                os.fsync(self._index.fileno())
        except OSError:
            self._torn = True
            with contextlib.suppress(OSError):  # else retried before the next chunk
                self._cut_back()
            raise
        self._offset += data.size
        self._index_size += len(line)
        self.chunks_written += 1

    def _cut_back(self) -> None:
        """Cut both files back to the last chunk written whole (a part of a refused write may be on disk)."""
        os.ftruncate(self._samples.fileno(), self._offset * _DTYPE.itemsize)
        os.ftruncate(self._index.fileno(), self._index_size)
        self._torn = False

    def close(self) -> None:
        for handle in (self._samples, self._index):
            handle.close()  # unbuffered: nothing left to flush


def _write_all(handle: BinaryIO, data: bytes) -> None:
    """Write all of `data` to an unbuffered file; a short write (the disk filling) goes on
    until the disk refuses with OSError."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]


def _cut_torn_tail(folder: Path) -> None:
    """After a crash mid-write, cut both files back to the last chunk written whole.

    Appending after a torn tail would put every later chunk at the wrong offset (samples
    cut mid-float) or behind an index line no reader gets past."""
    samples, index = folder / SAMPLES_FILE, folder / INDEX_FILE
    have = samples.stat().st_size if samples.exists() else 0
    keep_index, keep_floats = _last_whole_chunk(index, have)
    if index.exists() and index.stat().st_size > keep_index:
        os.truncate(index, keep_index)
    if have > keep_floats * _DTYPE.itemsize:
        os.truncate(samples, keep_floats * _DTYPE.itemsize)


def _last_whole_chunk(index: Path, have: int) -> tuple[int, int]:
    """(bytes of the index, float32s of the samples) up to the last chunk whose index line
    and samples are both whole. Read from the end: a device's index grows by a line per
    chunk for as long as it streams, and a restart should not read all of it."""
    if not index.exists():
        return 0, 0
    size = index.stat().st_size
    block = 1 << 16
    with open(index, "rb") as f:
        while True:
            start = max(0, size - block)
            f.seek(start)
            data = f.read(size - start)
            end = len(data)
            while end > 0:  # complete lines, the last first
                cut = data.rfind(b"\n", 0, end)
                if cut < 0:
                    break
                begin = data.rfind(b"\n", 0, cut) + 1
                if begin == 0 and start > 0:
                    break  # the line may begin before this block
                try:
                    entry = json.loads(data[begin:cut])
                    floats = int(entry["offset"]) + int(entry["n"]) * int(entry["leads"])
                except (ValueError, KeyError, TypeError):
                    floats = -1
                if 0 <= floats and floats * _DTYPE.itemsize <= have:
                    return start + cut + 1, floats
                end = begin
            if start == 0:
                return 0, 0
            block *= 4


class DataDir:
    """Writers for every device, opened on first use."""

    def __init__(self, root: str | Path, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._writers: dict[str, RawEcgWriter] = {}

    def append(self, chunk: EcgChunk) -> None:
        writer = self._writers.get(chunk.device)
        if writer is None:
            writer = self._writers[chunk.device] = RawEcgWriter(self.root, chunk.device, fsync=self._fsync)
        writer.append(chunk)

    def close_device(self, device: str) -> None:
        """Close one device's files (a forgotten device: its next chunk opens them again)."""
        writer = self._writers.pop(device, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


@dataclass(frozen=True)
class RawChunk:
    """One persisted chunk: its index entry and its samples (leads × n float32)."""

    entry: dict
    samples: np.ndarray


def list_devices(root: str | Path) -> list[str]:
    """Device ids that have data under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(_device_of(p) for p in root.iterdir() if (p / INDEX_FILE).is_file())


def _device_of(folder: Path) -> str:
    named = folder / ID_FILE
    return named.read_text(encoding="utf-8") if named.is_file() else unquote(folder.name)


def read_chunks(root: str | Path, device: str) -> Iterator[RawChunk]:
    """Yield a device's persisted chunks in the order they arrived."""
    folder = Path(root) / device_dirname(device)
    data = np.fromfile(folder / SAMPLES_FILE, dtype=_DTYPE)
    with open(folder / INDEX_FILE, encoding="utf-8") as index:
        for line in index:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # half-written last line: the chunk's samples may be incomplete too
            start, n, leads = entry["offset"], entry["n"], entry["leads"]
            if start + n * leads > data.size:
                break
            yield RawChunk(entry, data[start : start + n * leads].reshape(n, leads).T)


def read_device(root: str | Path, device: str) -> tuple[np.ndarray, list[dict]]:
    """All of a device's samples joined in arrival order (leads × N) and the index entries.

    Raises ValueError when the lead count changed mid-recording (use read_chunks then).
    """
    chunks = list(read_chunks(root, device))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32), []
    if len({c.samples.shape[0] for c in chunks}) > 1:
        raise ValueError(f"{device}: the number of leads changes within the recording; use read_chunks")
    return np.concatenate([c.samples for c in chunks], axis=1), [c.entry for c in chunks]
