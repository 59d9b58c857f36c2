"""Cut one beat's ECG window for the encoder from a recording at any sample rate.

The window starts `pre_r_s` before the beat's R peak and lasts `window_s`, sampled at
the encoder's rate (250 Hz), in the recording's units (the encoder normalises each lead
itself, so mV and µV sources look alike to it). Samples the recording does not have (before its start,
after its end, after `available_until` in a live stream, NaN) are zero and marked
invalid; the encoder hides patches that are not fully valid. The streaming engine's
beat segmenter (`stream/beats.py`) emits windows of the same geometry (start, length,
rate, zeros where invalid), but not the same samples: it resamples with a Hann-windowed
sinc (`kernels/resample.py`), and marks invalid the outputs within that kernel's reach
of a missing sample as well.

Resampling here is linear interpolation at the target sample times. Downsampling from
360-512 Hz to 250 Hz folds only content above 125 Hz, where surface ECG has little
energy, so no extra anti-alias filter is applied. Measured against the live windows of
the same beats (simulated ECG, 70 bpm, 60 s): the largest per-beat difference is a
median 0.09 mV (up to 0.12) at 130 Hz, 0.02 mV (up to 0.035) at 360 Hz and 0.03 mV (up
to 0.05) at 512 Hz; at the R sample itself under 0.01 mV. Kept as it is on purpose: the
shipped ECG encoder was trained on these windows (`core/ecg_windows.py`), and changing
them changes its training distribution and the published figures.
"""
from __future__ import annotations

import numpy as np

from .config import EcgEncoderConfig


def window_times(r_time: float, cfg: EcgEncoderConfig) -> np.ndarray:
    """Times (s) of the window's samples on the recording's clock: (window_samples,)."""
    return r_time - cfg.pre_r_s + np.arange(cfg.window_samples) / cfg.fs


def beat_window(
    ecg: np.ndarray,
    fs: float,
    r_time: float,
    cfg: EcgEncoderConfig,
    start_time: float = 0.0,
    available_until: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One beat's window.

    ecg: (leads, samples) or (samples,), sample k taken at start_time + k / fs.
    r_time: the beat's R peak on the same clock.
    available_until: last time the stream has delivered (live use); None = all of it.
    Returns window (leads, window_samples) float32 and valid (window_samples,) bool.
    """
    ecg = np.atleast_2d(np.asarray(ecg, dtype=np.float64))
    if fs <= 0:
        raise ValueError(f"sample rate must be positive, got {fs}")
    leads, n = ecg.shape
    times = window_times(r_time, cfg)
    if n == 0:
        return np.zeros((leads, cfg.window_samples), np.float32), np.zeros(cfg.window_samples, bool)
    src = (times - start_time) * fs  # fractional source index
    valid = (src >= 0) & (src <= n - 1)
    if available_until is not None:
        valid &= times <= available_until
    lo = np.clip(np.floor(src).astype(np.int64), 0, max(n - 1, 0))
    hi = np.clip(lo + 1, 0, max(n - 1, 0))
    frac = np.clip(src - lo, 0.0, 1.0)
    finite = np.isfinite(ecg)
    valid &= finite[:, lo].all(0) & finite[:, hi].all(0)
    clean = np.where(finite, ecg, 0.0)
    window = clean[:, lo] * (1 - frac) + clean[:, hi] * frac
    window = np.where(valid, window, 0.0)
    return window.astype(np.float32), valid
