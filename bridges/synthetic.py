"""Simulated ECG for N devices (the simulator of `core.simulate.ecg`), streamed in chunks.

    async for chunk in SyntheticSource(devices=8, hr=75, seed=0, realtime=True):
        ...   # EcgChunk for sim-0 ... sim-7, round-robin, chunk k of every device together

Each device is one simulated subject (its morphology fixed, drawn from its own seed)
whose ECG is generated in blocks of about `block_s` seconds. Blocks are cut in the middle
of a TP segment (between one beat's T end and the next beat's P onset), so no beat is cut
in two at a seam, and the joined signal's baseline is matched with a short ramp. Device i's
first block is shortened by i/N of a block, so the devices' blocks fall due at different
times instead of all at once. `r_peaks(device)` gives the true R times of what has been
emitted (stream seconds), for checking a detector end to end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from ..core.simulate.ecg import EcgMorphology, simulate_ecg
from ..core.simulate.pacing import PACING_MODES
from .chunk import EcgChunk
from .status import new_counters

SEAM_MARGIN_S = 3.0   # generated beyond each end of a block, to find cut points
RAMP_S = 0.5          # baseline matched over this long after a seam


class _DeviceStream:
    """One simulated subject's endless ECG, handed out n samples at a time."""

    def __init__(self, rng: np.random.Generator, hr: float, fs: float, leads: int, noise: float, block_s: float,
                 first_block_s: float, pacing: str = "none") -> None:
        self.rng, self.hr, self.fs, self.leads, self.block_s = rng, hr, fs, leads, block_s
        self.morph = dataclasses.replace(EcgMorphology.sample(rng, noise=noise), pacing=pacing)
        self.buf = np.zeros((leads, 0), np.float32)
        self.buf_start = 0.0          # stream time of buf[:, 0]
        self.r: list[float] = []      # true R times generated so far (stream seconds)
        self._next_block_s = first_block_s
        self._last: np.ndarray | None = None  # last sample generated, per lead
        self.seams: list[int] = []            # stream sample index where each later block starts

    def take(self, n: int) -> np.ndarray:
        while self.buf.shape[1] < n:
            self._extend()
        out, self.buf = self.buf[:, :n], self.buf[:, n:]
        self.buf_start += n / self.fs
        return out

    def _extend(self) -> None:
        rec = simulate_ecg(self._next_block_s + 2 * SEAM_MARGIN_S, self.fs, self.hr, self.leads, seed=self.rng, morph=self.morph)
        self._next_block_s = self.block_s
        ev = rec.beats
        onset = np.where(np.isfinite(ev.p_on), ev.p_on, ev.q_on)  # ectopic beats have no P
        cuts = ev.t_end[:-1] + 0.5 * (onset[1:] - ev.t_end[:-1])   # mid TP segment
        cuts = cuts[(cuts >= SEAM_MARGIN_S / 2) & (cuts <= rec.duration - SEAM_MARGIN_S / 2)]
        i0, i1 = int(round(cuts[0] * self.fs)), int(round(cuts[-1] * self.fs))
        seg = rec.signal[:, i0:i1].copy()
        if self._last is not None:  # not the very first block: join without a step
            self.seams.append(int(round(self.buf_start * self.fs)) + self.buf.shape[1])
            ramp = np.clip(1.0 - np.arange(seg.shape[1]) / (RAMP_S * self.fs), 0.0, None)
            seg += ((self._last - seg[:, 0])[:, None] * ramp[None, :]).astype(np.float32)
        seg_start = self.buf_start + self.buf.shape[1] / self.fs
        r = ev.r[(ev.r >= i0 / self.fs) & (ev.r < i1 / self.fs)]
        self.r.extend((seg_start + r - i0 / self.fs).tolist())
        self.buf = np.concatenate([self.buf, seg], axis=1)
        self._last = seg[:, -1]


class SyntheticSource:
    """Async iterator of simulated `EcgChunk`s for `devices` devices named `{prefix}-{i}`.

    hr: one rate for all, or one per device (bpm). realtime: True paces at real time, a
    number is a speed factor, False is as fast as the consumer takes them. duration_s:
    stop after that much ECG per device (None: never). pacing: "ventricular" or "dual" makes
    every subject a paced patient (pacing spikes in the ECG, `core/simulate/pacing.py`).
    """

    def __init__(
        self,
        devices: int = 1,
        hr: float | Sequence[float] = 75.0,
        seed: int | None = 0,
        chunk_s: float = 0.25,
        realtime: bool | float = True,
        duration_s: float | None = None,
        fs: float = 250.0,
        leads: int = 1,
        noise: float = 1.0,
        prefix: str = "sim",
        block_s: float = 60.0,
        pacing: str = "none",
    ) -> None:
        if devices < 1:
            raise ValueError("devices must be >= 1")
        rates = [float(hr)] * devices if isinstance(hr, (int, float)) else [float(h) for h in hr]
        if len(rates) != devices:
            raise ValueError(f"{len(rates)} heart rates for {devices} devices")
        if pacing not in PACING_MODES:
            raise ValueError(f"pacing must be one of {', '.join(PACING_MODES)}, got {pacing!r}")
        if not (chunk_s > 0 and fs > 0 and block_s > 0):
            raise ValueError("chunk_s, fs and block_s must be > 0")
        speed = 1.0 if realtime is True else float(realtime)
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("realtime must be a bool or a speed factor > 0")
        self.devices = [f"{prefix}-{i}" for i in range(devices)]
        self.fs = float(fs)
        self.step = max(1, int(round(chunk_s * fs)))  # samples per chunk
        self.speed = speed
        self.total = None if duration_s is None else int(round(duration_s * fs))
        self.counters = new_counters()
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(devices)]
        self._streams = [
            _DeviceStream(rng, rate, self.fs, leads, noise, block_s, block_s * (1 - 0.5 * i / devices), pacing)
            for i, (rng, rate) in enumerate(zip(rngs, rates))
        ]
        self._k = 0        # chunk index (same for all devices)
        self._d = 0        # next device within chunk k
        self._start: float | None = None

    async def __aenter__(self) -> "SyntheticSource":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release; here so every source closes the same way."""

    def __aiter__(self) -> "SyntheticSource":
        return self

    async def __anext__(self) -> EcgChunk:
        pos = self._k * self.step
        if self.total is not None and pos >= self.total:
            raise StopAsyncIteration
        n = self.step if self.total is None else min(self.step, self.total - pos)
        if self._d == 0:  # chunk k of every device is due together
            if self.speed > 0:
                if self._start is None:
                    self._start = time.monotonic()
                due = self._start + (pos + n) / self.fs / self.speed
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)
        stream = self._streams[self._d]
        chunk = EcgChunk(
            device=self.devices[self._d],
            samples=stream.take(n),
            fs=self.fs,
            t0=pos / self.fs,
            seq=self._k,
            unit="mV",
            received=time.monotonic(),
        )
        self._d += 1
        if self._d == len(self._streams):
            self._d, self._k = 0, self._k + 1
        self.counters["chunks"] += 1
        self.counters["samples"] += n
        return chunk

    def r_peaks(self, device: str) -> np.ndarray:
        """True R times (stream seconds) of `device`'s ECG emitted so far."""
        stream = self._streams[self.devices.index(device)]
        return np.array([r for r in stream.r if r < stream.buf_start])
