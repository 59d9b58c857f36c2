"""The streaming engine's `sim` backend: echo frames for a beat known only by its R time and RR.

From R and RR alone the intervals follow from heart rate (`timing.py`: PR, QRS onset, QT →
T end), so the volume curve has ED at R and ES at T end as in the paired simulator. One
subject (anatomy, scatterer field, clutter) is kept for the life of the object, so
consecutive beats are continuous: every beat starts and ends at end-diastole.
"""
from __future__ import annotations

import numpy as np

from .ecg import BeatEvents
from .echo import EchoRenderer
from .heart import HeartCycle
from .subject import sample_subject
from .timing import HR_MAX, HR_MIN, pr_seconds, qrs_onset_offset, qt_seconds


class BeatDrivenEcho:
    """Renders F frames per beat for one simulated subject, driven by detected beats."""

    def __init__(self, seed: int, size: int = 64, frames_per_beat: int = 10, ef: float | None = None, view: str = "a4c") -> None:
        if frames_per_beat < 1:
            raise ValueError("frames_per_beat must be at least 1")
        self.subject = sample_subject(seed, ef=ef, view=view)
        self.frames_per_beat = frames_per_beat
        self.renderer = EchoRenderer(self.subject, size, rng=np.random.default_rng([int(seed), 0xEC40]))
        self.rng = np.random.default_rng([int(seed), 0xBEA7])

    @property
    def size(self) -> int:
        return self.renderer.size

    def render_beat(self, r_time: float, rr: float) -> tuple[np.ndarray, np.ndarray]:
        """Frames (uint8 F×H×W) and their times (s) r_time + i·rr/F, i = 0..F−1.

        Outside HR_MIN..HR_MAX the heart beats at the nearest rate it models, but its frames
        keep the true RR's times: consecutive beats tile the ECG's time, with no hole
        before the next R and no frame past it."""
        if not np.isfinite(r_time):
            raise ValueError(f"r_time must be finite, got {r_time}")
        if not (np.isfinite(rr) and rr > 0):  # else frames would run backwards or nowhere
            raise ValueError(f"rr must be a positive finite number of seconds, got {rr}")
        f = self.frames_per_beat
        times = r_time + np.arange(f) * float(rr) / f
        modelled = float(np.clip(rr, 60.0 / HR_MAX, 60.0 / HR_MIN))
        phase = r_time + np.arange(f) * modelled / f  # the same phases of the modelled cycle
        heart = HeartCycle(self._events(r_time, modelled), self.subject.edv, self.subject.esv)
        frames, _ = self.renderer.render(heart.volume(phase), heart.mitral_open(phase), rng=self.rng)
        return frames, times

    def _events(self, r_time: float, rr: float) -> BeatEvents:
        """Events of this beat and its neighbours, assuming the rhythm stays at RR."""
        r = r_time + rr * np.arange(-1, 3, dtype=np.float64)
        q_on = r - qrs_onset_offset(self.subject.qrs)
        return BeatEvents(
            p_on=q_on - pr_seconds(np.full(4, rr), self.subject.ecg.pr),
            q_on=q_on,
            r=r,
            t_end=q_on + qt_seconds(np.full(4, rr)),
            kind=np.zeros(4, dtype=np.int8),
        )
