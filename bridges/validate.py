"""Checks every chunk of one device before the engine uses it (DESIGN §5, bad input).

    checker = ChunkChecker()
    result = checker.check(chunk)
    if result.chunk is not None:      # accepted, maybe repaired
        use(result.chunk)
    for issue in result.issues:       # report each: status message + counter
        ...

Decisions: ACCEPT (as is), REPAIRED (use `result.chunk`, a changed copy; `result.raw`
keeps the original), DROP (nothing to use). Issues and what happens:

| code          | when                                               | decision            |
|---------------|----------------------------------------------------|---------------------|
| bad_shape     | not leads×n, no samples, > max_leads, non-finite t0, fs outside MIN_FS..MAX_FS | drop |
| duplicate     | the same seq, t0 and samples as a recent chunk     | drop                |
| out_of_order  | an older seq for a time already covered            | drop (buffers only append) |
| overlap       | a new seq whose start overlaps what we have        | trim the overlap (repaired), drop if all of it overlaps |
| time_reset    | chunks keep lying in the past for `resync_s` of ECG (device clock restarted) | accept, timing and seq start afresh |
| seq_gap       | seq jumped forward (chunks lost)                   | accept              |
| seq_reset     | seq went back but time moved on (device restart)   | accept              |
| gap           | t0 later than the previous chunk's end + tolerance | accept (the engine restarts its detector) |
| fs_change     | sample rate differs from the previous chunk        | accept (the engine resets resampling) |
| leads_change  | number of leads differs from the previous chunk    | accept              |
| non_finite    | NaN/inf samples (count)                            | repaired: the lead's last finite value (see below), or 0 |
| saturation    | runs at a rail (count of clipped samples)          | accept (flagged)    |
| flat_line     | a lead's std below `flat_std_mv` over `flat_s`     | accept (the engine must not detect beats) |

The repaired copy is for the checks' statistics: a consumer that can mark samples
invalid (the engine's beat windows) should use `raw`'s NaN instead (`result.raw`, trimmed
like `chunk`), so no made-up sample passes as ECG. Before a lead's first finite value
there is nothing to carry forward: the first finite value is held back (a 0 would be a
step to any DC offset), and a lead with none yet is 0 (it reads as flat: a lead that
sends only NaN is off). `nan_fill="zero"` puts 0 everywhere.

Thresholds and rails are in millivolts: convert a chunk in another unit first.
`result.flat` says, per lead and sample, whether the `flat_s` seconds up to and including
that sample were flat, so a consumer can tell where in a long chunk a flat line began
(the `flat_line` issue is the verdict at the chunk's last sample).

Saturation: with `rails_mv=(lo, hi)` any sample at or past a rail counts. Without rails
the rail is inferred: a run of equal samples lasting ≥ `saturation_run_s` at the lead's
running maximum or minimum (what an amplifier or ADC pinned at its limit produces; a
true ECG peak is never that flat at ECG resolutions).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .chunk import EcgChunk

BAD_SHAPE = "bad_shape"
DUPLICATE = "duplicate"
OUT_OF_ORDER = "out_of_order"
OVERLAP = "overlap"
SEQ_GAP = "seq_gap"
SEQ_RESET = "seq_reset"
GAP = "gap"
FS_CHANGE = "fs_change"
LEADS_CHANGE = "leads_change"
NON_FINITE = "non_finite"
SATURATION = "saturation"
FLAT_LINE = "flat_line"
TIME_RESET = "time_reset"

# Sample rates an ECG stream may have: the beat detector needs 50 Hz (QRS energy lies up to
# ~25 Hz), and 20 kHz is past any ECG recorder; a rate outside is a unit or field mistake,
# and accepting it would fail the detector on every chunk or size its buffers by the rate.
MIN_FS, MAX_FS = 50.0, 20_000.0


class Decision(str, Enum):
    ACCEPT = "accept"
    REPAIRED = "accept_repaired"
    DROP = "drop"


@dataclass(frozen=True)
class Issue:
    code: str
    message: str
    count: int = 0  # samples, chunks or leads concerned, as the message says


@dataclass(frozen=True)
class CheckResult:
    decision: Decision
    issues: tuple[Issue, ...]
    chunk: EcgChunk | None  # what to use: the input, a repaired copy, or None if dropped
    raw: EcgChunk
    flat: np.ndarray | None = None  # (leads, n) bool per sample of `chunk`: the flat_s s up to it were flat

    @property
    def codes(self) -> list[str]:
        return [i.code for i in self.issues]


class ChunkChecker:
    """Stateful checker for the chunks of one device, fed in arrival order."""

    def __init__(
        self,
        *,
        max_leads: int = 12,
        gap_tolerance_s: float = 0.02,
        flat_s: float = 2.0,
        flat_std_mv: float = 0.005,
        saturation_run_s: float = 0.04,
        rails_mv: tuple[float, float] | None = None,
        nan_fill: str = "last",
        seen_window: int = 256,
        resync_s: float = 1.0,
    ) -> None:
        if nan_fill not in ("last", "zero"):
            raise ValueError("nan_fill must be 'last' or 'zero'")
        self.max_leads = max_leads
        self.gap_tolerance_s = gap_tolerance_s
        self.flat_s = flat_s
        self.flat_std_mv = flat_std_mv
        self.saturation_run_s = saturation_run_s
        self.rails_mv = rails_mv
        self.nan_fill = nan_fill
        self.resync_s = resync_s
        self._seen: OrderedDict[int, tuple[float, int]] = OrderedDict()  # seq → (t0, crc) of recent chunks
        self._seen_window = seen_window
        self._last_seq: int | None = None
        self._expected_end: float | None = None
        self._backward_s = 0.0  # seconds of ECG dropped in a row for lying in the past
        self._fs: float | None = None
        self._leads: int | None = None
        self._reset_signal_state(0)

    def _reset_signal_state(self, leads: int) -> None:
        self._last_value = np.full(leads, np.nan)     # per lead, last finite value (NaN: none yet), for NaN fill
        self._hi = np.full(leads, -np.inf)            # running extremes, for saturation
        self._lo = np.full(leads, np.inf)
        self._tail = np.zeros((leads, 0), np.float32)  # last flat_s seconds, for flat line

    def check(self, chunk: EcgChunk) -> CheckResult:
        issues: list[Issue] = []

        def result(decision: Decision, out: EcgChunk | None, flat_mask: np.ndarray | None = None) -> CheckResult:
            return CheckResult(decision, tuple(issues), out, chunk, flat_mask)

        x = np.asarray(chunk.samples)
        problem = self._shape_problem(chunk, x)
        if problem:
            issues.append(Issue(BAD_SHAPE, problem))
            return result(Decision.DROP, None)
        x = x.astype(np.float32, copy=False)
        fs, n, leads = float(chunk.fs), x.shape[1], x.shape[0]
        tol = max(self.gap_tolerance_s, 1.0 / fs)
        end = self._expected_end
        # A redelivered chunk (MQTT QoS 1, a BLE retry): same seq, same time, same samples.
        # Matched before the time tests, which cannot tell a chunk shorter than `tol` from new data.
        seen = self._seen.get(chunk.seq)
        if seen is not None and abs(seen[0] - chunk.t0) <= min(tol, 0.5 * n / fs) and seen[1] == _crc(x):
            issues.append(Issue(DUPLICATE, f"seq {chunk.seq} at t0 {chunk.t0:.3f} s again", 1))
            return result(Decision.DROP, None)
        if end is not None and chunk.t0 < end - tol and chunk.t0 + n / fs <= end + tol:  # nothing new in it
            # Late, or the device restarted its clock: drop, unless it has gone on for
            # resync_s of ECG, which no reordering does; then start afresh from here.
            self._backward_s += n / fs
            if self._backward_s < self.resync_s:
                code = OUT_OF_ORDER if self._last_seq is not None and chunk.seq < self._last_seq else OVERLAP
                issues.append(Issue(code, f"seq {chunk.seq} (last {self._last_seq}) at t0 {chunk.t0:.3f} s, before {end:.3f} s", 1))
                return result(Decision.DROP, None)
            issues.append(Issue(TIME_RESET, f"time went back {end - chunk.t0:.3f} s for {self._backward_s:.2f} s of ECG: resynchronised"))
            self._last_seq = self._expected_end = end = None
            self._seen.clear()
            self._tail = np.zeros((leads, 0), np.float32)
        self._backward_s = 0.0

        # sequence
        if self._last_seq is not None:
            if chunk.seq <= self._last_seq:
                issues.append(Issue(SEQ_RESET, f"seq went back from {self._last_seq} to {chunk.seq} while time moved on"))
                self._seen.clear()
            elif chunk.seq > self._last_seq + 1:
                lost = chunk.seq - self._last_seq - 1
                issues.append(Issue(SEQ_GAP, f"{lost} chunk(s) missing before seq {chunk.seq}", lost))

        # stream format
        if self._fs is not None and not math.isclose(fs, self._fs, rel_tol=1e-6):
            issues.append(Issue(FS_CHANGE, f"fs changed from {self._fs:g} to {fs:g} Hz"))
            self._tail = np.zeros((leads, 0), np.float32)
        if self._leads is not None and leads != self._leads:
            issues.append(Issue(LEADS_CHANGE, f"leads changed from {self._leads} to {leads}", leads))
            self._reset_signal_state(leads)
        elif self._leads is None:
            self._reset_signal_state(leads)

        # timing
        repaired = False
        t0 = float(chunk.t0)
        if end is not None:
            delta = t0 - end
            if delta > tol:
                issues.append(Issue(GAP, f"{delta:.3f} s missing before t0 {t0:.3f} s", int(round(delta * fs))))
                self._tail = np.zeros((leads, 0), np.float32)
            elif delta < -tol:
                k = int(round(-delta * fs))
                issues.append(Issue(OVERLAP, f"{k} sample(s) overlap the previous chunk", k))
                if k >= n:
                    return result(Decision.DROP, None)
                x, t0, n, repaired = x[:, k:], t0 + k / fs, n - k, True

        # samples
        bad = ~np.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            issues.append(Issue(NON_FINITE, f"{n_bad} NaN/inf sample(s) replaced", n_bad))
            x = self._fill(x, bad)
            repaired = True
        else:
            self._last_value = x[:, -1].astype(np.float64)
        clipped = self._saturated(x, fs)
        if clipped:
            issues.append(Issue(SATURATION, f"{clipped} sample(s) at a rail", clipped))
        flat_mask = self._flat_mask(x, fs)
        flat = [int(i) for i in np.flatnonzero(flat_mask[:, -1])]
        if flat:
            issues.append(Issue(FLAT_LINE, f"lead(s) {flat} flat for {self.flat_s:g} s (lead off?)", len(flat)))

        # commit state
        self._last_seq = chunk.seq
        self._seen[chunk.seq] = (float(chunk.t0), _crc(np.asarray(chunk.samples, np.float32)))  # as received
        if len(self._seen) > self._seen_window:
            self._seen.popitem(last=False)
        self._fs, self._leads = fs, leads
        self._expected_end = t0 + n / fs
        if repaired:
            out = dataclasses.replace(chunk, samples=np.ascontiguousarray(x), t0=t0)
            return result(Decision.REPAIRED, out, flat_mask)
        return result(Decision.ACCEPT, chunk, flat_mask)

    def _shape_problem(self, chunk: EcgChunk, x: np.ndarray) -> str | None:
        if x.ndim != 2:
            return f"samples have {x.ndim} dimension(s); want (leads, n)"
        if not 1 <= x.shape[0] <= self.max_leads:
            return f"{x.shape[0]} leads; want 1..{self.max_leads}"
        if x.shape[1] == 0:
            return "no samples"
        if not np.issubdtype(x.dtype, np.number):
            return f"samples of dtype {x.dtype}"
        if not (math.isfinite(chunk.fs) and chunk.fs > 0):
            return f"fs {chunk.fs!r} is not a positive number"
        if not MIN_FS <= chunk.fs <= MAX_FS:
            return f"fs {chunk.fs:g} Hz outside {MIN_FS:g}..{MAX_FS:g} Hz"
        if not math.isfinite(chunk.t0):
            return f"t0 {chunk.t0!r} is not finite"
        return None

    def _fill(self, x: np.ndarray, bad: np.ndarray) -> np.ndarray:
        held = self._carry_forward(x, bad)
        self._last_value = held[:, -1].astype(np.float64)  # NaN while a lead has had no finite value
        if self.nan_fill == "zero":
            return np.where(bad, np.float32(0), x)
        lead_in = ~np.isfinite(held)  # before a lead's first finite value: nothing to carry
        if lead_in.any():
            first = np.argmax(~lead_in, axis=1)
            some = (~lead_in).any(axis=1)
            start = np.where(some, held[np.arange(held.shape[0]), first], np.float32(0))
            held = np.where(lead_in, start[:, None].astype(np.float32), held)
        return held

    def _carry_forward(self, x: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """Each non-finite sample replaced by its lead's last finite value, starting from
        the previous chunk's last (NaN where there is none yet)."""
        n = x.shape[1]
        ext = np.concatenate([self._last_value[:, None].astype(np.float32), x], axis=1)
        ok = np.concatenate([np.ones((x.shape[0], 1), bool), ~bad], axis=1)
        idx = np.where(ok, np.arange(n + 1), 0)
        np.maximum.accumulate(idx, axis=1, out=idx)
        return np.take_along_axis(ext, idx, axis=1)[:, 1:]

    def _saturated(self, x: np.ndarray, fs: float) -> int:
        if self.rails_mv is not None:
            lo, hi = self.rails_mv
            return int(((x <= lo) | (x >= hi)).sum())
        self._hi = np.maximum(self._hi, x.max(axis=1))
        self._lo = np.minimum(self._lo, x.min(axis=1))
        min_run = max(3, int(math.ceil(self.saturation_run_s * fs)))
        at_rail = (x == self._hi[:, None].astype(x.dtype)) | (x == self._lo[:, None].astype(x.dtype))
        at_rail &= (self._hi > self._lo)[:, None]  # a lead that never varied is flat, not clipped
        return _long_runs(at_rail, min_run)

    def _flat_mask(self, x: np.ndarray, fs: float) -> np.ndarray:
        """(leads, n): True where the `flat_s` seconds ending at that sample are flat."""
        need = max(1, int(round(self.flat_s * fs)))
        joined = np.concatenate([self._tail, x], axis=1)
        self._tail = joined[:, -need:].copy()  # a copy: a view would keep a long chunk alive
        old = joined.shape[1] - x.shape[1]
        mask = np.zeros(x.shape, bool)
        if joined.shape[1] < need:
            return mask
        # running sums of windows of `need`, centred first so a DC offset cannot cancel the variance away
        d = joined.astype(np.float64)
        d -= d.mean(axis=1, keepdims=True)
        c1 = np.zeros((d.shape[0], d.shape[1] + 1))
        c2 = np.zeros_like(c1)
        np.cumsum(d, axis=1, out=c1[:, 1:])
        np.cumsum(d * d, axis=1, out=c2[:, 1:])
        ends = np.arange(max(need, old + 1), joined.shape[1] + 1)  # one past each window's last sample
        s1 = (c1[:, ends] - c1[:, ends - need]) / need
        var = (c2[:, ends] - c2[:, ends - need]) / need - s1 * s1
        mask[:, ends - 1 - old] = var < self.flat_std_mv ** 2
        return mask


def _crc(x: np.ndarray) -> int:
    """Fingerprint of a chunk's samples: a re-delivered chunk has the very same bytes."""
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8))


def _long_runs(mask: np.ndarray, min_run: int) -> int:
    """Number of True samples lying in runs of at least `min_run` consecutive Trues, each
    row of a (leads, n) mask on its own."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int8)  # a 0 between rows
    padded[:, :-1] = mask
    edges = np.flatnonzero(np.diff(np.concatenate([[0], padded.ravel()])))
    lengths = edges[1::2] - edges[::2]
    return int(lengths[lengths >= min_run].sum())
