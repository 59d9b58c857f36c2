"""Filter design for the streaming QRS detector: a band-pass as second-order sections.

Design happens once per sample rate in SciPy; the per-sample filtering runs inside the
detector kernel (`kernels/qrs.py`), which carries the section states across chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import signal

# Pan–Tompkins keeps 5–15 Hz; a little more top end sharpens R at high rates.
QRS_BAND_HZ = (5.0, 20.0)
MIN_FS = 50.0  # below this the QRS band does not fit under Nyquist with margin


@dataclass(frozen=True)
class BandPass:
    """A 2-section band-pass: `sos` (2, 6), the unit-step state `zi_unit` (2, 2), and the
    group delay (samples) at the band's centre, used to map filtered peaks back to R."""

    sos: np.ndarray
    zi_unit: np.ndarray
    delay: float


def qrs_bandpass(fs: float, band: tuple[float, float] = QRS_BAND_HZ) -> BandPass:
    """Order-2 Butterworth band-pass for QRS energy at sample rate `fs` (Hz)."""
    sos, zi_unit, delay = _design(float(fs), (float(band[0]), float(band[1])))
    return BandPass(sos=sos.copy(), zi_unit=zi_unit.copy(), delay=delay)


@lru_cache(maxsize=64)  # a fleet of devices shares a few rates: design once per rate
def _design(fs: float, band: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    if fs < MIN_FS:
        raise ValueError(f"sample rate {fs} Hz is too low for QRS detection (need >= {MIN_FS} Hz)")
    low, high = band
    high = min(high, 0.4 * fs)
    sos = signal.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")
    # Starting the state at steady state for the first sample hides the DC offset step.
    zi_unit = signal.sosfilt_zi(sos)
    b, a = signal.sos2tf(sos)
    centre = float(np.sqrt(low * high))
    _, gd = signal.group_delay((b, a), w=[centre], fs=fs)
    return (np.ascontiguousarray(sos, dtype=np.float64), np.ascontiguousarray(zi_unit, dtype=np.float64),
            float(gd[0]))
