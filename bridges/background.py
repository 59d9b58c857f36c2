"""The shape shared by the network sources (MQTT, BLE): a background task that keeps a
connection alive and fills a bounded queue; the consumer iterates over the queue.

    async with SomeSource(...) as source:   # starts the task; closing stops it
        async for item in source:
            ...

Iterating without `async with` starts the task on the first `__anext__`; then call
`aclose()` when done (the task otherwise lives until the event loop ends).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import status
from .queue import DropOldestQueue
from .status import SourceStatus, new_counters

log = logging.getLogger(__name__)


class BackgroundSource:
    """Subclasses implement `_run()` (the connection loop, putting items with
    `self._queue.put_nowait`) and may override `_convert()` (queued item → yielded item)."""

    def __init__(self, queue_size: int, name: str, device: str | None = None) -> None:
        self.counters = new_counters()
        self._queue: DropOldestQueue[Any] = DropOldestQueue(queue_size)
        self._reported_drops = 0
        self._name = name
        self._overflow_device = device
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def _run(self) -> None:
        raise NotImplementedError

    def _convert(self, item: Any) -> Any:
        return item

    async def __aenter__(self) -> Any:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the background task (done by `async with` or the first `__anext__`)."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop the task; it releases its connection on the way out."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, timeout)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                pass
            except Exception as exc:  # the task had died; `__anext__` raised it to the consumer
                log.warning("%s had stopped: %s: %s", self._name, type(exc).__name__, exc)
            self._task = None

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        self.start()
        # Drops are reported on the consumer side, so the report needs no room in the queue.
        if self._queue.dropped > self._reported_drops:
            n = self._queue.dropped - self._reported_drops
            self._reported_drops = self._queue.dropped
            self.counters["dropped"] += n
            return SourceStatus(self._overflow_device, status.OVERFLOW, f"queue full: dropped the {n} oldest item(s)")
        if not len(self._queue):
            await self._wait_for_item()
        return self._convert(self._queue.get_nowait())

    async def _wait_for_item(self) -> None:
        """Wait for the next item or for the task's end, whichever comes first: a connection
        loop that died must reach the consumer as an error, not as a wait that never ends."""
        task = self._task
        assert task is not None
        # The waiter only waits: the item is taken after it, so a consumer cancelled here
        # leaves it queued (a getter task left behind would take the next item and drop it).
        waiter = asyncio.ensure_future(self._queue.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if len(self._queue):
            return
        if task.cancelled() or task.exception() is None:
            raise StopAsyncIteration
        raise RuntimeError(f"{self._name} stopped: {type(task.exception()).__name__}: {task.exception()}") from task.exception()
