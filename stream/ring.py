"""A ring buffer of multi-lead float32 samples addressed by absolute sample index."""
from __future__ import annotations

import numpy as np


class SampleRing:
    """Keeps the last `capacity` samples of `n_leads` leads.

    Samples are addressed by their absolute index in the stream (0 = first sample ever
    appended); `start` is the oldest index still held and `end` one past the newest.
    """

    def __init__(self, n_leads: int, capacity: int) -> None:
        if n_leads < 1 or capacity < 1:
            raise ValueError("n_leads and capacity must be positive")
        self.n_leads = int(n_leads)
        self.capacity = int(capacity)
        self._buf = np.zeros((self.n_leads, self.capacity), dtype=np.float32)
        self.end = 0

    @property
    def start(self) -> int:
        return max(0, self.end - self.capacity)

    def append(self, samples: np.ndarray) -> None:
        """Append samples shaped (n_leads, n)."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 2 or samples.shape[0] != self.n_leads:
            raise ValueError(f"expected ({self.n_leads}, n) samples, got {samples.shape}")
        n = samples.shape[1]
        if n >= self.capacity:  # only the newest capacity samples can stay
            self.end += n - self.capacity
            samples = samples[:, n - self.capacity:]
            n = self.capacity
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[:, pos:pos + first] = samples[:, :first]
        self._buf[:, :n - first] = samples[:, first:]
        self.end += n

    def read(self, i0: int, i1: int) -> np.ndarray:
        """A copy of samples [i0, i1), shaped (n_leads, i1 - i0); the span must be held."""
        if not self.start <= i0 <= i1 <= self.end:
            raise IndexError(f"samples [{i0}, {i1}) not held; ring holds [{self.start}, {self.end})")
        n = i1 - i0
        pos = i0 % self.capacity
        first = min(n, self.capacity - pos)
        out = np.empty((self.n_leads, n), dtype=np.float32)
        out[:, :first] = self._buf[:, pos:pos + first]
        out[:, first:] = self._buf[:, :n - first]
        return out
