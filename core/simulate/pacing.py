"""Pacemaker stimulus artefacts ("pacing spikes") as a surface ECG records them.

A pacemaker's output is a rectangular pulse of a few volts lasting 0.4–1 ms; on the skin
it appears as a spike of a few millivolts (bipolar leads) to tens (unipolar), followed by
an opposite-polarity afterpotential while the output capacitor recharges: an exponential
with a time constant of 4–100 ms (the range IEC 60601-2-27 tests monitors with) that
carries back the pulse's charge, so its area equals the pulse's. An ECG
front end samples it through its anti-aliasing filter, modelled here as averaging over
each sample period: at 250 Hz a 0.5 ms, 4 mV pulse becomes one 0.5 mV sample, at 1 kHz
a 2 mV one, and a pulse straddling two periods shows in both. That is what makes spikes
hard for a QRS detector: one or two samples far from the baseline, with little energy in
the QRS band.
"""
from __future__ import annotations

import numpy as np

PACING_MODES = ("none", "ventricular", "dual")

# Spike dipoles (x: patient left, y: inferior, z: anterior): a right-ventricular apical
# lead points its stimulus up and to the left, a right-atrial appendage lead down and left.
VENTRICULAR_SPIKE_DIR = np.array([0.35, -0.8, 0.45])
ATRIAL_SPIKE_DIR = np.array([0.5, 0.75, 0.3])


def spike_train(n: int, fs: float, times: np.ndarray, width_s: float, tail_s: float) -> np.ndarray:
    """Unit-height rectangular pulses of `width_s` starting at `times` (s), each followed by
    its afterpotential (time constant `tail_s`, the pulse's area), averaged over every
    sample period [k/fs, (k+1)/fs): shape (n,)."""
    out = np.zeros(n)
    times = np.asarray(times, dtype=np.float64)
    times = times[(times >= 0) & (times < n / fs)]
    if not len(times):
        return out
    start, end = times * fs, (times + width_s) * fs          # in samples
    first = np.floor(start).astype(np.int64)
    for k in range(int(np.ceil(width_s * fs)) + 1):         # the few periods a pulse can touch
        idx = first + k
        overlap = np.clip(np.minimum(end, idx + 1) - np.maximum(start, idx), 0.0, None)
        ok = idx < n
        np.add.at(out, idx[ok], overlap[ok])
    # Afterpotential −(w/τ)·exp(−(t − end)/τ) from the pulse's end, integrated exactly over
    # each sample period it touches (over 6 τ): its area is the pulse's w.
    span = int(np.ceil(6 * tail_s * fs)) + 2
    idx = np.floor(end).astype(np.int64)[:, None] + np.arange(span)[None, :]
    t_end = (times + width_s)[:, None]
    a = np.maximum(idx / fs, t_end) - t_end                  # period start, since the pulse's end
    b = np.maximum((idx + 1) / fs, t_end) - t_end
    height = width_s / tail_s                                # of the afterpotential, per unit pulse
    tail = -height * tail_s * fs * (np.exp(-a / tail_s) - np.exp(-b / tail_s))  # its mean over the period
    ok = idx < n
    np.add.at(out, idx[ok], tail[ok])
    return out


def pacing_signal(lead_vectors: np.ndarray, n: int, fs: float, atrial: np.ndarray, ventricular: np.ndarray,
                  spike_mv: float, width_s: float, tail_s: float) -> np.ndarray:
    """Spikes at the atrial and ventricular stimulus times, projected on each lead: (leads, n) mV."""
    out = np.zeros((len(lead_vectors), n))
    for times, direction, scale in ((ventricular, VENTRICULAR_SPIKE_DIR, 1.0), (atrial, ATRIAL_SPIKE_DIR, 0.6)):
        if len(times):
            unit = direction / np.linalg.norm(direction)
            out += np.outer(lead_vectors @ unit * scale * spike_mv, spike_train(n, fs, times, width_s, tail_s))
    return out
