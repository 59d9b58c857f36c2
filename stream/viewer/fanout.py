"""Fan-out to browsers: one bounded mailbox per client; when it is full, the newest frames win.

The engine publishes a beat's frames in one burst, so a client must be able to hold a
beat or two of frames per device (the page plays them out at their ECG times). A
browser that reads slower than frames arrive must not make the viewer buffer without
bound or show ever older frames: past `max_frames` per device the oldest waiting frame
is dropped (counted in `skipped`). Events (status messages, stats) have their own short
queue, oldest dropped first.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Union

Payload = Union[bytes, str]

MAX_FRAMES = 32  # per device and client: two beats of 11-16 frames


class ClientFeed:
    """What one browser has yet to receive."""

    def __init__(self, max_frames: int = MAX_FRAMES, max_events: int = 64) -> None:
        self.max_frames = max_frames
        self._frames: dict[str, deque[bytes]] = {}
        self._events: deque[str] = deque(maxlen=max_events)
        self._ready = asyncio.Event()
        self.skipped = 0  # frames dropped before they were sent

    def put_frame(self, device: str, payload: bytes) -> None:
        queue = self._frames.setdefault(device, deque(maxlen=self.max_frames))
        if len(queue) == queue.maxlen:
            self.skipped += 1  # deque drops the oldest itself
        queue.append(payload)
        self._ready.set()

    def put_event(self, payload: str) -> None:
        self._events.append(payload)
        self._ready.set()

    async def take(self, timeout: float) -> list[Payload]:
        """Everything pending, events first, frames in arrival order per device; [] after `timeout` s."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return []
        self._ready.clear()
        batch: list[Payload] = list(self._events)
        self._events.clear()
        for queue in self._frames.values():
            batch.extend(queue)
        # all sent: a browser open for months sees ids come and go, and would keep a queue for each
        self._frames.clear()
        return batch


class Fanout:
    """The set of connected clients; put_* deliver to all of them without waiting."""

    def __init__(self, max_frames: int = MAX_FRAMES) -> None:
        self.max_frames = max_frames
        self.clients: set[ClientFeed] = set()

    def add(self) -> ClientFeed:
        feed = ClientFeed(self.max_frames)
        self.clients.add(feed)
        return feed

    def remove(self, feed: ClientFeed) -> None:
        self.clients.discard(feed)

    def put_frame(self, device: str, payload: bytes) -> None:
        for feed in self.clients:
            feed.put_frame(device, payload)

    def put_event(self, payload: str) -> None:
        for feed in self.clients:
            feed.put_event(payload)
