"""Left-ventricular volume over time, driven by the ECG's own beat events.

Per cycle R_k → R_k+1: end-diastole at R (V = EDV), isovolumic contraction for the
pre-ejection period, ejection to end-systole at T end (V = ESV), isovolumic relaxation,
rapid (passive) filling, diastasis, and the atrial kick that starts after the next P wave
and brings V back to EDV at the next R. V equals EDV at every R and ESV at every T end, so
the subject's EF is exact; a premature ventricular beat gets an incomplete fill and a weak
ejection, like a real one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .ecg import BeatEvents
from .timing import pep_seconds

ATRIAL_DELAY = 0.08     # s from P onset to the start of atrial contraction
PASSIVE_FRACTION = 0.72  # share of the filling done before the atrial kick
FILL_TAU = 0.05         # s, time constant of the rapid-filling wave


@dataclass
class HeartCycle:
    """Volume curve of one subject over a series of beats. Times are recording seconds."""

    beats: BeatEvents
    edv: float
    esv: float

    def __post_init__(self) -> None:
        b = self.beats
        rr = b.rr
        n = len(b)
        pvc = b.kind == 1
        sv = self.edv - self.esv
        # Per-beat volumes: a premature beat starts from an incomplete fill and ejects weakly.
        self.edv_k = np.where(pvc, self.esv + 0.65 * sv, self.edv)
        self.esv_k = np.where(pvc, self.esv + 0.25 * sv, self.esv)
        self.eject_on = b.r + pep_seconds(np.where(pvc, 0.8, rr))
        self.es = b.t_end
        ivrt = np.clip(0.075 * np.sqrt(rr), 0.035, 0.1)
        self.fill_on = np.minimum(self.es + ivrt, np.append(b.r[1:], np.inf) - 0.02)
        next_p = np.append(b.p_on[1:], np.nan)
        next_r = np.append(b.r[1:], b.r[-1] + rr[-1])
        kick = np.where(np.isnan(next_p), next_r, next_p + ATRIAL_DELAY)
        self.kick_on = np.clip(kick, self.fill_on, next_r - 0.02)
        self.next_r = next_r
        self.next_edv = np.append(self.edv_k[1:], self.edv)
        self._n = n

    def _locate(self, t: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self.beats.r, t, side="right") - 1
        if np.any(k < 0) or np.any(k >= self._n - 1):
            raise ValueError("times outside the simulated beats")
        return k

    def volume(self, t: ArrayLike) -> np.ndarray:
        """LV volume (ml) at times t (seconds)."""
        t = np.asarray(t, dtype=np.float64)
        k = self._locate(t)
        e_on, es = self.eject_on[k], self.es[k]
        f_on, a_on, r_next = self.fill_on[k], self.kick_on[k], self.next_r[k]
        edv, esv, edv_next = self.edv_k[k], self.esv_k[k], self.next_edv[k]

        # Ejection: fast early, slow late (flow peaks in the first third).
        u = np.clip((t - e_on) / np.maximum(es - e_on, 1e-3), 0.0, 1.0)
        v_sys = edv - (edv - esv) * 0.5 * (1.0 - np.cos(np.pi * u ** 0.75))
        # Passive filling: a gamma-shaped E wave, scaled to reach its share at the kick.
        fill = edv_next - esv
        s = _e_wave((t - f_on) / FILL_TAU)
        s_end = _e_wave((a_on - f_on) / FILL_TAU)
        passive = PASSIVE_FRACTION * fill * s / np.maximum(s_end, 1e-6)
        v_kick_start = esv + PASSIVE_FRACTION * fill
        w = np.clip((t - a_on) / np.maximum(r_next - a_on, 1e-3), 0.0, 1.0)
        v_kick = v_kick_start + (edv_next - v_kick_start) * 0.5 * (1.0 - np.cos(np.pi * w))

        v = np.where(t < e_on, edv, v_sys)
        v = np.where(t >= es, esv, v)
        v = np.where(t >= f_on, esv + passive, v)
        v = np.where(t >= a_on, v_kick, v)
        return v

    def mitral_open(self, t: ArrayLike) -> np.ndarray:
        """Mitral (and tricuspid) opening, 0 closed .. 1 wide open, at times t."""
        t = np.asarray(t, dtype=np.float64)
        k = self._locate(t)
        f_on, a_on, r_next = self.fill_on[k], self.kick_on[k], self.next_r[k]
        u = (t - f_on) / FILL_TAU
        e_open = np.clip((t - f_on) / 0.03, 0.0, 1.0) * (0.35 + 0.65 * np.exp(-np.maximum(u - 2.0, 0.0) / 2.0))
        w = np.clip((t - a_on) / np.maximum(r_next - a_on, 1e-3), 0.0, 1.0)
        a_open = np.sin(np.pi * np.minimum(w * 1.15, 1.0)) ** 0.6
        o = np.where(t >= f_on, e_open, 0.0)
        o = np.where((t >= a_on) & (r_next - a_on > 0.025), np.maximum(a_open, 0.35 * (1 - w)), o)
        return o


def _e_wave(u: np.ndarray | float) -> np.ndarray:
    """1 − e^−u (1 + u): zero slope at valve opening, peak inflow one time constant later."""
    u = np.maximum(u, 0.0)
    return 1.0 - np.exp(-u) * (1.0 + u)
