"""Streaming QRS detection (Pan–Tompkins family), fed chunk by chunk.

Per sample: band-pass (2 biquads, state carried across chunks) → squared first
difference → moving-window integration (MWI) → MWI peaks, each merged with any larger
one in the next `lookahead` → adaptive signal/noise thresholds, a refractory period,
a T-wave slope test, search-back for a missed beat after 1.66 mean RR, and a slow
threshold decay when no beat is found for a while. An RR longer than the search-back
span enters the mean only when the next RR is long too (a slower rhythm); alone, it is
beats missed in an outage, and averaging it in would slow search-back afterwards. Each MWI peak is mapped back to R:
the largest |band-passed| sample under the MWI window, shifted by the filter's group
delay, then the raw sample nearby that stands farthest from the local baseline.

All state lives in two arrays (`f` float64, `s` int64; layouts below, owned by
`QrsDetector`), so one chunk is one call of `detect_chunk`, and the hot per-sample state
sits in locals during the call. Every decision depends only on samples already seen, in order, so the
beats found do not depend on how the stream is chunked. `detect_chunk` is written once
in plain Python (the reference, `backend="python"`) and jitted unchanged by Numba
(`backend="numba"`, the default).

Never inventing beats: a peak counts only if its band-passed amplitude reaches
`min_amplitude_mv` (input is in millivolts). Leading NaN/inf is skipped: the filters
start at steady state for the first finite sample and learning starts there, so a DC
offset is no step. A flat line, NaN held over, or electrode
noise up to ~40 µV RMS makes no beats. Louder pure noise does (as it does for every
Pan–Tompkins-style detector): its peaks look like QRS complexes one at a time, and a
per-beat SNR gate tried here could not separate them from noisy ECG at high heart rates
without losing real beats, so signal quality is left to the engine's own checks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .filters import qrs_bandpass
from .pace_spikes import SpikeBlanker

log = logging.getLogger(__name__)

try:
    import numba
except ImportError:  # numba is a dependency; this keeps the reference usable without it
    numba = None

# ---------------------------------------------------------------------------------
# state layout: int64 array `s`
S_H = 0          # history length (samples) for R refinement
S_W = 1          # MWI window
S_L = 2          # MWI peak lookahead
S_REFR = 3       # refractory period
S_DELAY = 4      # band-pass group delay (rounded)
S_RAWREF = 5     # raw-signal refinement half-width
S_LEARN = 6      # learning period (thresholds start after it)
S_TWAVE = 7      # a peak this soon after a beat is tested for being a T wave
S_K = 8          # capacity of the pending and search-back lists
S_DECAY = 9      # shortest wait without a beat before the threshold decays
S_N = 10         # samples processed so far (absolute index of the next sample)
S_HPOS = 11      # history write position
S_MPOS = 12      # MWI ring write position
S_CANDI = 13     # index of the current MWI peak candidate, -1 when none
S_LEARNING = 14  # 1 until the learning period has passed
S_LASTR = 15     # last beat's R index, -1 before the first
S_NRR = 16       # RR intervals stored (<= 8)
S_RRPOS = 17
S_NPEND = 18     # MWI peaks waiting for classification
S_NNOISE = 19    # search-back candidates since the last beat
S_SBDIRTY = 20   # search-back list changed since the last unsuccessful scan
S_LASTEVT = 21   # last beat or decay (for the decay timer)
S_WAKE = 22      # next sample at which a timer is due (learning end, search-back, decay)
S_DECAYLEN = 23  # current wait before a decay: decay_rr mean RRs, at least S_DECAY
S_RR = 24        # 8 RR intervals
S_START = 32     # index of the first finite sample: filters and learning start there (-1 before)
S_HDR = 33       # then: pending R (K), noise R (K)

# state layout: float64 array `f`
F_SOS = 0        # 2 sections x (b0 b1 b2 a0 a1 a2)
F_ZIU = 12       # steady-state section state for a unit input
F_Z = 16         # section state
F_MINAMP = 20
F_SPK = 21       # running signal-peak level
F_NPK = 22       # running noise-peak level
F_MWISUM = 23
F_MPREV = 24     # previous MWI value
F_CANDV = 25
F_LASTX = 26     # last finite input (held over NaN/inf); NaN before the first
F_LASTBP = 27
F_LEARNMAX = 28
F_LEARNSUM = 29
F_LASTSLOPE = 30
F_SBFACTOR = 31  # search back after this many mean RRs
F_RRAVG = 32     # mean of the stored RR intervals (samples); a default before any
F_DECAYRR = 33   # decay after this many mean RRs without a beat
F_HELDRR = 34    # an RR longer than the search-back span, held until the next RR says what it was (0: none)
F_HDR = 40       # then: raw history (H), band-passed history (H), MWI ring (W),
#                  pending value/slope/amplitude (3K), noise value/slope (2K)

N_RR = 8


def detect_chunk(x, f, s, out):
    """Feed the samples `x` (1-D) through the detector whose state is `f`, `s`.

    Writes each beat found as (R index, index of the sample that confirmed it) into
    `out[:, k]` and returns how many; `out` needs `capacity_for(len(x))` columns.
    Indices are absolute sample counts since the detector started.
    """
    H = s[S_H]
    W = s[S_W]
    L = s[S_L]
    K = s[S_K]
    refr = s[S_REFR]
    twave = s[S_TWAVE]
    o_raw = F_HDR
    o_bp = o_raw + H
    o_mr = o_bp + H
    o_pv = o_mr + W
    o_ps = o_pv + K
    o_pa = o_ps + K
    o_nv = o_pa + K
    o_ns = o_nv + K
    o_pr = S_HDR
    o_nr = o_pr + K
    b00 = f[F_SOS + 0]
    b01 = f[F_SOS + 1]
    b02 = f[F_SOS + 2]
    a01 = f[F_SOS + 4]
    a02 = f[F_SOS + 5]
    b10 = f[F_SOS + 6]
    b11 = f[F_SOS + 7]
    b12 = f[F_SOS + 8]
    a11 = f[F_SOS + 10]
    a12 = f[F_SOS + 11]
    z0 = f[F_Z + 0]
    z1 = f[F_Z + 1]
    z2 = f[F_Z + 2]
    z3 = f[F_Z + 3]
    # hot state lives in locals for the whole call (arrays would be re-read per sample)
    n = s[S_N]
    hpos = s[S_HPOS]
    mpos = s[S_MPOS]
    candi = s[S_CANDI]
    learning = s[S_LEARNING]
    wake = s[S_WAKE]
    msum = f[F_MWISUM]
    mprev = f[F_MPREV]
    candv = f[F_CANDV]
    lastx = f[F_LASTX]
    lastbp = f[F_LASTBP]
    learnmax = f[F_LEARNMAX]
    learnsum = f[F_LEARNSUM]
    inv_w = 1.0 / W
    n_out = 0
    for i in range(x.shape[0]):
        v = float(x[i])
        if v - v != 0.0:  # NaN or inf: hold the last finite value (no step, no beat)
            v = lastx
            if v - v != 0.0:  # none yet: nothing to filter or learn from (a 0 held would step to the offset)
                hpos += 1
                if hpos == H:
                    hpos = 0
                n += 1
                continue
        elif lastx - lastx != 0.0:
            # the first finite sample: the filters start at steady state for it (no DC
            # step), the history before it holds it, and learning starts here
            z0 = f[F_ZIU + 0] * v
            z1 = f[F_ZIU + 1] * v
            z2 = f[F_ZIU + 2] * v
            z3 = f[F_ZIU + 3] * v
            for j in range(H):
                f[o_raw + j] = v
            s[S_START] = n
            wake = n + s[S_LEARN] - 1
        lastx = v
        # band-pass: two transposed direct-form II biquads
        # (input terms first: they do not wait for y, which keeps the recurrence short)
        y = b00 * v + z0
        z0 = (b01 * v + z1) - a01 * y
        z1 = b02 * v - a02 * y
        bp = b10 * y + z2
        z2 = (b11 * y + z3) - a11 * bp
        z3 = b12 * y - a12 * bp
        f[o_raw + hpos] = v
        f[o_bp + hpos] = bp
        hpos += 1
        if hpos == H:
            hpos = 0
        d = bp - lastbp
        lastbp = bp
        e = d * d
        # moving-window integration; re-summed once per lap so rounding cannot drift
        msum += e - f[o_mr + mpos]
        f[o_mr + mpos] = e
        mpos += 1
        if mpos == W:
            mpos = 0
            msum = 0.0
            for j in range(W):
                msum += f[o_mr + j]
        m = msum * inv_w
        if learning == 1:
            if m > learnmax:
                learnmax = m
            learnsum += m

        # MWI peak: a rise, then no larger value for L samples
        p = -1
        pv = 0.0
        if candi < 0:
            if m > mprev:
                candi = n
                candv = m
        elif m > candv:
            candi = n
            candv = m
        elif n - candi >= L:
            p = candi
            pv = candv
            candi = -1
        mprev = m
        if p < 0 and n < wake:
            n += 1
            continue

        # slow path: a peak to place and classify, or a timer (learning end, search-back,
        # threshold decay) is due
        if p >= 0:
            # map the MWI peak back to R; hp(j) is sample j's history slot
            lo = p - W + 1
            first = n - H + 1
            if lo < first + 1:
                lo = first + 1
            if lo < 1:
                lo = 1
            base = hpos - 1 - n  # slot of sample j = (base + j) mod H
            amp = -1.0
            q = p
            slope = 0.0
            prev = f[o_bp + (base + lo - 1) % H]
            slot = (base + lo) % H  # stepped, not recomputed: a modulo per sample is slow
            for j in range(lo, p + 1):
                cur = f[o_bp + slot]
                slot += 1
                if slot == H:
                    slot = 0
                a = abs(cur)
                if a > amp:
                    amp = a
                    q = j
                ds = abs(cur - prev)
                if ds > slope:
                    slope = ds
                prev = cur
            # R: the raw sample farthest from a local baseline (the mean of two samples
            # either side of the search span), so R or a dominant S, never a lobe of the filter
            c = q - s[S_DELAY]
            rr = s[S_RAWREF]
            lo = first if first > 0 else 0
            e0 = c - 2 * rr
            e1 = c + 2 * rr
            e0 = lo if e0 < lo else e0
            e1 = n if e1 > n else e1
            basel = 0.5 * (f[o_raw + (base + e0) % H] + f[o_raw + (base + e1) % H])
            r0 = c - rr
            r1 = c + rr
            r0 = lo if r0 < lo else r0
            r1 = n if r1 > n else r1
            r = r0
            best = -1.0
            slot = (base + r0) % H
            for j in range(r0, r1 + 1):
                val = abs(f[o_raw + slot] - basel)
                slot += 1
                if slot == H:
                    slot = 0
                if val > best:
                    best = val
                    r = j
            k = s[S_NPEND]
            if k == K:  # only possible while learning on a very busy signal: drop oldest
                for j in range(K - 1):
                    s[o_pr + j] = s[o_pr + j + 1]
                    f[o_pv + j] = f[o_pv + j + 1]
                    f[o_ps + j] = f[o_ps + j + 1]
                    f[o_pa + j] = f[o_pa + j + 1]
                k = K - 1
            s[o_pr + k] = r
            f[o_pv + k] = pv
            f[o_ps + k] = slope
            f[o_pa + k] = amp
            s[S_NPEND] = k + 1

        if learning == 1 and n + 1 >= s[S_START] + s[S_LEARN]:
            learning = 0
            f[F_SPK] = 0.5 * learnmax
            f[F_NPK] = 0.5 * learnsum / (n + 1 - s[S_START])
            s[S_LASTEVT] = n

        if learning == 0:
            if n - s[S_LASTEVT] > s[S_DECAYLEN]:
                # a long time without a beat: the signal level may have dropped
                f[F_SPK] = f[F_NPK] + 0.25 * (f[F_SPK] - f[F_NPK])
                s[S_LASTEVT] = n
                s[S_SBDIRTY] = 1
            # classify pending peaks in order, then search back; one accept block
            while True:
                ar = -1
                aslope = 0.0
                lastr = s[S_LASTR]
                if s[S_NPEND] > 0:
                    r = s[o_pr]
                    pv = f[o_pv]
                    slope = f[o_ps]
                    amp = f[o_pa]
                    k = s[S_NPEND] - 1
                    for j in range(k):
                        s[o_pr + j] = s[o_pr + j + 1]
                        f[o_pv + j] = f[o_pv + j + 1]
                        f[o_ps + j] = f[o_ps + j + 1]
                        f[o_pa + j] = f[o_pa + j + 1]
                    s[S_NPEND] = k
                    if lastr >= 0 and r - lastr < refr:
                        continue  # the same complex again
                    spk = f[F_SPK]
                    npk = f[F_NPK]
                    thr1 = npk + 0.25 * (spk - npk)
                    t_like = lastr >= 0 and r - lastr < twave and slope < 0.5 * f[F_LASTSLOPE]
                    big = amp >= f[F_MINAMP]
                    if big and pv > thr1 and not t_like:
                        f[F_SPK] = 0.125 * pv + 0.875 * spk
                        s[S_NNOISE] = 0  # every search-back candidate is older than this beat
                        ar = r
                        aslope = slope
                    else:
                        f[F_NPK] = 0.125 * pv + 0.875 * npk
                        if big and not t_like:
                            k = s[S_NNOISE]
                            if k < K:
                                s[o_nr + k] = r
                                f[o_nv + k] = pv
                                f[o_ns + k] = slope
                                s[S_NNOISE] = k + 1
                            else:  # full: replace the weakest if this one is stronger
                                jmin = 0
                                for j in range(1, K):
                                    if f[o_nv + j] < f[o_nv + jmin]:
                                        jmin = j
                                if pv > f[o_nv + jmin]:
                                    s[o_nr + jmin] = r
                                    f[o_nv + jmin] = pv
                                    f[o_ns + jmin] = slope
                            s[S_SBDIRTY] = 1
                        continue
                elif s[S_SBDIRTY] == 1 and s[S_NNOISE] > 0 and lastr >= 0:
                    if n - lastr <= f[F_SBFACTOR] * f[F_RRAVG]:
                        break
                    thr2 = 0.5 * (f[F_NPK] + 0.25 * (f[F_SPK] - f[F_NPK]))
                    jbest = -1
                    for j in range(s[S_NNOISE]):
                        if f[o_nv + j] > thr2 and s[o_nr + j] - lastr >= refr:
                            if jbest < 0 or f[o_nv + j] > f[o_nv + jbest]:
                                jbest = j
                    if jbest < 0:
                        s[S_SBDIRTY] = 0
                        break
                    ar = s[o_nr + jbest]
                    aslope = f[o_ns + jbest]
                    f[F_SPK] = 0.25 * f[o_nv + jbest] + 0.75 * f[F_SPK]
                    # later candidates stay for the next search-back
                    k = 0
                    for j in range(s[S_NNOISE]):
                        if s[o_nr + j] > ar:
                            s[o_nr + k] = s[o_nr + j]
                            f[o_nv + k] = f[o_nv + j]
                            f[o_ns + k] = f[o_ns + j]
                            k += 1
                    s[S_NNOISE] = k
                else:
                    break
                # accept a beat at `ar`
                rr_new = ar - lastr
                stored = 0
                if lastr >= 0:
                    # An RR past the search-back span is either beats missed in an outage
                    # (the next RR is normal again) or a slower rhythm (the next is long
                    # too). Held until the next one tells: averaged in, a missed stretch
                    # would slow search-back and decay for the next 8 beats.
                    is_long = s[S_NRR] > 0 and rr_new > f[F_SBFACTOR] * f[F_RRAVG]
                    if is_long and f[F_HELDRR] == 0.0:
                        f[F_HELDRR] = rr_new
                    else:
                        if is_long:  # two long ones in a row: the rhythm did slow
                            s[S_RR + s[S_RRPOS]] = int(f[F_HELDRR])
                            s[S_RRPOS] = (s[S_RRPOS] + 1) % N_RR
                            if s[S_NRR] < N_RR:
                                s[S_NRR] += 1
                        f[F_HELDRR] = 0.0
                        s[S_RR + s[S_RRPOS]] = rr_new
                        s[S_RRPOS] = (s[S_RRPOS] + 1) % N_RR
                        if s[S_NRR] < N_RR:
                            s[S_NRR] += 1
                        stored = 1
                if stored == 1:
                    acc = 0.0
                    for j in range(s[S_NRR]):
                        acc += s[S_RR + j]
                    f[F_RRAVG] = acc / s[S_NRR]
                    # no beat for decay_rr mean RRs (at least decay_s): lower the threshold
                    dl = int(f[F_DECAYRR] * f[F_RRAVG])
                    s[S_DECAYLEN] = dl if dl > s[S_DECAY] else s[S_DECAY]
                s[S_LASTR] = ar
                s[S_LASTEVT] = n
                f[F_LASTSLOPE] = aslope
                s[S_SBDIRTY] = 1
                out[0, n_out] = ar
                out[1, n_out] = n
                n_out += 1
        # next sample at which a timer is due
        if learning == 1:
            wake = s[S_START] + s[S_LEARN] - 1
        else:
            wake = s[S_LASTEVT] + s[S_DECAYLEN] + 1
            lastr = s[S_LASTR]
            if s[S_SBDIRTY] == 1 and s[S_NNOISE] > 0 and lastr >= 0:
                due = lastr + int(f[F_SBFACTOR] * f[F_RRAVG]) + 1
                if due < wake:
                    wake = due
        n += 1
    s[S_N] = n
    s[S_HPOS] = hpos
    s[S_MPOS] = mpos
    s[S_CANDI] = candi
    s[S_LEARNING] = learning
    s[S_WAKE] = wake
    f[F_MWISUM] = msum
    f[F_MPREV] = mprev
    f[F_CANDV] = candv
    f[F_LASTX] = lastx
    f[F_LASTBP] = lastbp
    f[F_LEARNMAX] = learnmax
    f[F_LEARNSUM] = learnsum
    f[F_Z + 0] = z0
    f[F_Z + 1] = z1
    f[F_Z + 2] = z2
    f[F_Z + 3] = z3
    return n_out


_detect_chunk_numba = numba.njit(cache=True, nogil=True)(detect_chunk) if numba is not None else None
BACKENDS = ("numba", "python")
_NONE = np.zeros(0, dtype=np.int64)
_NONE.setflags(write=False)


def _kernel(backend: str):
    if backend == "numba":
        if _detect_chunk_numba is None:
            log.warning("numba is not installed; QRS detection falls back to the Python reference")
            return detect_chunk
        return _detect_chunk_numba
    if backend == "python":
        return detect_chunk
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class QrsParams:
    """Detector timing in seconds; converted to samples at the stream's rate."""

    mwi_s: float = 0.15            # moving-window integration width
    lookahead_s: float = 0.08      # an MWI peak is final once nothing larger follows this long
    refractory_s: float = 0.2
    raw_refine_s: float = 0.04     # R is sought in the raw signal this far either side
    learn_s: float = 2.0           # thresholds are learnt from the first seconds
    t_wave_s: float = 0.36
    decay_s: float = 1.5           # at least this long without a beat before a decay
    decay_rr: float = 2.0          # and at least this many mean RRs
    search_back_rr: float = 1.66
    default_rr_s: float = 1.0
    min_amplitude_mv: float = 0.1  # band-passed; a QRS of ~0.2 mV peak to peak
    max_pending: int = 32


