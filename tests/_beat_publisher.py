"""A real protocol-v1 publisher in a thread, sending beats of changing frames (viewer and recorder tests).

Frames are a speckle texture with a ring that contracts over the beat and a bright bar
whose column moves with `seq`, so any two frames of a device differ and a frame can be
rebuilt from its header (`expected_frame`).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from echopulse.stream.publish import Publisher

ECG_FS = 250.0


def expected_frame(device_seed: int, beat: int, frame: int, frames: int, seq: int, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    texture = np.random.default_rng(device_seed).integers(0, 90, size=shape)
    yy, xx = np.mgrid[0:h, 0:w]
    radius = 0.35 * min(h, w) * (1.0 - 0.3 * np.sin(np.pi * frame / frames))
    ring = np.abs(np.hypot(yy - h / 2, xx - w / 2) - radius) < 3
    image = texture + 150 * ring
    image[:, (seq * 3) % w] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def beat_ecg(rr: float) -> np.ndarray:
    """A crude ECG of one beat from its R peak (mV): QRS spike and a T wave."""
    t = np.arange(int(rr * ECG_FS)) / ECG_FS
    return (1.2 * np.exp(-((t - 0.0) / 0.012) ** 2) - 0.2 * np.exp(-((t - 0.03) / 0.01) ** 2)
            + 0.3 * np.exp(-((t - 0.3 * rr - 0.1) / 0.04) ** 2)).astype(np.float32)


class BeatPublisher(threading.Thread):
    """Publish a beat of `frames` frames per device every `rr` seconds until `stop()`
    (and a ``source`` status every `status_every` beats)."""

    def __init__(self, endpoint: str, devices: tuple[str, ...], *, rr: float = 0.5, frames: int = 10,
                 shape: tuple[int, int] = (96, 96), ecg_devices: tuple[str, ...] = (), model: str = "sim",
                 status_every: int = 0, primes: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.requested = endpoint
        self.devices, self.rr, self.n_frames, self.shape = devices, rr, frames, shape
        self.ecg_devices, self.model, self.status_every = ecg_devices, model, status_every
        self.primes = primes or {}  # device -> the "prime" header field a model backend sends
        self.endpoint = ""
        self.sent = 0
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with Publisher(self.requested) as pub:  # made in this thread: a ZeroMQ socket stays in one thread
                self.endpoint = pub.endpoint
                self.ready.set()
                beat = 0
                while not self._halt.wait(self.rr):
                    for k, device in enumerate(self.devices):
                        self._send(pub, k, device, beat)
                        if self.status_every and beat % self.status_every == 0:
                            pub.publish_status(device, "source", f"test source beat {beat}", {"beats": beat})
                    beat += 1
        except BaseException as err:  # reported to the test by stop()
            self.error = err
            self.ready.set()

    def _send(self, pub: Publisher, k: int, device: str, beat: int) -> None:
        seq0 = pub.next_seq(device)
        frames = np.stack([expected_frame(k, beat, i, self.n_frames, seq0 + i, self.shape) for i in range(self.n_frames)])
        r_time = beat * self.rr
        extra = {"ecg": beat_ecg(self.rr).astype("<f4").tobytes(), "ecg_fs": ECG_FS} if device in self.ecg_devices else {}
        if device in self.primes:
            extra["prime"] = self.primes[device]
        times = [r_time + i * self.rr / self.n_frames for i in range(self.n_frames)]
        self.sent += pub.publish_frames(device, frames, times=times, beat=beat, r_time=r_time, rr=self.rr,
                                        model=self.model, capture=time.time(), extra=extra)

    def start_and_wait(self, timeout: float = 10.0) -> "BeatPublisher":
        self.start()
        assert self.ready.wait(timeout), "publisher thread did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "publisher thread did not stop"
        if self.error is not None:
            raise self.error
