"""Streaming removal of pacemaker spikes and their afterpotentials from ECG.

A pacing spike reaches the samples as one or two values far from their neighbours,
followed by the afterpotential, an opposite-polarity exponential that carries back the
pulse's charge (`core/simulate/pacing.py`). A QRS detector's band-pass hardly sees the
spike, but a large one still makes an MWI peak of its own (an atrial spike 150 ms before
each QRS then counts as a beat) and pulls the R refinement, which seeks the raw sample
farthest from the baseline, onto the ventricular spike 70–90 ms before R. The
generator's ECG window would carry it too, and the resampling filter rings on it.
Removing the spike alone is worse than leaving it: the afterpotential without the spike
that balanced it is a slow wave right in the QRS band.

A run of 1..k samples (k: the widest spike, 2 ms worth and at least 2 samples, one more
from 1 kHz on for a 2 ms pulse straddling the grid) starting
at `lo` is a spike when, against the straight line from the sample before it to the
first sample after it,
  - its largest deviation h is at least `min_mv`, and every sample of the run deviates by
    at least 30 % of h (the run is the excursion, no more), but for a first sample before
    the peak that deviates the same way (a pulse that began late in its period);
  - it is abrupt: one step into or out of its peak is at least 85 % of h, and one on the
    other side at least 45 % (a pulse straddling two sample periods splits one edge); a
    wave's flanks take several samples at the rates the remover runs at. From 1 kHz on,
    where a pulse spans several samples and both its edges may split, an edge may take
    two steps (a QRS flank there spans ten or more);
  - no other step between consecutive samples within m = k + 1 after it, or within 30 ms
    before it, exceeds 25 % of h: the excursion is isolated (heavy muscle noise has
    outliers of a few tenths of a millivolt, but not 30 ms of calm before them).
The pulse may end inside the sample after the run, the afterpotential starting in the one
after that ("mixed"); of the two readings the one whose afterpotential predicts the next
two samples better is taken, and neither when that prediction misses by more than |t1|
(or 25 % of h): nothing spike-like goes on after a noise outlier. The afterpotential:
with the excursion's area A (its deviations from the sample before it, summed) and the
first sample after it deviating by t1 of opposite sign, the exponential tail t1·ρ^j whose
sum is −A has ρ = 1 + t1/A; it is subtracted from that sample on, in this chunk and the
next ones, until it falls under 1 µV, however many overlap. A t1 of the spike's sign, or
a time constant beyond 150 ms, leaves the tail alone. The excursion then becomes the line.

Validated from 250 Hz to 4 kHz with pulses of 0.5–2 ms at every phase against the
sample grid (`tests/test_pace_spikes.py`).

Samples come out k + m + 1 samples late (6 at 250–999 Hz: 24 ms at 250 Hz; 8 ms at
1 kHz), the last a later run can still change; below `MIN_FS` the remover passes samples
through at once: sampling averages a 0.5 ms pulse over a period 8 or more times longer,
and a narrow QRS is itself only a few samples wide there. A non-finite sample near a run
leaves it alone. The decisions read cleaned samples to the left and raw to the right, in
stream order, so the output does not depend on how the stream is chunked. The kernels are
written once in plain Python (the reference, `backend="python"`; its small helpers are
the jitted ones when Numba is present) and jitted unchanged by Numba.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # numba is a dependency; this keeps the reference usable without it
    numba = None

MIN_FS = 250.0        # Hz: below it the blanker is off (see the module docstring)
SPIKE_S = 0.002       # widest spike, seconds
RUN_SHARE = 0.3       # a sample farther than this share of |d| from the median is part of the run
ISOLATION_SHARE = 0.25
JUMP_SHARE = 0.85     # a spike's steeper edge: one step of nearly its height (two from SPLIT_EDGE_FS on)
SPLIT_EDGE_FS = 1000.0  # Hz: from here a wave's flank spans many samples, so an edge may take two steps
SPLIT_SHARE = 0.45    # its other edge, split over two samples at worst
CONTEXT = 1           # samples either side of a run whose steps must stay small
LEFT_QUIET_S = 0.03   # and before it, this long: heavy EMG noise has outliers but not 30 ms of calm
TAIL_END_MV = 1e-3    # an afterpotential is followed until it is this small
MAX_TAIL_S = 0.15     # longest afterpotential time constant believed


def _subtract_tail(a, lead, start, v, r):
    """Subtract the afterpotential v·r^j from a[lead, start + j] to a's end or until it
    fades; returns the value due after a's end (0 once faded)."""
    for j in range(start, a.shape[1]):
        a[lead, j] -= v
        v *= r
        if abs(v) < TAIL_END_MV:
            return 0.0
    return v


