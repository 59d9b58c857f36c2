"""The engine's stop budget, from review: sources close side by side (one hanging must not
use up the others' time), a source's own clean-up on cancellation is bounded too, and a
source that fails to close is counted, whatever it raises."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from echopulse.stream.engine import ENGINE_DEVICE, Engine
from echopulse.stream.publish import Publisher
from echopulse.stream.session import EngineLimits

from test_engine import HangsOnClose, ListSource, StubBackend, chunks

pytestmark = pytest.mark.network

STOP_S = 0.6


class ClosesIn(ListSource):
    """A source that closes cleanly, after `delay` seconds (a broker's disconnect)."""

    def __init__(self, items, delay: float) -> None:
        super().__init__(items, hold=60.0)
        self.delay, self.closed = delay, False

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.sleep(self.delay)
        self.closed = True


class CleansUpForEver:
    """An async generator source whose clean-up (an `async with client` inside it) runs when
    its pump is cancelled, and hangs until released."""

    def __init__(self, items, release: asyncio.Event) -> None:
        self.items, self.release = list(items), release

    async def _gen(self):
        try:
            for item in self.items:
                yield item
            await asyncio.sleep(60.0)
        finally:
            while not self.release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.release.wait()

    def __aiter__(self):
        return self._gen()


class FailsToClose(ListSource):
    """A source whose close raises `error` (asynchronously, or at the call when `at_call`)."""

    def __init__(self, items, error: BaseException, at_call: bool = False) -> None:
        super().__init__(items, hold=60.0)
        self.error, self.at_call = error, at_call

    async def __aenter__(self):
        return self

    def __aexit__(self, *exc):
        if self.at_call:
            raise self.error
        return self._raise()

    async def _raise(self) -> None:
        await asyncio.sleep(0)
        raise self.error


async def stop_after(engine: Engine, seconds: float = 0.5, limit: float = 5.0) -> float:
    """Run the engine, stop it after `seconds`, and time the stop (fails past `limit`)."""
    run = asyncio.create_task(engine.run())
    await asyncio.sleep(seconds)
    t0 = time.monotonic()
    engine.stop()
    done, _ = await asyncio.wait({run}, timeout=limit)  # not wait_for: it would wait for a hung run's cancellation
    assert done, f"the stop took more than {limit} s"
    run.result()
    return time.monotonic() - t0


def engine_of(pub: Publisher, sources) -> Engine:
    return Engine(sources, StubBackend(), pub, None, limits=EngineLimits(stop_timeout_s=STOP_S, beat_queue=64))


async def test_a_source_hanging_on_close_leaves_the_others_their_time(tmp_path):
    # closed last to first: the hanging one first used the whole budget, and the one behind
    # it, which needed 0.2 s, was cancelled unclosed and counted as left open too
    release = asyncio.Event()
    polite = ClosesIn(chunks("a", 2), delay=0.2)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = engine_of(pub, [polite, HangsOnClose(chunks("b", 2), release)])
        try:
            waited = await stop_after(engine)
        finally:
            release.set()
    assert polite.closed
    assert engine.counters()[ENGINE_DEVICE]["sources_left_open"] == 1
    assert waited < STOP_S + 0.5


async def test_a_source_cleaning_up_for_ever_when_its_pump_is_cancelled_is_left_behind(tmp_path):
    # once: the stop waited for the pump's cancellation, that is for ever
    release = asyncio.Event()
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = engine_of(pub, [CleansUpForEver(chunks("a", 2), release), ListSource(chunks("b", 2), hold=60.0)])
        try:
            waited = await stop_after(engine)
        finally:
            release.set()
            await asyncio.sleep(0.05)  # let the pump left behind finish
    assert waited < STOP_S + 0.5
    assert engine.counters()[ENGINE_DEVICE]["sources_left_open"] == 1


@pytest.mark.parametrize("error, at_call", [(RuntimeError("broker gone"), False), (RuntimeError("broker gone"), True),
                                            (asyncio.CancelledError(), False)])
async def test_a_source_failing_to_close_is_counted_and_the_stop_goes_on(tmp_path, error, at_call):
    # once: logged only (async), or the exception (at the call, or a CancelledError) ended run()
    # and with it the other source's close
    other = ClosesIn(chunks("b", 2), delay=0.0)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = engine_of(pub, [other, FailsToClose(chunks("a", 2), error, at_call)])
        await stop_after(engine)
    counters = engine.counters()[ENGINE_DEVICE]
    assert counters["source_close_failures"] == 1 and "sources_left_open" not in counters
    assert other.closed
