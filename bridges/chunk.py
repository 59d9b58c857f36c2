"""The unit every source yields: a validated chunk of ECG with its timing (DESIGN §5)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Units a chunk may carry, with the factor that converts them to millivolts.
UNIT_TO_MV = {"mV": 1.0, "uV": 1e-3, "µV": 1e-3, "V": 1e3}


@dataclass(frozen=True)
class EcgChunk:
    """A run of consecutive ECG samples from one device.

    samples: float32, shape (leads, n). t0: time of the first sample in seconds on the
    device's clock (or the receiver's monotonic clock where the device sends none).
    seq: the source's sequence number, increasing by one per chunk.
    received: the receiver's monotonic clock on arrival (replay: on release); None if unknown.
    """

    device: str
    samples: np.ndarray
    fs: float
    t0: float
    seq: int
    unit: str = "mV"
    received: float | None = None

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def n_leads(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        return self.n_samples / self.fs

    @property
    def t_end(self) -> float:
        """Time just after the last sample (t0 of a contiguous next chunk)."""
        return self.t0 + self.duration


@dataclass(frozen=True)
class RrIntervals:
    """Rhythm without a waveform (BLE Heart Rate service, 0x2A37).

    A rhythm source only: it carries beat-to-beat intervals, never ECG samples, so the
    engine must not treat it as a chunk. rr: seconds, oldest first (may be empty when the
    sensor sent only a rate). t: receiver's monotonic time of the notification.
    """

    device: str
    t: float
    hr_bpm: int
    rr: tuple[float, ...]
    seq: int