def apply_tails(a, start, tail, rho):
    """Subtract the pending afterpotentials (`tail`, `rho`: leads × slots, the value due at
    a[:, start] and its decay per sample) from a[:, start:], stepping them on; `tail` is
    left holding the values due after a's end (0 once one has faded)."""
    for lead in range(a.shape[0]):
        for slot in range(tail.shape[1]):
            if tail[lead, slot] != 0.0:
                tail[lead, slot] = _subtract_tail(a, lead, start, tail[lead, slot], rho[lead, slot])


def _excursion(a, lead, lo, length, mix, m, ml, min_mv, split):
    """Height of the run a[lead, lo : lo + length] over the line from the sample before it
    to the one `mix` samples after it (mix = 1: the sample between them holds both the
    pulse's end and the afterpotential's start), or 0 when the run is not an isolated,
    tight excursion of at least `min_mv`."""
    hi = lo + length - 1
    e = hi + 1 + mix
    left = a[lead, lo - 1]
    step = (a[lead, e] - left) / (e - lo + 1)
    h = 0.0
    peak = lo
    for j in range(lo, hi + 1):
        dev = abs(a[lead, j] - (left + step * (j - lo + 1)))
        if dev > h:
            h = dev
            peak = j
    if h < min_mv:
        return 0.0
    sign = a[lead, peak] - (left + step * (peak - lo + 1))
    # abrupt: one step to or from the peak is nearly its whole height, and one on the other
    # side at least half of it (a pulse straddling two sample periods splits one edge);
    # a wave's flanks take several samples at the rates the blanker runs at
    up = 0.0
    for j in range(lo - 1, peak):
        up = max(up, abs(a[lead, j + 1] - a[lead, j]))
        if split and j + 2 <= peak:  # an edge split over two steps, at a rate where waves take many
            up = max(up, abs(a[lead, j + 2] - a[lead, j]))
    down = 0.0
    for j in range(peak, e):
        down = max(down, abs(a[lead, j + 1] - a[lead, j]))
        if split and j + 2 <= e:
            down = max(down, abs(a[lead, j + 2] - a[lead, j]))
    if max(up, down) < JUMP_SHARE * h or min(up, down) < SPLIT_SHARE * h:
        return 0.0
    for j in range(lo, hi + 1):  # every sample of the run is part of the excursion,
        dev = a[lead, j] - (left + step * (j - lo + 1))
        # or its first holds the start of a pulse that began late in that sample's period
        if abs(dev) < RUN_SHARE * h and not (j == lo and j < peak and dev * sign > 0.0):
            return 0.0
    for j in range(lo - ml, e + m - 1):  # no other step near it comes close to its size
        if (j < lo - 1 or j >= e) and abs(a[lead, j + 1] - a[lead, j]) > ISOLATION_SHARE * h:
            return 0.0
    return h


def _tail_ratio(a, lead, lo, e, max_rho):
    """Decay per sample of the afterpotential starting at a[lead, e] that carries back the
    charge of a[lead, lo:e]; 0 when a[lead, e] does not oppose it or would decay too slowly."""
    left = a[lead, lo - 1]
    area = 0.0
    for j in range(lo, e):
        area += a[lead, j] - left
    if area == 0.0:
        return 0.0
    r = 1.0 + (a[lead, e] - left) / area
    return r if 0.0 < r <= max_rho else 0.0


