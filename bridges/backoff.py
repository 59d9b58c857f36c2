"""Capped, jittered exponential backoff for reconnect loops (MQTT, BLE)."""
from __future__ import annotations

import random


class Backoff:
    """Delays initial·factor^k, capped at `maximum`, each scaled by a random factor in
    [1 − jitter, 1] so that many clients cut off together do not return together.

    `reset()` after a connection that worked, so the next loss retries quickly.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter <= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        if base < self.maximum:  # past the cap the exponent stops growing (factor**1024 overflows a float)
            self.attempt += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0
