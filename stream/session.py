"""One device's state in the engine: checker, beat detector, beat queue, counters, signal state.

A Session never publishes anything itself: `ingest` and `check_idle` return the status
events ``(code, message)`` for the engine to publish, so the policy is testable without
sockets. What each checker issue does here:

- dropped chunks (duplicate, out of order, bad shape, all-overlap): counted, not used;
- gap, fs change, lead-count change, seq reset: the beat detector restarts, so no RR
  interval is measured across a discontinuity (no beat invented);
- flat line on every lead: ``signal_lost`` and the detector is dropped (the beat begun
  before the flat line is abandoned); the first sample that is not flat again gives
  ``signal_restored``. Decided sample by sample (the checker's `flat` mask), so a long
  chunk's beats before the flat line are kept, as they would be in small chunks;
- flat line on the detection lead only: detection moves to the lead not flat whose
  recent samples re-find most of the beats already found (the first such lead on a tie:
  a live lead may show no usable QRS; ``bad_input`` ``detect_lead``, counter
  ``detect_lead_switches``); it stays there
  until that lead goes flat in turn, so it never flips back and forth. The beat detector
  is kept (`BeatSegmenter.switch_lead`): its ring holds every lead's recent samples, so
  the new lead's detector learns its thresholds on that history and finds the beats of
  the `flat_s` the old lead was flat before the checker could call it so; none is found
  twice, and beats go on without a gap. Windows keep every lead, the one that came off
  as the flat line it sends (`valid` is per sample, not per lead);
- NaN/inf, saturation, seq gap, overlap: reported, data used. The beat detector gets the
  NaN itself (beat windows mark those samples invalid); the checker's repaired copy
  feeds only its own statistics.

Chunks in V or µV are converted to mV before the checker, whose thresholds are in mV.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bridges import status as source_codes
from ..bridges import validate
from ..bridges.chunk import UNIT_TO_MV, EcgChunk, RrIntervals
from ..core.config import EcgEncoderConfig
from . import protocol

Event = tuple[str, str]  # (status code, message)

# Checker issues after which the detector starts afresh.
_RESTART_DETECTOR = {validate.GAP, validate.FS_CHANGE, validate.LEADS_CHANGE, validate.SEQ_RESET, validate.TIME_RESET}
# Status codes that mark a state change: always published, never rate-limited.
_ALWAYS_REPORTED = {"signal_lost", "signal_restored", "stopped"}


@dataclass
class EngineLimits:
    """Bounds and timers of the engine.

    Drop policy under overload: each device has a queue of at most `beat_queue` beats
    waiting for the backend. A new beat arriving at a full queue pushes out the oldest
    waiting beat (a live viewer wants the newest heartbeat, and latency stays bounded);
    the drop is counted in the device's ``beats_dropped`` and reported as an
    ``overload`` status. Memory is bounded by max_devices × beat_queue beat windows.
    Statuses of one kind are published at most once per `status_interval_s` per device
    (the counters they carry still count every event). A device silent for
    `forget_after_s` is forgotten: a last `stopped` status carries its counters, and its
    session, backend state and slot among `max_devices` are freed (devices that come and
    go under new ids would otherwise fill the slots for good); if it comes back, it starts
    afresh, as a new device.
    """

    beat_queue: int = 4               # beats waiting per device before the oldest is dropped
    signal_timeout_s: float = 3.0     # no ECG for this long → signal_lost
    watchdog_interval_s: float = 0.5  # how often the watchdog looks
    status_interval_s: float = 1.0    # repeat a status kind per device at most this often
    max_devices: int = 256            # devices beyond this are refused (bad_input on _engine)
    workers: int = 2                  # backend threads (renders run off the event loop)
    drain_timeout_s: float = 10.0     # when finite sources end, wait this long for queued beats
    stop_timeout_s: float = 5.0       # a stop's whole budget: sources closing, renders in flight, the backend's close
    forget_after_s: float = 600.0     # a device silent this long is forgotten: its state and slot freed (0: never)
    remove_pacing_spikes: bool = True  # the pacing-spike remover before detection (kernels/pace_spikes.py)

    def __post_init__(self) -> None:
        if self.beat_queue < 1 or self.max_devices < 1 or self.workers < 1:
            raise ValueError("beat_queue, max_devices and workers must be >= 1")
        # `not x > 0` so that NaN fails too: a NaN timeout would make signal_lost never fire
        if not (self.signal_timeout_s > 0 and self.watchdog_interval_s > 0):
            raise ValueError("signal_timeout_s and watchdog_interval_s must be > 0")
        timers = {"status_interval_s": self.status_interval_s, "drain_timeout_s": self.drain_timeout_s,
                  "stop_timeout_s": self.stop_timeout_s, "forget_after_s": self.forget_after_s}
        for name, value in timers.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}" + (" (0: never forget a device)"
                                                                      if name == "forget_after_s" else ""))


def source_status_code(code: str) -> str:
    """The protocol status code for a bridges `SourceStatus` code."""
    if code == source_codes.OVERFLOW:
        return "overload"
    if code in (source_codes.CONNECTED, source_codes.RECONNECTED, source_codes.DISCONNECTED,
                source_codes.CONNECT_FAILED):
        return "source"
    return "bad_input"  # malformed, oversized, unknown unit, bad shape/field/topic, and anything new


@dataclass
class PendingBeat:
    beat: Any          # stream.beats.Beat
    index: int         # the device's beat number (continues across detector restarts)
    capture: float     # wall clock when the chunk completing the beat arrived


@dataclass(frozen=True)
class RhythmBeat:
    """A beat known from its RR interval only: the same fields as `beats.Beat`, no ECG."""

    index: int
    r_time: float
    rr: float
    next_r_time: float
    window: np.ndarray  # zeros, leads × window samples
    valid: np.ndarray   # all False: the backend sees no ECG
    detected_at: float

    @property
    def hr(self) -> float:
        return 60.0 / self.rr


def _in_mv(chunk: EcgChunk) -> EcgChunk:
    """The chunk in millivolts; one the checker will refuse (unknown unit, bad shape) as it is."""
    factor = UNIT_TO_MV.get(chunk.unit)
    x = np.asarray(chunk.samples)
    if chunk.unit == "mV" or factor is None or x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        return chunk
    return dataclasses.replace(chunk, samples=x.astype(np.float32) * np.float32(factor), unit="mV")


def _with_gaps(used: EcgChunk, raw: EcgChunk) -> np.ndarray:
    """`used`'s samples (float32) with NaN where the checker filled a NaN/inf in: the beat
    windows must not take a made-up sample for ECG. `used` may be `raw` trimmed at the front."""
    samples = np.asarray(used.samples, dtype=np.float32)
    original = np.asarray(raw.samples)[:, raw.n_samples - used.n_samples:]
    finite = np.isfinite(original)
    return samples if finite.all() else np.where(finite, samples, np.float32(np.nan))


def _run_end(mask: np.ndarray, i: int) -> int:
    """One past the last index of the run of mask[i]'s value that starts at i."""
    other = np.flatnonzero(mask[i:] != mask[i])
    return i + int(other[0]) if other.size else mask.shape[0]


