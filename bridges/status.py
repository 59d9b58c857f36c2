"""What a source says besides ECG: status events, and the counters behind them.

Bad input never raises out of a source; it becomes a `SourceStatus` in the stream and a
count in `source.counters`, so the engine can report it and keep going (DESIGN §5).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceStatus:
    """One event from a source.

    device: the device it concerns, or None when it concerns the whole source (a broker
    connection, say). code: a short machine-readable word; the codes sources use are
    listed below. message: one human-readable line.
    """

    device: str | None
    code: str
    message: str = ""


# Codes used by the sources in this package.
CONNECTED = "connected"            # first connection made
RECONNECTED = "reconnected"        # a later connection made (after a loss)
DISCONNECTED = "disconnected"      # a live connection was lost
CONNECT_FAILED = "connect_failed"  # one connection attempt failed; a retry follows
MALFORMED = "malformed"            # payload could not be decoded
OVERSIZED = "oversized"            # payload over the configured size limit
UNKNOWN_UNIT = "unknown_unit"      # unit not in UNIT_TO_MV
BAD_SHAPE = "bad_shape"            # samples not leads × n, too many leads, empty
BAD_FIELD = "bad_field"            # fs/t0/seq missing or of the wrong type or range
BAD_TOPIC = "bad_topic"            # no device id in the topic
RETAINED = "retained"              # a broker's retained copy of an old message: skipped, not live ECG
OVERFLOW = "overflow"              # our bounded queue dropped items (count in message)
DEVICE_ERROR = "device_error"      # the sensor refused a request (BLE PMD control point)


_LINK = {
    CONNECTED: logging.INFO,
    RECONNECTED: logging.INFO,
    DISCONNECTED: logging.WARNING,
    CONNECT_FAILED: logging.WARNING,
    OVERFLOW: logging.WARNING,
    DEVICE_ERROR: logging.WARNING,
}


def log_level(code: str) -> int:
    """Connection events are worth a log line; per-message bad input is not (it can come
    many times a second, and the engine reports it as a status with counters)."""
    return _LINK.get(code, logging.DEBUG)


def new_counters() -> Counter[str]:
    """A counter dict for `source.counters`; missing codes read as 0."""
    return Counter()
