"""Streaming beat segmentation: ECG chunks in, beats with their model-rate window out.

A `BeatSegmenter` removes pacing spikes from every lead (`kernels/pace_spikes.py`: they
would pull R onto the stimulus and, resampled, ring through the window), runs the
streaming QRS detector (`kernels/qrs.py`) on one lead and keeps the recent cleaned signal
of every lead in a ring buffer. Samples reach the detector and the ring `spike_lag`
samples late (6 at 250–999 Hz, 8 at 1 kHz, none below 250 Hz). Beat k is emitted when
R_{k+1} is detected, so its RR is known. Its window (what the ECG encoder reads) starts
`config.pre_r_s` before R_k and lasts `config.window_s`, resampled to `config.fs` by a
windowed sinc evaluated on a grid anchored at R (`kernels/resample.py`), cut from the
ring at emission time.

Determinism: the window holds only samples cleaned by the time the sample that confirmed
R_{k+1} arrived (`detected_at`), as if the stream arrived sample by sample; later samples are
zero and `valid` is False there, as for samples lost to a gap or NaN (and for outputs
within the resampling kernel's reach of a NaN, which the zeros in its place would bend, or
of the last sample delivered or the oldest one used, where the kernel would read past
them); it reaches back at most RING_S (plus the kernel's support) from that last sample,
however far the ring has run on by emission time. So the beats, windows included, do
not depend on how the stream was chunked. `cut_window` cuts a window from whatever the
ring holds now, for a caller that wants the longer view.

Switching lead (`switch_lead`, when the detection lead comes off): the ring, the
timeline and the beat chain stay; a new detector on the other lead is run over that
lead's history in the ring (the blanker's output: the samples it still holds reach the
new detector with the next push, as they would have), so its thresholds are learnt and
the beats the history completes come out at the switch, stamped and cut then. An R
within the refractory period of one already found is the same complex seen on the other
lead, not a new beat. The old lead's latest R (in no beat yet) is left for the new lead
to confirm when the history covers it with finite samples: a lead coming off often
leaves a step its detector took for an R (over NaN the new lead could not confirm it,
and the R stays).

Time: sample i of the stream is at `t0 + i / fs`, t0 being the first chunk's; the
segmenter treats chunks as contiguous. A caller that sees a gap or a change of rate
starts a new segmenter (or calls `reset`). A device whose true rate is a little off its
nominal one (a 130 Hz strap running at 130.26 Hz) stamps its chunks by its own clock,
and counting samples would drift from it (3.6 s in half an hour) with no gap ever
showing: when a chunk's t0 and the count part by more than DRIFT_S, the timeline is
re-anchored at that chunk (a piecewise map from sample index to time). Times then stay
within DRIFT_S of the device's clock; RR, counted in samples, is not touched.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..core.config import EcgEncoderConfig
from ..kernels.pace_spikes import SpikeBlanker
from ..kernels.qrs import QrsDetector, QrsParams
from ..kernels.resample import kernel_table, resample, support
from .ring import SampleRing

RING_S = 12.0  # history a window may use, back from its last delivered sample: the longest RR plus a lead-in
PIECE_S = 1.0  # long chunks are taken in pieces; the ring holds one more, run past the confirming sample
N_HR = 8       # RR intervals the current heart rate is a median of
DRIFT_S = 0.02  # re-anchor the timeline when chunk t0 and the sample count part by more (the checker's gap tolerance)
AGREE_S = 0.06  # an R on another lead within this of a known R is the same beat (leads differ by tens of ms)
N_RECENT_R = 16  # R peaks kept to judge which lead to move detection to


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not beats
class Beat:
    """One heartbeat, [R_k, R_{k+1}), with the ECG window the generator conditions on."""

    index: int
    r_time: float
    rr: float
    next_r_time: float
    window: np.ndarray      # (leads, config.window_samples) float32 at config.fs
    valid: np.ndarray       # (config.window_samples,) bool: False where not delivered
    detected_at: float      # stream time at which the beat was emitted

    @property
    def hr(self) -> float:
        """Heart rate of this beat in beats per minute."""
        return 60.0 / self.rr


def _check_lead(lead: int, n_leads: int, what: str) -> None:
    if not 0 <= lead < n_leads:
        raise ValueError(f"{what} {lead} out of range for {n_leads} leads")


class BeatSegmenter:
    """Beats from a stream of (leads × n) float32 chunks in millivolts at rate `fs`
    (`remove_spikes=False`: no pacing-spike remover, samples reach the detector at once)."""

    def __init__(self, fs: float, n_leads: int, config: EcgEncoderConfig | None = None,
                 detect_lead: int = 0, backend: str = "numba", params: QrsParams | None = None,
                 remove_spikes: bool = True) -> None:
        _check_lead(detect_lead, n_leads, "detect_lead")
        self.fs = float(fs)
        self.n_leads = int(n_leads)
        self.config = config or EcgEncoderConfig()
        self.detect_lead = int(detect_lead)
        self._backend = backend
        self._params = params
        self._remove_spikes = remove_spikes
        n = self.config.window_samples
        self._grid = np.arange(n, dtype=np.float64) * (self.fs / self.config.fs) - self.config.pre_r_s * self.fs
        self._support = support(self.fs, self.config.fs)
        self._reach = kernel_table(self.fs, self.config.fs)[1]  # input samples each output reads, either side
        self._piece = max(1, int(PIECE_S * self.fs))
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push starts a new timeline."""
        self._detector = QrsDetector(self.fs, self._params, self._backend)
        self._offset = 0  # ring index of the detector's sample 0 (moved by switch_lead)
        self._blanker = SpikeBlanker(self.fs, self.n_leads, backend=self._backend, enabled=self._remove_spikes)
        self._received = 0
        # A window reads at most `_keep` samples back from its last delivered one (as if the
        # stream came sample by sample); the ring also holds the rest of the piece that
        # confirmed the beat, so what a window sees does not depend on the chunking. The
        # spike blanker's lag needs nothing more: ring and detector both count its output.
        self._keep = int(math.ceil(RING_S * self.fs)) + 2 * self._support
        self._ring = SampleRing(self.n_leads, self._keep + self._piece)
        self._anchors: list[tuple[int, float]] = []  # (absolute sample index, its time), by index
        self._last_r: int | None = None     # the latest R, whose beat waits for the next one
        self._emitted_r: int | None = None  # the R of the latest beat emitted
        self._rr: deque[int] = deque(maxlen=N_HR)
        self._recent_r: deque[int] = deque(maxlen=N_RECENT_R)  # R peaks found, whichever lead found them
        self._count = 0

    # ---------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """Samples received since the start (or the last reset)."""
        return self._received

    @property
    def spike_lag(self) -> int:
        """Samples the spike blanker holds back before the detector and the ring see them."""
        return self._blanker.lag

    @property
    def spikes_removed(self) -> int:
        """Pacing spikes (or other one- or two-sample impulses) removed since the start."""
        return self._blanker.blanked

    @property
    def expected_t0(self) -> float | None:
        """t0 a contiguous next chunk would carry; None before the first push."""
        return self.time_of(self._received) if self._anchors else None

    @property
    def heart_rate(self) -> float | None:
        """Median heart rate (bpm) of the last few RR intervals; None before two R peaks."""
        if not self._rr:
            return None
        return 60.0 * self.fs / float(np.median(np.fromiter(self._rr, dtype=np.float64)))

    @property
    def last_r_time(self) -> float | None:
        """Time of the latest R peak found (its beat is emitted with the next R)."""
        return None if self._last_r is None else self.time_of(self._last_r)

    def time_of(self, index: float) -> float:
        """Stream time of a (fractional) absolute sample index."""
        if not self._anchors:
            raise RuntimeError("no samples pushed yet")
        start, t = next((a for a in reversed(self._anchors) if a[0] <= index), self._anchors[0])
        return t + (index - start) / self.fs

    def index_of(self, time: float) -> float:
        """The (fractional) absolute sample index at stream time `time`."""
        if not self._anchors:
            raise RuntimeError("no samples pushed yet")
        start, t = next((a for a in reversed(self._anchors) if a[1] <= time), self._anchors[0])
        return start + (time - t) * self.fs

    # ---------------------------------------------------------------------------
    def push(self, samples: np.ndarray, t0: float) -> list[Beat]:
        """Feed a chunk (leads × n); returns the beats it completes, oldest first."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 2 or samples.shape[0] != self.n_leads:
            raise ValueError(f"expected ({self.n_leads}, n) samples, got {samples.shape}")
        self._anchor(float(t0))
        beats: list[Beat] = []
        piece = self._piece
        for i in range(0, samples.shape[1], piece):
            part = self._blanker.push(samples[:, i:i + piece])
            self._received += min(piece, samples.shape[1] - i)
            self._ring.append(part)
            beats += self._detect(part[self.detect_lead])
        return beats

    def switch_lead(self, lead: int) -> list[Beat]:
        """Detect on `lead` from now on, keeping the ring, the timeline and the beat chain.

        A new detector is warmed on the lead's history in the ring, so its thresholds are
        learnt before the next sample arrives; returns the beats that history completes
        (those after the last R already found: the old lead's R is not found again)."""
        _check_lead(lead, self.n_leads, "detect_lead")
        if lead == self.detect_lead:
            return []
        self.detect_lead = int(lead)
        self._detector = QrsDetector(self.fs, self._params, self._backend)
        start, end = self._ring.start, self._ring.end
        self._offset = start  # the new detector's sample 0 is the ring's oldest
        if end == start:
            return []
        history = self._ring.read(start, end)[self.detect_lead]
        if self._last_r is not None and self._can_judge(history, self._last_r - start):
            # The old lead's latest R is in no beat yet and the history covers it: the new
            # lead says what it was (a lead coming off often leaves a step that looked
            # like an R), and the beats that follow are timed on one lead.
            self._last_r = None
        # emitted now: their windows may hold what the ring holds now, as a live beat's would
        return self._detect(history, emitted_at=end - 1)

    def lead_agreement(self, lead: int) -> int:
        """How well a fresh detector on `lead` re-finds the recent R peaks in the ring's
        history: those it finds again, less the peaks it finds among them that are none of
        them. Where to move detection when its lead comes off: a lead can be live and show
        no usable QRS (noise alone gives a detector peaks everywhere, some near the beats)."""
        _check_lead(lead, self.n_leads, "lead")
        start, end = self._ring.start, self._ring.end
        known = np.array([r for r in self._recent_r if r >= start], dtype=np.int64)
        if end == start or not known.size:
            return 0
        found = QrsDetector(self.fs, self._params, self._backend).push(self._ring.read(start, end)[lead]) + start
        if not found.size:
            return 0
        tol = max(1, int(round(AGREE_S * self.fs)))
        near = np.abs(known[:, None] - found[None, :]) <= tol
        among = (found >= known[0] - tol) & (found <= known[-1] + tol)
        return int(near.any(axis=1).sum()) - int((among & ~near.any(axis=0)).sum())

    def cut_window(self, r_time: float) -> tuple[np.ndarray, np.ndarray]:
        """The window around an R peak at `r_time` from what the ring holds now:
        (leads × window_samples float32, valid bool)."""
        return self._window(self.index_of(r_time), self._ring.end)

    # ---------------------------------------------------------------------------
    def _anchor(self, t0: float) -> None:
        start = self._received
        if self._anchors and abs(t0 - self.time_of(start)) <= DRIFT_S:
            return
        self._anchors.append((start, t0))
        # anchors before the ring's oldest sample map nothing any beat still needs
        oldest = min(self._ring.start, self._last_r if self._last_r is not None else start)
        while len(self._anchors) > 1 and self._anchors[1][0] <= oldest:
            self._anchors.pop(0)

    def _can_judge(self, history: np.ndarray, at: int) -> bool:
        """Whether the new lead's history can say what the old lead's R at `at` was: it holds
        a refractory period either side of it (as far as it goes), all finite. Over NaN the
        new detector finds nothing, and dropping the R would lose the beat it begins."""
        refr = self._detector.refractory
        return at >= refr and bool(np.isfinite(history[at - refr:at + refr]).all())

    def _detect(self, x: np.ndarray, emitted_at: int = -1) -> list[Beat]:
        """Feed the detector one lead's next cleaned samples; the beats its R peaks complete.
        `emitted_at`: the ring index the beats are emitted at, when later than confirmed."""
        r_peaks = self._detector.push(x) + self._offset
        confirmed = self._detector.last_detected_at + self._offset
        beats = []
        for r, det in zip(r_peaks.tolist(), confirmed.tolist()):
            known = self._last_r if self._last_r is not None else self._emitted_r
            if known is not None and r - known < self._detector.refractory:
                continue  # a complex already found, on the lead detection left, seen again on this one
            if self._last_r is not None:
                beats.append(self._beat(self._last_r, r, max(det, emitted_at)))
                self._rr.append(r - self._last_r)
                self._emitted_r = self._last_r
            self._last_r = r
            self._recent_r.append(r)
        return beats

    def _beat(self, r: int, r_next: int, det: int) -> Beat:
        window, valid = self._window(float(r), det + 1)
        # detected when the input sample that let the spike remover release `det` arrived
        beat = Beat(index=self._count, r_time=self.time_of(r), rr=(r_next - r) / self.fs,
                    next_r_time=self.time_of(r_next), window=window, valid=valid,
                    detected_at=self.time_of(det + self._blanker.lag))
        self._count += 1
        return beat

    def _window(self, r: float, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """Resample samples [upto - keep, upto) onto the window grid of an R at index r."""
        pos = r + self._grid
        n_out = pos.shape[0]
        lo = max(self._ring.start, upto - self._keep, int(math.floor(pos[0])) - self._support)
        hi = min(upto, self._ring.end, int(math.ceil(pos[-1])) + self._support + 1)
        window = np.zeros((self.n_leads, n_out), dtype=np.float32)
        valid = np.zeros(n_out, dtype=bool)
        if hi <= lo:
            return window, valid
        seg = self._ring.read(lo, hi)
        finite = np.isfinite(seg).all(axis=0)
        seg = np.where(finite, seg, np.float32(0.0))
        nearest = np.rint(pos).astype(np.int64)
        inside = (nearest >= lo) & (nearest < hi)
        valid[inside] = finite[nearest[inside] - lo]
        if not finite.all():  # the zeros put in a gap's place reach every output within the kernel's reach
            bad = np.flatnonzero(~finite).astype(np.float64)
            rel = pos - lo
            at = np.searchsorted(bad, rel)
            gap = np.minimum(np.abs(rel - bad[np.maximum(at - 1, 0)]), np.abs(rel - bad[np.minimum(at, len(bad) - 1)]))
            valid &= gap >= self._reach
        # nor may the samples not held (before lo, from hi on: not delivered yet, or let go),
        # which the resampler would stand in for by repeating the edge sample
        valid &= (pos - (lo - 1) >= self._reach) & (hi - pos >= self._reach)
        if valid.any():
            out = resample(seg, pos - lo, self.fs, self.config.fs, backend=self._backend)
            window[:, valid] = out[:, valid]
        return window, valid