@dataclass
class Session:
    device: str
    limits: EngineLimits = field(default_factory=EngineLimits)
    config: EcgEncoderConfig | None = None

    def __post_init__(self) -> None:
        protocol.check_device(self.device)  # the id must fit in a topic
        self.config = self.config or EcgEncoderConfig()  # the beat windows' rate and alignment
        self.checker = validate.ChunkChecker()
        self.segmenter: Any = None
        self.state: Any = None              # the backend's, made by the engine on the first beat
        self.counters: Counter[str] = Counter()
        self.lost: str | None = None        # why the signal is lost, or None
        self.last_data = time.monotonic()
        self._beat_index = 0
        self._queue: deque[PendingBeat] = deque()
        self._ready = asyncio.Event()
        self._in_flight = False
        self._last_report: dict[tuple[str, str], float] = {}
        self._rhythm_clock: float | None = None  # R time the next rhythm-only beat starts at
        self.detect_lead = 0                # the lead beats are detected on

    # -- input --------------------------------------------------------------------------

    def ingest(self, chunk: EcgChunk) -> list[Event]:
        """Check, segment and queue one chunk; return the status events it caused."""
        self.last_data = time.monotonic()
        capture = time.time()
        self.counters["chunks"] += 1
        events: list[Event] = []
        chunk = _in_mv(chunk)  # the checker's flat and rail thresholds are in mV
        result = self.checker.check(chunk)  # first: a chunk of the wrong shape has no n_samples
        self.counters["samples"] += chunk.n_samples if np.ndim(chunk.samples) == 2 else 0
        restart = False
        for issue in result.issues:
            self.counters[f"issue_{issue.code}"] += 1
            if issue.code == validate.FLAT_LINE and issue.count >= chunk.n_leads:
                continue  # every lead flat: signal_lost, decided sample by sample below
            self.counters["bad_input"] += 1
            events.append(("bad_input", f"{issue.code}: {issue.message}"))
            restart |= issue.code in _RESTART_DETECTOR
        used = result.chunk
        if used is None:
            self.counters["chunks_dropped"] += 1
            return events
        if used.unit not in UNIT_TO_MV:
            self.counters["chunks_dropped"] += 1
            self.counters["bad_input"] += 1
            return [*events, ("bad_input", f"unknown_unit: {used.unit!r}")]
        if restart and self.segmenter is not None:
            self.segmenter = None
            self.counters["detector_restarts"] += 1
        if validate.LEADS_CHANGE in result.codes:
            self.detect_lead = 0  # lead numbers mean other leads now
        samples = _with_gaps(used, result.raw)
        flat = result.flat if result.flat is not None else np.zeros(samples.shape, bool)
        events.extend(self._use(used, samples, flat, capture))
        return events

    def _use(self, chunk: EcgChunk, samples: np.ndarray, flat: np.ndarray, capture: float) -> list[Event]:
        """Segment the chunk's samples run by run: a flat line on every lead stops
        detection, one on the detection lead moves it to another lead."""
        events: list[Event] = []
        all_flat = flat.all(axis=0)
        if all_flat.any():
            self.counters["flat_chunks"] += 1
        n, i = samples.shape[1], 0
        while i < n:
            if all_flat[i]:
                i = _run_end(all_flat, i)
                events.extend(self._flat_line())
                continue
            if self.lost is not None:
                events.append(self._restore())
            if flat[self.detect_lead, i]:
                events.extend(self._switch_lead(flat[:, i], capture))
            j = _run_end(~(all_flat | flat[self.detect_lead]), i)
            events.extend(self._segment(chunk, samples[:, i:j], chunk.t0 + i / chunk.fs, capture))
            i = j
        return events

    def _flat_line(self) -> list[Event]:
        self.segmenter = None  # abandon the beat begun before the flat line
        if self.lost == "flat line":
            return []
        self.lost = "flat line"  # new, or data came back after silence but flat
        self.counters["signal_lost"] += 1
        return [("signal_lost", f"flat line on every lead for {self.checker.flat_s:g} s (lead off?)")]

    def _switch_lead(self, flat: np.ndarray, capture: float) -> list[Event]:
        """Detect on the lead not flat now that re-finds most of the recent beats (the caller
        knows one is not flat). The segmenter stays: its detector moves, warmed on the new
        lead's recent samples."""
        old, self.detect_lead = self.detect_lead, self._best_live_lead(np.flatnonzero(~flat))
        self.counters["detect_lead_switches"] += 1
        self.counters["bad_input"] += 1
        events = [("bad_input", f"detect_lead: lead {old} flat (lead off?); beats detected on lead {self.detect_lead} now")]
        if self.segmenter is not None:  # beats the new lead's history completes, found at the switch
            for beat in self.segmenter.switch_lead(self.detect_lead):
                events.extend(self._enqueue(beat, capture))
        return events

    def _best_live_lead(self, live: np.ndarray) -> int:
        """Of the live leads, the one whose history re-finds most of the beats found so far
        (`BeatSegmenter.lead_agreement`); the first on a tie, or without history. A live lead
        can show no usable QRS, and detection stays where it moves until that lead is flat."""
        if self.segmenter is None or len(live) == 1:
            return int(live[0])
        scores = [self.segmenter.lead_agreement(int(lead)) for lead in live]
        return int(live[int(np.argmax(scores))])

    def _segment(self, chunk: EcgChunk, samples: np.ndarray, t0: float, capture: float) -> list[Event]:
        from .beats import BeatSegmenter  # numba: imported when the first chunk arrives

        if self.segmenter is None:
            self.segmenter = BeatSegmenter(chunk.fs, chunk.n_leads, self.config, detect_lead=self.detect_lead,
                                           remove_spikes=self.limits.remove_pacing_spikes)
        events = []
        removed = self.segmenter.spikes_removed
        for beat in self.segmenter.push(samples, t0):
            events.extend(self._enqueue(beat, capture))
        # pacemaker spikes taken out before detection: a paced patient's, or impulse noise
        self.counters["pacing_spikes_removed"] += self.segmenter.spikes_removed - removed
        return events

    def ingest_rhythm(self, item: RrIntervals) -> list[Event]:
        """Beats from RR intervals alone (a Heart Rate service strap): the fallback source.

        Each interval becomes a beat whose ECG window is all invalid, so the backend
        works from the rhythm only (the model was trained with hidden ECG spans). While
        the device also sends ECG, the ECG's own beats win and RR is only counted.
        """
        self.last_data = time.monotonic()
        self.counters["rr_items"] += 1
        if self.segmenter is not None and self.lost is None:
            self.counters["rr_ignored"] += 1
            return []
        events: list[Event] = [self._restore()] if self.lost is not None else []
        rr = [r for r in item.rr if 0.25 <= r <= 3.0]  # 20..240 bpm; the rest is sensor noise
        if len(rr) != len(item.rr):
            self.counters["bad_input"] += 1
            events.append(("bad_input", f"rr_out_of_range: {len(item.rr) - len(rr)} interval(s) outside 0.25..3 s"))
        if not rr:
            return events
        # The notification arrives at the last interval's closing R; place earlier Rs before it.
        end = item.t
        if self._rhythm_clock is None or abs(self._rhythm_clock + sum(rr) - end) > 2.0:
            self._rhythm_clock = end - sum(rr)
        n = self.config.window_samples
        for interval in rr:
            beat = RhythmBeat(self._beat_index, self._rhythm_clock, interval, self._rhythm_clock + interval,
                              np.zeros((1, n), np.float32), np.zeros(n, bool), item.t)
            self._rhythm_clock += interval
            events.extend(self._enqueue(beat, time.time()))
        return events

    def _enqueue(self, beat: Any, capture: float) -> list[Event]:
        events = []
        if len(self._queue) >= self.limits.beat_queue:
            dropped = self._queue.popleft()
            self.counters["beats_dropped"] += 1
            events.append(("overload", f"beat queue full ({self.limits.beat_queue}): dropped beat {dropped.index}"))
        self._queue.append(PendingBeat(beat, self._beat_index, capture))
        self._beat_index += 1
        self.counters["beats"] += 1
        self._ready.set()
        return events

    def _restore(self) -> Event:
        event = ("signal_restored", f"signal back after {self.lost}")
        self.lost = None
        return event

    def check_idle(self, now: float) -> Event | None:
        """The watchdog's question: has this device been silent too long? (monotonic `now`)"""
        silent = now - self.last_data
        if self.lost is None and silent > self.limits.signal_timeout_s:
            self.lost = "no data"
            self.counters["signal_lost"] += 1
            return ("signal_lost", f"no data for {silent:.1f} s")
        return None

    # -- output -------------------------------------------------------------------------

    async def next_beat(self) -> PendingBeat:
        """Wait for the oldest queued beat and take it (the render loop calls this)."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        self._in_flight = True
        return self._queue.popleft()

    def take_all(self) -> list[PendingBeat]:
        """Take every queued beat at once (offline replay, no event loop)."""
        beats = list(self._queue)
        self._queue.clear()
        return beats

    def mark_done(self) -> None:
        """The beat taken by next_beat is finished (published or failed)."""
        self._in_flight = False

    @property
    def busy(self) -> bool:
        """Beats queued or being rendered."""
        return bool(self._queue) or self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def should_report(self, code: str, message: str, now: float) -> bool:
        """Rate limit: one status per kind (code and issue word) per status_interval_s."""
        if code in _ALWAYS_REPORTED:
            return True
        key = (code, message.split(":", 1)[0])
        last = self._last_report.get(key)
        if last is not None and now - last < self.limits.status_interval_s:
            self.counters["statuses_suppressed"] += 1
            return False
        self._last_report[key] = now
        return True

    @staticmethod
    def warm_up() -> None:
        """Compile the detector's kernels before the first device arrives."""
        from .beats import BeatSegmenter

        fs = 250.0
        t = np.arange(int(4 * fs)) / fs
        ecg = np.exp(-(((t % 0.8) - 0.4) ** 2) / 2e-4).astype(np.float32)[None, :]
        BeatSegmenter(fs, 1).push(ecg, 0.0)