class QrsDetector:
    """Streaming R-peak detector for one lead at sample rate `fs` (Hz), input in mV.

    `push(x)` returns the R indices confirmed by these samples (absolute sample counts,
    int64); `last_detected_at` holds the indices of the samples that confirmed them.
    """

    def __init__(self, fs: float, params: QrsParams | None = None, backend: str = "numba") -> None:
        self.fs = float(fs)
        self.params = p = params or QrsParams()
        self._kernel = _kernel(backend)
        band = qrs_bandpass(self.fs)
        if band.sos.shape != (2, 6):
            raise ValueError("the kernel runs exactly two biquad sections")

        def samples(sec: float) -> int:
            return max(1, int(round(sec * self.fs)))

        W, L = samples(p.mwi_s), samples(p.lookahead_s)
        delay = int(round(band.delay))
        rawref = samples(p.raw_refine_s)
        H = W + L + delay + 2 * rawref + 8
        K = p.max_pending
        self._s = np.zeros(S_HDR + 2 * K, dtype=np.int64)
        self._f = np.zeros(F_HDR + 2 * H + W + 5 * K, dtype=np.float64)
        s, f = self._s, self._f
        s[S_H], s[S_W], s[S_L], s[S_K] = H, W, L, K
        s[S_REFR] = samples(p.refractory_s)
        s[S_DELAY] = delay
        s[S_RAWREF] = rawref
        s[S_LEARN] = samples(p.learn_s)
        s[S_TWAVE] = samples(p.t_wave_s)
        s[S_DECAY] = samples(p.decay_s)
        s[S_DECAYLEN] = max(s[S_DECAY], int(p.decay_rr * p.default_rr_s * self.fs))
        s[S_CANDI] = -1
        s[S_LASTR] = -1
        s[S_LEARNING] = 1
        s[S_START] = -1
        s[S_WAKE] = s[S_LEARN] - 1  # reset at the first finite sample
        f[F_LASTX] = np.nan  # no finite sample yet
        f[F_SOS:F_SOS + 12] = band.sos.ravel()
        f[F_ZIU:F_ZIU + 4] = band.zi_unit.ravel()
        f[F_MINAMP] = p.min_amplitude_mv
        f[F_SBFACTOR] = p.search_back_rr
        f[F_RRAVG] = p.default_rr_s * self.fs
        f[F_DECAYRR] = p.decay_rr
        self._refr = int(s[S_REFR])
        self.last_detected_at = _NONE
        self._out_len = -1
        self._out = _NONE

    def capacity_for(self, n: int) -> int:
        """Output columns a chunk of n samples may need: beats are a refractory period
        apart, plus what the learning period and a search-back can release at once."""
        return n // self._refr + 2 * self.params.max_pending + 8

    @property
    def n_samples(self) -> int:
        """Samples consumed so far (the absolute index of the next one)."""
        return int(self._s[S_N])

    @property
    def refractory(self) -> int:
        """Samples after a beat within which no other R is accepted (the same complex)."""
        return self._refr

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed one lead's next samples (any length, even 0); returns the R indices they
        confirmed, oldest first."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected one lead (1-D samples), got shape {x.shape}")
        if x.shape[0] > self._out_len:  # output buffer kept between calls: pushes are hot
            self._out = np.empty((2, self.capacity_for(x.shape[0])), dtype=np.int64)
            self._out_len = x.shape[0]
        k = self._kernel(x, self._f, self._s, self._out)
        if k == 0:
            self.last_detected_at = _NONE
            return _NONE
        found = self._out[:, :k].copy()
        self.last_detected_at = found[1]
        return found[0]


