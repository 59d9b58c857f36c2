"""Log set-up for every command: readable text on a terminal, JSON lines for a daemon.

JSON lines (one object per record: time, level, logger, message, plus any `extra=` fields
and the exception text) are what journald, Loki or Elasticsearch ingest without parsing
rules; `echopulse --log-format json serve ...` or `[log] format = "json"` turns them on.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int | str = logging.WARNING, fmt: str = "text") -> None:
    """Send the root logger's records to stderr in `fmt` ("text" or "json") at `level`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


LOG_INTERVAL_S = 10.0  # a rate-limited log writes at most one line per this
_DETAIL_CHARS = 200  # a bad message's text may be anything, and long


class RateLimitedLog:
    """Log the first event at once, then at most one line per `interval_s` saying how many
    more came meanwhile. :attr:`count` has them all; :attr:`last` the latest's detail.

    Events held back are written by the next event or `flush` after the interval: a caller
    that waits calls `flush` by `due_in`, and `flush(force=True)` when it closes."""

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what, self.interval_s, self.clock = logger, what, interval_s, clock
        self.count = 0
        self.last = ""
        self._pending = 0          # events since the last line
        self._next = float("-inf")  # when the next line may be written

    def __call__(self, detail: str) -> None:
        self.count += 1
        self.last = detail[:_DETAIL_CHARS]
        self._pending += 1
        self.flush()

    def due_in(self) -> float | None:
        """Seconds until the line for events held back may be written (0: now); None when none are."""
        if not self._pending:
            return None
        return max(0.0, self._next - self.clock())

    def flush(self, force: bool = False) -> None:
        """Write the line for events held back, if the interval has passed (or `force`: the
        caller closes, and would lose them)."""
        now = self.clock()
        if not self._pending or (now < self._next and not force):
            return
        more = f"; {self._pending} since the last report" if self._pending > 1 else ""
        self.logger.warning("%s: %s (%d in all%s)", self.what, self.last, self.count, more)
        self._pending = 0
        self._next = now + self.interval_s
