"""Resampling at arbitrary (fractional) positions with a Hann-windowed sinc.

Used to cut a beat's ECG window out of the raw stream at the model rate: the output
grid is anchored on the R peak, which is rarely on the input grid of a 130/360/512 Hz
device. The kernel low-passes at `cutoff` (a fraction of the input Nyquist) so
downsampling does not alias; weights are renormalised per output sample so a constant
passes unchanged; taps beyond the segment's ends repeat the edge sample. The windowed
sinc is tabulated once per rate pair (`PHASES` points per input sample, read with linear
interpolation: error ~1e-5) so the kernel does no trigonometry.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

try:
    import numba
except ImportError:  # numba is a dependency; this keeps the reference usable without it
    numba = None

HALF_WIDTH = 8  # taps either side of the output position at cutoff 1
PHASES = 256    # table points per input sample


def resample_at(x, pos, table, reach, phases, out):
    """out[:, j] = x filtered by the tabulated kernel and evaluated at fractional index
    pos[j]. x: (leads, n); pos: (m,) in x's sample units; table: the kernel sampled every
    1/phases samples over [-reach, reach]; out: (leads, m).
    """
    n = x.shape[1]
    leads = x.shape[0]
    acc = np.zeros(leads, dtype=np.float64)
    for j in range(pos.shape[0]):
        p = pos[j]
        k0 = int(math.floor(p - reach)) + 1
        k1 = int(math.floor(p + reach))
        for lead in range(leads):
            acc[lead] = 0.0
        wsum = 0.0
        for k in range(k0, k1 + 1):
            u = (p - k + reach) * phases
            i = int(u)
            frac = u - i
            w = table[i] + frac * (table[i + 1] - table[i])
            kk = 0 if k < 0 else (n - 1 if k >= n else k)
            for lead in range(leads):
                acc[lead] += w * x[lead, kk]
            wsum += w
        for lead in range(leads):
            out[lead, j] = acc[lead] / wsum


_resample_at_numba = numba.njit(cache=True, nogil=True)(resample_at) if numba is not None else None
BACKENDS = ("numba", "python")


def _cutoff(fs_in: float, fs_out: float) -> float:
    """Low-pass cutoff as a fraction of the input Nyquist: none needed when the output
    rate is at least the input's; below it, 0.95 keeps the transition band under the
    output Nyquist."""
    return 1.0 if fs_out >= fs_in else 0.95 * fs_out / fs_in


@lru_cache(maxsize=32)
def kernel_table(fs_in: float, fs_out: float) -> tuple[np.ndarray, float]:
    """The windowed sinc for this rate pair, tabulated: (table, reach in input samples)."""
    cutoff = _cutoff(fs_in, fs_out)
    reach = HALF_WIDTH / cutoff
    t = np.arange(int(math.ceil(2 * reach * PHASES)) + 2) / PHASES - reach
    table = np.sinc(cutoff * t) * np.where(np.abs(t) < reach, 0.5 + 0.5 * np.cos(np.pi * t / reach), 0.0)
    table.setflags(write=False)
    return table, reach


def support(fs_in: float, fs_out: float) -> int:
    """Input samples either side of a position that `resample` reads."""
    return int(math.ceil(kernel_table(fs_in, fs_out)[1])) + 1


def resample(x: np.ndarray, pos: np.ndarray, fs_in: float, fs_out: float,
             backend: str = "numba") -> np.ndarray:
    """Evaluate x (leads, n) at positions `pos` (input-sample units) for an output rate
    `fs_out`; returns float32 (leads, len(pos))."""
    if backend == "numba" and _resample_at_numba is not None:
        kernel = _resample_at_numba
    elif backend in BACKENDS:
        if backend == "numba":
            log.warning("numba is not installed; resampling falls back to the Python reference")
        kernel = resample_at
    else:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected (leads, n>0) samples, got {x.shape}")
    table, reach = kernel_table(float(fs_in), float(fs_out))
    out = np.empty((x.shape[0], pos.shape[0]), dtype=np.float32)
    kernel(x, pos, table, reach, PHASES, out)
    return out