def blank_window(a, first, last, k, m, ml, min_mv, max_rho, tail, rho, split):
    """Try a run starting at each sample first..last (inclusive) of `a` (leads × n,
    float64, edited in place), in order; returns how many spikes were removed. A spike's
    afterpotential is subtracted to a's end and carried on in `tail`, `rho` (leads × slots,
    with a free slot after each lead's last for every run start tried). Needs first − ml ≥ 0
    and last + k + m + 1 < n."""
    leads = a.shape[0]
    n = a.shape[1]
    steep_mv = JUMP_SHARE * min_mv * (0.5 if split else 1.0)  # a split edge's larger half
    count = 0
    for lead in range(leads):
        # A spike's steeper edge is one step of at least JUMP_SHARE·min_mv between the
        # sample before the run and the one after it (steps lo − 1 .. lo + k): runs with
        # no such step are skipped exactly, scanning each step once.
        steep = first - 2  # the next steep step at or after lo − 1 (step j: a[j] → a[j + 1])
        lo = first
        while lo <= last:
            if steep < lo - 1:
                j = lo - 1
                while j < n - 1 and not abs(a[lead, j + 1] - a[lead, j]) >= steep_mv:
                    j += 1
                steep = j
            if steep > lo + k:
                lo = steep - k  # the first run start whose steps reach it
                continue
            finite = True
            for j in range(lo - ml, lo + k + m + 2):
                if not math.isfinite(a[lead, j]):
                    finite = False
                    break
            if not finite:
                lo += 1
                continue
            found = -1
            mix = 0
            r = 0.0
            for length in range(1, k + 1):
                # the excursion, then the afterpotential from the next sample (mix 0) or
                # from the one after, the pulse ending inside the next (mix 1): the
                # reading whose tail predicts the two samples after it better
                best = -1.0
                for mx in range(2):
                    h = _excursion(a, lead, lo, length, mx, m, ml, min_mv, split)
                    if h == 0.0:
                        continue
                    e = lo + length + mx
                    rr = _tail_ratio(a, lead, lo, e, max_rho)
                    if rr == 0.0 and mx == 1:
                        continue  # a mixed sample only makes sense before an afterpotential
                    left = a[lead, lo - 1]
                    t1 = a[lead, e] - left
                    err = abs(a[lead, e + 1] - left - t1 * rr) + abs(a[lead, e + 2] - left - t1 * rr * rr)
                    if err > max(abs(t1), ISOLATION_SHARE * h):
                        continue  # neither a tail nor the baseline goes on after it: not a spike
                    if best < 0.0 or err < best:
                        best = err
                        found = length
                        mix = mx
                        r = rr
                if found > 0:
                    break
            if found < 0:
                lo += 1
                continue
            e = lo + found + mix          # first sample after the excursion
            left = a[lead, lo - 1]
            if r > 0.0:                   # cancel the afterpotential from e on
                v = _subtract_tail(a, lead, e, a[lead, e] - left, r)
                if v != 0.0:  # the rest follows later chunks, in the slot after the lead's last
                    slot = 0  # (slots in the order the spikes came: the same sums in any chunking)
                    for q in range(tail.shape[1]):
                        if tail[lead, q] != 0.0:
                            slot = q + 1
                    tail[lead, slot] = v
                    rho[lead, slot] = r
            step = (a[lead, e] - left) / (e - lo + 1)
            for j in range(lo, e):
                a[lead, j] = left + step * (j - lo + 1)
            count += 1
            steep = lo - 2  # the edits changed the steps from lo on: scan again
            lo += 1
    return count


if numba is not None:
    _subtract_tail = numba.njit(cache=True, nogil=True)(_subtract_tail)
    _excursion = numba.njit(cache=True, nogil=True)(_excursion)
    _tail_ratio = numba.njit(cache=True, nogil=True)(_tail_ratio)
