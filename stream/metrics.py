"""Health and metrics over HTTP: /metrics in Prometheus text format, /health as JSON.

    server = MetricsServer(engine.counters, "127.0.0.1", 9108)
    async with server:                     # serves until the block ends
        await engine.run()

`counters_fn` returns ``{device: {counter: number}}`` (``Engine.counters()`` does); each
counter becomes ``echopulse_<counter>_total{device="..."}``. `primes_fn` (``Engine.primes()``)
adds how each device's generator was primed: ``echopulse_primed_with_reference{device}``
(1: its patient's echo loop, 0: a simulated heart) and ``echopulse_references_waiting``
(loops for devices not seen yet), and the same under "primes" in /health. The server is a few lines
of asyncio: one GET per connection, answered and closed, with a timeout on the read so a
silent client cannot hold a connection open.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any, Callable, Mapping

from .protocol import to_json

log = logging.getLogger(__name__)

Counters = Mapping[str, Mapping[str, float]]

READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _sanitized(counter: str) -> str:
    """The counter's name with the characters Prometheus refuses made _."""
    return _NAME_BAD.sub("_", counter)


def metric_name(counter: str) -> str:
    """``beats_dropped`` -> ``echopulse_beats_dropped_total``."""
    return f"echopulse_{_sanitized(counter)}_total"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return repr(value) if isinstance(value, float) else str(int(value))


def render_primes(primes: Mapping[str, Any]) -> list[str]:
    """Gauges of how devices were primed (see the module docstring)."""
    lines = [
        "# HELP echopulse_primed_with_reference 1 when a device follows its patient's echo loop, 0 on a simulated heart.",
        "# TYPE echopulse_primed_with_reference gauge",
    ]
    devices = primes.get("devices", {})
    lines.extend(f'echopulse_primed_with_reference{{device="{_label(d)}"}} {int(devices[d] == "reference")}'
                 for d in sorted(devices))
    lines += [
        "# HELP echopulse_references_waiting Reference loops for devices that have not streamed yet.",
        "# TYPE echopulse_references_waiting gauge",
        f"echopulse_references_waiting {len(primes.get('references_waiting', []))}",
    ]
    return lines


def render_prometheus(counters: Counters, uptime_s: float, primes: Mapping[str, Any] | None = None) -> str:
    """The text exposition of every counter of every device, grouped by metric (one HELP/TYPE each)."""
    # Keyed by the sanitized name: counters that sanitize to one ("a-b", "a_b") are summed,
    # since a repeated TYPE line or series makes Prometheus reject the whole scrape.
    by_metric: dict[str, dict[str, float]] = {}
    for device in sorted(counters):
        for counter, value in counters[device].items():
            series = by_metric.setdefault(_sanitized(counter), {})
            series[device] = series.get(device, 0) + value
    lines = [
        "# HELP echopulse_uptime_seconds Seconds since the metrics server started.",
        "# TYPE echopulse_uptime_seconds gauge",
        f"echopulse_uptime_seconds {uptime_s:.3f}",
        "# HELP echopulse_devices Devices the engine has a session for.",
        "# TYPE echopulse_devices gauge",
        f"echopulse_devices {sum(1 for d in counters if not d.startswith('_'))}",
    ]
    for counter in sorted(by_metric):
        name = metric_name(counter)
        lines.append(f"# HELP {name} Engine counter {counter} per device.")
        lines.append(f"# TYPE {name} counter")
        lines.extend(f'{name}{{device="{_label(d)}"}} {_number(v)}' for d, v in by_metric[counter].items())
    if primes is not None:
        lines += render_primes(primes)
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serve /metrics and /health for `counters_fn` on host:port (port 0: any free port, see .port)."""

    def __init__(self, counters_fn: Callable[[], Counters], host: str = "127.0.0.1", port: int = 9108,
                 primes_fn: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.counters_fn = counters_fn
        self.primes_fn = primes_fn
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._started = time.monotonic()

    async def start(self) -> None:
        # limit: a request head longer than this fails readuntil, so it costs no memory.
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started = time.monotonic()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "MetricsServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        """(status line, content type, body) for one request."""
        if method not in ("GET", "HEAD"):  # HTTP requires HEAD wherever GET is served
            return "405 Method Not Allowed", "text/plain", b"only GET or HEAD\n"
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/health"):
            return "404 Not Found", "text/plain", b"try /metrics or /health\n"
        try:
            counters = self.counters_fn()
            primes = self.primes_fn() if self.primes_fn is not None else None
        except Exception:  # a broken callback is a 500, never a dead server
            log.exception("counters callback failed")
            return "500 Internal Server Error", "text/plain", b"counters unavailable\n"
        uptime = time.monotonic() - self._started
        if path == "/metrics":
            body = render_prometheus(counters, uptime, primes)
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", body.encode()
        health = {"status": "ok", "uptime_s": round(uptime, 3),
                  "devices": sorted(d for d in counters if not d.startswith("_")),
                  "counters": {d: dict(c) for d, c in counters.items()}}
        if primes is not None:
            health["primes"] = primes
        # to_json: NaN/inf become null; json.dumps would write NaN, which is not JSON.
        return "200 OK", "application/json", to_json(health).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                status, kind, body = "400 Bad Request", "text/plain", b"bad request line\n"
            else:
                status, kind, body = self._answer(parts[0], parts[1])
            payload = b"" if parts[:1] == ["HEAD"] else body  # HEAD: GET's headers, no body
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + payload)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went quiet, went away or sent too much: nothing to answer
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                pass
