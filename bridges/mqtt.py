"""ECG from an MQTT broker (aiomqtt 2.x), one device per topic.

    async with MqttSource("broker.local", 1883, "ecg/+") as source:
        async for item in source:          # EcgChunk or SourceStatus
            ...

The device id is the topic's last level (`ecg/strap-7` → "strap-7"); payloads are
decoded by `payload.decode_payload` (JSON or msgpack, format documented there). Retained
messages are skipped with a `retained` status: the broker re-sends its stored copy at
every subscribe, so it is old ECG, not a new chunk.

Reliability (REFERENCE "Streaming reliability facts"): a loop around `async with
aiomqtt.Client`, re-subscribing after every connect, with capped jittered exponential
backoff; aiomqtt's own incoming queue stays unbounded (bounding it drops silently) and is
drained at once into our `DropOldestQueue`, which counts what it drops. With a
`client_id` the session is persistent (clean_session=False), so the broker keeps QoS 1
messages for us while we are away.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Union

import aiomqtt

from . import status
from .backoff import Backoff
from .chunk import EcgChunk
from .payload import PayloadError, decode_payload
from .background import BackgroundSource
from .status import SourceStatus

log = logging.getLogger(__name__)

Item = Union[EcgChunk, SourceStatus]

# Chunks without t0 follow on from the device's previous chunk while their arrival is at
# most this late (network jitter; later: a pause or lost chunks, a gap) or this early (a
# backlog delivered at once runs ahead of the arrival clock by its length).
MAX_LATE_S = 0.5
MAX_AHEAD_S = 60.0


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho-mqtt 2.2 drops its socket unclosed when the TLS handshake fails (bad
    certificate, plain-text port): one leaked descriptor and ResourceWarning per retry of
    the reconnect loop. This socket closes itself when its handshake fails."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _read_disconnect_reason(client: Any) -> None:
    """aiomqtt keeps why a connection ended in a future that only its own waiters read;
    read it when it is set, or asyncio logs "Future exception was never retrieved" with a
    traceback at every lost connection (the reason reaches us as the MqttError anyway)."""
    future = getattr(client, "_disconnected", None)  # private: nothing to do if it moves
    if isinstance(future, asyncio.Future):
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


class MqttSource(BackgroundSource):
    """Async iterator of `EcgChunk` / `SourceStatus` from topics matching `topic_filter`.

    Counters (`self.counters`): "chunks", "samples", one per status code, and
    "dropped" (items our bounded queue gave up under overload).
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        topic_filter: str = "ecg/+",
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        client_id: str | None = None,
        qos: int = 1,
        max_payload: int = 262144,
        queue_size: int = 4096,
        *,
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
        keepalive: int = 10,
    ) -> None:
        super().__init__(queue_size, f"mqtt-{host}:{port}")
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.username = username
        self.password = password
        self.tls = tls
        if tls is not None and tls.sslsocket_class is ssl.SSLSocket:
            tls.sslsocket_class = _ClosingSSLSocket  # documented hook; only adds the close
        self.client_id = client_id
        self.qos = qos
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.backoff = backoff or Backoff()
        self._seq: dict[str, int] = {}  # our numbering for devices that send no seq
        self._clock: dict[str, tuple[int, float, float]] = {}  # devices that send no t0: (seq, t_end, fs) of the last chunk

    # -- connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        connected_before = False
        while True:
            client = aiomqtt.Client(
                self.host,
                self.port,
                username=self.username,
                password=self.password,
                identifier=self.client_id,
                # A stable id gets a persistent session: the broker queues QoS>=1 for us.
                clean_session=False if self.client_id else None,
                tls_context=self.tls,
                timeout=self.connect_timeout,
                keepalive=self.keepalive,
            )
            live, since = False, 0.0
            # Both futures: a session takeover can end the connection inside __aenter__,
            # which then swaps in a new one.
            _read_disconnect_reason(client)
            try:
                async with client:
                    _read_disconnect_reason(client)
                    await client.subscribe(self.topic_filter, qos=self.qos)
                    live, since = True, time.monotonic()
                    code = status.RECONNECTED if connected_before else status.CONNECTED
                    connected_before = True
                    self._emit(SourceStatus(None, code, f"subscribed to {self.topic_filter} on {self.host}:{self.port}"))
                    async for message in client.messages:
                        self._handle(str(message.topic), message.payload, bool(message.retain))
            except aiomqtt.MqttError as exc:
                code = status.DISCONNECTED if live else status.CONNECT_FAILED
                self._emit(SourceStatus(None, code, f"{self.host}:{self.port}: {exc}"))
            except Exception as exc:  # a bug must not end the loop silently: the consumer would wait forever
                log.exception("mqtt %s:%s: unexpected error", self.host, self.port)
                code = status.DISCONNECTED if live else status.CONNECT_FAILED
                self._emit(SourceStatus(None, code, f"{self.host}:{self.port}: {type(exc).__name__}: {exc}"))
            if live:
                self.backoff.connection_ended(time.monotonic() - since)
            delay = self.backoff.next_delay()
            log.info("mqtt %s:%s: retrying in %.2f s", self.host, self.port, delay)
            await asyncio.sleep(delay)

    def _emit(self, item: Item) -> None:
        if isinstance(item, SourceStatus):
            self.counters[item.code] += 1
            log.log(status.log_level(item.code), "%s %s: %s", item.device or "-", item.code, item.message)
        self._queue.put_nowait(item)

    def _handle(self, topic: str, payload: object, retained: bool = False) -> None:
        device = topic.rsplit("/", 1)[-1]
        if not device:
            self._emit(SourceStatus(None, status.BAD_TOPIC, f"no device id in topic {topic!r}"))
            return
        if retained:  # re-sent by the broker at every (re)subscribe: old ECG, not a new chunk
            self._emit(SourceStatus(device, status.RETAINED, "retained message skipped; publish ECG without retain"))
            return
        if not isinstance(payload, (bytes, bytearray)):
            self._emit(SourceStatus(device, status.MALFORMED, f"payload of type {type(payload).__name__}"))
            return
        try:
            decoded = decode_payload(bytes(payload), self.max_payload)
        except PayloadError as exc:
            self._emit(SourceStatus(device, exc.code, str(exc)))
            return
        except Exception as exc:  # a decoder gap must cost one message, not the broker connection
            log.exception("mqtt %s: payload the decoder did not foresee", device)
            self._emit(SourceStatus(device, status.MALFORMED, f"undecodable payload: {type(exc).__name__}: {exc}"))
            return
        n = decoded.samples.shape[1]
        seq = decoded.seq
        if seq is None:
            seq = self._seq.get(device, -1) + 1
        self._seq[device] = seq
        now = time.monotonic()
        if decoded.t0 is not None:
            t0 = decoded.t0
            self._clock.pop(device, None)
        else:
            t0 = self._receiver_t0(device, seq, n, decoded.fs, now)
        self.counters["chunks"] += 1
        self.counters["samples"] += n
        self._emit(EcgChunk(device=device, samples=decoded.samples, fs=decoded.fs, t0=t0, seq=seq, unit="mV", received=now))

    def _receiver_t0(self, device: str, seq: int, n: int, fs: float, now: float) -> float:
        """t0 for a chunk that brought none. Arrival times jitter and come in bursts (a
        backlog after an outage): stamped by arrival alone, consecutive chunks overlap or
        part, and the checker trims the overlaps away (a burst of ten lost nine tenths).
        So a device's next chunk (seq one up, same rate) starts where its previous one
        ended, while that stays within MAX_LATE_S before, or MAX_AHEAD_S after, its
        arrival; otherwise (a first chunk, a pause, lost chunks) at arrival − duration."""
        arrival = now - n / fs
        t0 = arrival
        last = self._clock.get(device)
        if last is not None:
            last_seq, last_end, last_fs = last
            if last_seq + 1 == seq and last_fs == fs and -MAX_AHEAD_S <= arrival - last_end <= MAX_LATE_S:
                t0 = last_end
        self._clock[device] = (seq, t0 + n / fs, fs)
        return t0
