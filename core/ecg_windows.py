"""Beat windows of simulated ECG for pretraining the ECG encoder (MAE), addressed by index.

Window i comes from a simulated recording drawn from seed i: random heart rate, lead
count, sample rate (so resampling is part of what the encoder sees) and, for some
windows, a cut-off 0.1 s after the next R peak, standing in for live streaming, where
the samples after the beat's end have not arrived yet. Deterministic in the index, so a
run resumes exactly.

Not the live path exactly: windows here are linearly interpolated (`core/beat_window.py`
gives the measured difference from the engine's windowed sinc), and the engine's valid
ECG ends where the detector confirmed the next R, less the resampling kernel's reach:
0.10-0.19 s after the next R (medians 0.12-0.18 s at 130-500 Hz and 50-150 bpm; later
for beats released at the end of the detector's learning period). Both are kept as they
are: the shipped encoder was trained on these windows, and changing them changes its
training distribution and the published figures.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .beat_window import beat_window
from .config import EcgEncoderConfig
from .simulate.ecg import simulate_ecg

SAMPLE_RATES = (130.0, 250.0, 360.0, 500.0, 512.0)
STREAM_CUT_PROB = 0.5  # chance a window ends near where a live stream would (next R + 0.1 s; live: see above)


def ecg_window(index: int, cfg: EcgEncoderConfig, leads: int) -> tuple[np.ndarray, np.ndarray]:
    """Window i: (leads, window_samples) float32, (window_samples,) bool."""
    rng = np.random.default_rng([index, 7])
    fs = float(rng.choice(SAMPLE_RATES))
    hr = float(rng.uniform(45.0, 150.0))
    duration = 3.0 * cfg.window_s + 60.0 / hr
    record = simulate_ecg(duration, fs=fs, hr=hr, leads=leads, seed=rng)
    r = record.r_peaks
    inside = r[(r > cfg.pre_r_s) & (r < record.duration - cfg.window_s)]
    r_time = float(rng.choice(inside)) if inside.size else float(r[len(r) // 2])
    later = r[r > r_time]
    until = None
    if rng.random() < STREAM_CUT_PROB and later.size:
        until = float(later[0]) + 0.1
    return beat_window(record.signal, fs, r_time, cfg, available_until=until)


def ecg_batch(indices: list[int], cfg: EcgEncoderConfig, leads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Windows at `indices` with `leads` leads: (B, L, S) float, (B, 1, S) bool, lead ids (L,)."""
    pairs = [ecg_window(i, cfg, leads) for i in indices]
    window = torch.from_numpy(np.stack([w for w, _ in pairs]))
    valid = torch.from_numpy(np.stack([v for _, v in pairs]))[:, None]
    return window, valid, torch.arange(leads)
