"""Python subscriber API for protocol v1: decoded frames and status messages, with gap counting.

    with Subscriber("tcp://127.0.0.1:5556") as sub:
        for msg in sub.messages(timeout=5.0):
            if isinstance(msg, FrameMessage): show(msg.pixels)

    async with AsyncSubscriber(endpoint, topics=("echo/dev1",)) as sub:
        msg = await sub.recv(timeout=1.0)

ZeroMQ subscribers miss whatever was published before they connected (slow joiner),
and PUB drops past its high-water mark; `FrameMessage.gap` and :attr:`lost` say how
many frames of a device were missed, from the per-device `seq`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, AsyncIterator, Iterable, Iterator

import zmq
import zmq.asyncio

from . import protocol
from .logs import RateLimitedLog
from .protocol import FrameMessage, Message

log = logging.getLogger(__name__)

DEFAULT_TOPICS = (protocol.FRAME_PREFIX, protocol.STATUS_PREFIX)


class _SubscriberCore:
    """What the sync and async subscribers share: the SUB socket's set-up and closing, and
    per-device seq bookkeeping. Subclasses name their ZeroMQ context class."""

    _context_class: type[zmq.Context] = zmq.Context

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] = DEFAULT_TOPICS,
        *,
        rcvhwm: int = 10_000,
        context: zmq.Context | None = None,
    ) -> None:
        self.last_seq: dict[str, int] = {}
        self.lost: dict[str, int] = {}        # frames missed (seq jumped forward)
        self.restarts: dict[str, int] = {}    # seq went back: the publisher restarted
        # messages that failed to decode: counted, and logged at a bounded rate (anyone may
        # publish to the endpoint: a stream of bad messages must not fill the log)
        self.malformed = RateLimitedLog(log, "dropping malformed message")
        self._own_context = context is None
        self._context = context or self._context_class()
        self._socket = self._context.socket(zmq.SUB)
        try:
            _subscribe(self._socket, endpoint, topics, rcvhwm)
        except zmq.ZMQError as err:
            self.close()
            raise OSError(f"cannot connect to {endpoint}: {err}") from None

    @property
    def errors(self) -> int:
        """Messages that failed to decode."""
        return self.malformed.count

    def close(self) -> None:
        self.malformed.flush(force=True)  # the count held back by the rate limit, not lost at exit
        if not self._socket.closed:
            self._socket.close(linger=0)
        if self._own_context and not self._context.closed:
            self._context.term()

    def _wait_ms(self, deadline: float | None) -> int | None:
        """How long a poll may wait: what is left of the timeout, but no later than when the
        bad messages held back by the log's rate limit are due (they would otherwise wait
        for the next bad message, however long that takes)."""
        left = _remaining_ms(deadline)
        due = self.malformed.due_in()
        if due is None:
            return left
        due_ms = math.ceil(due * 1000)
        return due_ms if left is None else min(left, due_ms)

    def decode(self, parts: list) -> Message | None:
        try:
            msg = protocol.decode(parts)
        except Exception as err:  # ProtocolError, or a decoder bug on bytes nobody foresaw
            self.malformed(f"{_topic(parts)}: {err}")
            return None
        if not isinstance(msg, FrameMessage):
            return msg
        device, seq = msg.device, msg.seq
        last = self.last_seq.get(device)
        self.last_seq[device] = seq
        if last is None or seq == last + 1:
            return msg
        if seq > last + 1:
            gap = seq - last - 1
            self.lost[device] = self.lost.get(device, 0) + gap
            return dataclasses.replace(msg, gap=gap)
        self.restarts[device] = self.restarts.get(device, 0) + 1
        return msg


def _topic(parts: Any) -> str:
    try:
        return repr(bytes(parts[0])[:80])
    except Exception:  # no parts, or a part that is not a buffer
        return "?"


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _remaining_ms(deadline: float | None) -> int | None:
    """What is left of a recv's timeout, for poll (None: wait forever)."""
    return None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _subscribe(socket: zmq.Socket, endpoint: str, topics: Iterable[str], rcvhwm: int) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, rcvhwm)
    for topic in topics:
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
    socket.connect(endpoint)


class Subscriber(_SubscriberCore):
    """Blocking subscriber. `topics` are prefixes (``"echo/"``, ``"status/dev1"``)."""

    _context_class = zmq.Context

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next valid message, or None after `timeout` seconds (None: wait forever).

        Malformed messages are counted in :attr:`errors` and skipped; they do not restart
        the timeout (a stream of nothing but bad messages must not block the caller forever).
        """
        deadline = _deadline(timeout)
        while True:
            ready = self._socket.poll(self._wait_ms(deadline))
            self.malformed.flush()
            if ready:
                msg = self.decode(self._socket.recv_multipart(copy=False))
                if msg is not None:
                    return msg
            if _expired(deadline):
                return None

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Yield messages until none arrives for `timeout` seconds."""
        while (msg := self.recv(timeout)) is not None:
            yield msg

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscriber(_SubscriberCore):
    """asyncio subscriber (zmq.asyncio); same bookkeeping as :class:`Subscriber`."""

    _context_class = zmq.asyncio.Context

    async def recv(self, timeout: float | None = None) -> Message | None:
        """The next valid message, or None after `timeout` seconds (None: wait forever);
        malformed messages are skipped without restarting the timeout, as in :class:`Subscriber`."""
        deadline = _deadline(timeout)
        while True:
            ready = await self._socket.poll(self._wait_ms(deadline))
            self.malformed.flush()
            if ready:
                msg = self.decode(await self._socket.recv_multipart(copy=False))
                if msg is not None:
                    return msg
            if _expired(deadline):
                return None

    async def messages(self, timeout: float | None = None) -> AsyncIterator[Message]:
        """Yield messages until none arrives for `timeout` seconds."""
        while (msg := await self.recv(timeout)) is not None:
            yield msg

    async def __aenter__(self) -> "AsyncSubscriber":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
