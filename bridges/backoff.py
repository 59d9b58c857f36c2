"""Capped, jittered exponential backoff for reconnect loops (MQTT, BLE)."""
from __future__ import annotations

import random


class Backoff:
    """Delays initial·factor^k, capped at `maximum`, each scaled by a random factor in
    [1 − jitter, 1] so that many clients cut off together do not return together.

    `connection_ended(lasted)` after a live connection ends: one that lasted `stable_s`
    worked, so the next retry is quick again; one cut off sooner keeps the delay growing.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
        stable_s: float = 10.0,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter <= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.stable_s = stable_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        if base < self.maximum:  # past the cap the exponent stops growing (factor**1024 overflows a float)
            self.attempt += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0

    def connection_ended(self, lasted: float) -> None:
        """Reset only after a connection that held `stable_s` seconds. Resetting at every
        connect let a link that is accepted and then cut at once (two engines sharing a
        client id take the session from each other; a sensor that drops at once) retry at
        the initial delay for ever: several reconnects a second, a warning each."""
        if lasted >= self.stable_s:
            self.reset()