def detect(x: np.ndarray, fs: float, chunk: int | None = None, backend: str = "numba",
           params: QrsParams | None = None, blank_spikes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run a fresh detector over a whole recording, optionally in chunks of `chunk`
    samples, after removing pacing spikes as the streaming engine does
    (`kernels/pace_spikes.py`; `blank_spikes=False`: the raw samples). Returns (R indices,
    detection indices: the input sample whose arrival confirmed each beat)."""
    det = QrsDetector(fs, params, backend)
    blanker = SpikeBlanker(fs, 1, backend=backend) if blank_spikes else None
    lag = blanker.lag if blanker is not None else 0
    x = np.asarray(x, dtype=np.float32)
    step = x.shape[0] if not chunk else int(chunk)
    rs, ds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for i in range(0, x.shape[0], max(step, 1)):
        part = x[i:i + step]
        rs.append(det.push(blanker.push(part[None])[0] if blanker is not None else part))
        ds.append(det.last_detected_at + lag)
    return np.concatenate(rs), np.concatenate(ds)


def warm_up() -> float:
    """Compile (or load from cache) the Numba kernel; returns the seconds it took."""
    t0 = time.perf_counter()
    detect(np.zeros(8, np.float32), 250.0, backend="numba")
    return time.perf_counter() - t0


__all__ = ["BACKENDS", "QrsDetector", "QrsParams", "detect", "detect_chunk", "warm_up"]