_blank_window_numba = numba.njit(cache=True, nogil=True)(blank_window) if numba is not None else None
_apply_tails_numba = numba.njit(cache=True, nogil=True)(apply_tails) if numba is not None else None


def spike_width(fs: float) -> int:
    """k: the widest spike in samples at `fs` (a pulse of SPIKE_S straddling a sample
    boundary, from SPLIT_EDGE_FS on); 0 when the remover is off there."""
    if fs < MIN_FS:
        return 0
    return max(2, int(math.ceil(SPIKE_S * fs)) + (1 if fs >= SPLIT_EDGE_FS else 0))


class SpikeBlanker:
    """Pacing spikes out of a stream of (leads × n) chunks at `fs`, `lag` samples late.

    `push(x)` returns the cleaned samples that became final (the first `lag` samples of
    the stream come out with later pushes); `blanked` counts the spikes removed. Every
    afterpotential is followed until it fades, however many overlap.
    """

    def __init__(self, fs: float, leads: int, min_mv: float = 0.4, backend: str = "numba", enabled: bool = True) -> None:
        self.k = spike_width(fs) if enabled else 0  # 0: samples pass through at once
        self.m = self.k + CONTEXT
        self.ml = max(self.m, int(math.ceil(LEFT_QUIET_S * fs)))  # left context: costs no lag
        self.split_edges = fs >= SPLIT_EDGE_FS
        self.lag = self.k + self.m + 1 if self.k else 0
        self.leads = int(leads)
        self.min_mv = float(min_mv)
        self._max_rho = math.exp(-1.0 / (MAX_TAIL_S * fs)) if self.k else 0.0
        jit = backend == "numba" and _blank_window_numba is not None
        self._blank = _blank_window_numba if jit else blank_window
        self._apply = _apply_tails_numba if jit else apply_tails
        self._buf = np.zeros((self.leads, 0), dtype=np.float64)
        self._emitted = 0      # of the buffer's samples, how many went out already
        self._next = 0         # buffer index of the next run start to try
        self._after = np.zeros((self.leads, 0))      # afterpotentials due at the next pushed sample
        self._after_rho = np.zeros((self.leads, 0))  # their decay per sample
        self.blanked = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed the next samples (leads × n); returns the samples now final, float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != self.leads:
            raise ValueError(f"expected ({self.leads}, n) samples, got {x.shape}")
        if not self.k:
            return np.asarray(x, dtype=np.float32)
        new = np.array(x, dtype=np.float64)  # a copy: the afterpotentials are subtracted in place
        self._apply(new, 0, self._after, self._after_rho)
        a = np.concatenate([self._buf, new], axis=1)
        m = self.m
        first = max(self._next, self.ml)   # the stream's first samples have no left context
        last = a.shape[1] - 2 - self.k - m
        if last >= first:
            room = np.zeros((self.leads, last - first + 1))  # a slot for every run start tried
            after, after_rho = np.concatenate([self._after, room], 1), np.concatenate([self._after_rho, room], 1)
            self.blanked += int(self._blank(a, first, last, self.k, m, self.ml, self.min_mv, self._max_rho, after, after_rho,
                                            self.split_edges))
            live = (after != 0.0).any(axis=0)   # faded slots go; the rest keep their order
            self._after, self._after_rho = after[:, live], after_rho[:, live]
            self._next = last + 1
        # Final: every sample before the next run's start (runs edit only samples from their start on).
        final = self._next
        out = a[:, self._emitted:final].astype(np.float32)
        keep = max(self._next - self.ml, 0)  # the next run's window starts here
        self._buf = a[:, keep:]
        self._emitted = final - keep
        self._next -= keep
        return out

    @property
    def pending(self) -> int:
        """Samples pushed but not yet returned."""
        return self._buf.shape[1] - self._emitted
