"""Cardiac intervals as functions of heart rate: the one place the simulator's ECG, heart and
beat-driven renderer take them from, so the ECG events and the mechanics always agree.

Linear fits from the literature (REFERENCE.md, Weissler): QT ≈ 521 − 2.0·HR ms,
pre-ejection period ≈ 131 − 0.4·HR ms. The fits are made for rest-to-moderate rates; at
tachycardia they would put T end almost on the next P, so above ~140 bpm QT is floored at
30 ms + RR/2 (never more than the 245 ms the line gives at 138 bpm).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

HR_MIN, HR_MAX = 30.0, 200.0


def qt_seconds(rr: ArrayLike) -> np.ndarray:
    """QT interval (QRS onset to T end) in seconds for RR interval(s) in seconds."""
    rr = np.asarray(rr, dtype=np.float64)
    hr = 60.0 / rr
    return np.maximum(0.521 - 0.002 * hr, np.minimum(0.030 + 0.5 * rr, 0.245))


def pep_seconds(rr: ArrayLike) -> np.ndarray:
    """Pre-ejection period (R to aortic valve opening) in seconds; isovolumic contraction."""
    rr = np.asarray(rr, dtype=np.float64)
    return np.maximum(0.131 - 0.0004 * (60.0 / rr), 0.035)


def pr_seconds(rr: ArrayLike, pr_rest: float = 0.16) -> np.ndarray:
    """PR interval (P onset to QRS onset): shortens a little as the rate rises."""
    rr = np.asarray(rr, dtype=np.float64)
    hr = 60.0 / rr
    return np.clip(pr_rest * (1.0 - 0.002 * (hr - 70.0)), 0.09, 0.26)


def qrs_onset_offset(qrs: ArrayLike) -> np.ndarray:
    """QRS onset lies this many seconds before the R peak (the R peak sits ~45 % into the QRS)."""
    return 0.45 * np.asarray(qrs, dtype=np.float64)
