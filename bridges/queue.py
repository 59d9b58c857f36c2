"""A bounded queue that drops its oldest item when full, and counts what it dropped.

Sources fill it from network callbacks and never block there; under overload the newest
ECG is worth more than the oldest (latency stays bounded), so the oldest goes.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0  # total ever dropped

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> bool:
        """Append; returns True when an old item was dropped to make room. O(1), sync:
        safe to call from a notification callback on the event loop's thread."""
        dropped = len(self._items) >= self.maxsize
        if dropped:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()
        return dropped

    async def get(self) -> T:
        await self.wait()
        return self._items.popleft()

    async def wait(self) -> None:
        """Until an item is queued. Takes none, so a waiter cancelled in between (a timeout
        around the consumer's `anext`) cannot carry an item off with it."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()

    def get_nowait(self) -> T:
        """The oldest item; IndexError when empty."""
        return self._items.popleft()
