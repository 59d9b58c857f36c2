"""Backoff, the drop-oldest queue and payload decoding (no network)."""
from __future__ import annotations

import asyncio
import json
import random

import msgpack
import numpy as np
import pytest

from echopulse.bridges import status
from echopulse.bridges.backoff import Backoff
from echopulse.bridges.payload import PayloadError, decode_payload
from echopulse.bridges.queue import DropOldestQueue


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.5, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(8)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(c * 0.5 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == len(delays)  # jittered: no two equal
    b.reset()
    assert b.next_delay() <= 1.0


def test_backoff_without_jitter_is_exact() -> None:
    b = Backoff(initial=0.5, maximum=3.0, jitter=0.0)
    assert [b.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]


def test_backoff_stays_at_its_cap_for_ever() -> None:
    b = Backoff(initial=0.001, maximum=0.002, jitter=0.0)
    assert max(b.next_delay() for _ in range(5000)) == 0.002  # factor**attempt once overflowed after ~1024 failures


async def test_background_source_whose_task_dies_raises_instead_of_hanging() -> None:
    from echopulse.bridges.background import BackgroundSource

    class Dying(BackgroundSource):
        async def _run(self) -> None:
            self._queue.put_nowait("last words")
            await asyncio.sleep(0.01)
            raise OverflowError("a bug in the connection loop")

    source = Dying(8, "dying")
    assert await asyncio.wait_for(source.__anext__(), 1) == "last words"  # what was queued still arrives
    with pytest.raises(RuntimeError, match="dying stopped: OverflowError"):
        await asyncio.wait_for(source.__anext__(), 1)
    await source.aclose()

    class Quiet(BackgroundSource):
        async def _run(self) -> None:
            await asyncio.sleep(3600)

    quiet = Quiet(8, "quiet")
    waiter = asyncio.ensure_future(quiet.__anext__())
    await asyncio.sleep(0.01)
    await quiet.aclose()  # closing while the consumer waits ends its iteration
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 1)


async def test_queue_drops_oldest_and_counts() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    assert [q.put_nowait(i) for i in range(5)] == [False, False, False, True, True]
    assert q.dropped == 2 and len(q) == 3
    assert [await asyncio.wait_for(q.get(), 1) for _ in range(3)] == [2, 3, 4]


async def test_queue_get_waits_for_put() -> None:
    q: DropOldestQueue[str] = DropOldestQueue(2)
    getter = asyncio.ensure_future(asyncio.wait_for(q.get(), 1))
    await asyncio.sleep(0.01)
    assert not getter.done()
    q.put_nowait("x")
    assert await getter == "x"


def test_payload_non_finite_passes_to_the_checker() -> None:
    # JSON as Python writes it (NaN/Infinity tokens); the checker repairs, not the decoder
    d = decode_payload(json.dumps({"fs": 100, "unit": "mV", "samples": [1.0, float("nan"), float("inf")]}).encode())
    assert np.isnan(d.samples[0, 1]) and np.isinf(d.samples[0, 2])


def test_payload_msgpack_list_of_lists_in_uv() -> None:
    d = decode_payload(msgpack.packb({"fs": 500.0, "t0": 12.5, "seq": 3, "unit": "uV", "samples": [[1000, 2000], [-500, 0]]}))
    np.testing.assert_allclose(d.samples, [[1.0, 2.0], [-0.5, 0.0]])
    assert d.samples.dtype == np.float32 and (d.fs, d.t0, d.seq) == (500.0, 12.5, 3)


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"fs": 100, "unit": "mV", "samples": "!!notbase64", "shape": [2]}, status.MALFORMED),
        ({"fs": 100, "unit": "mV", "samples": "AAAAAA==", "shape": [2]}, status.BAD_SHAPE),
        ({"fs": 100, "unit": "mV", "samples": "AAAAAA==", "shape": [0]}, status.BAD_SHAPE),
        ({"fs": 100, "unit": "mV", "samples": [1], "seq": 1.5}, status.BAD_FIELD),
        ({"fs": 100, "unit": "mV", "samples": [1], "t0": "noon"}, status.BAD_FIELD),
        ({"fs": True, "unit": "mV", "samples": [1]}, status.BAD_FIELD),
        ({"fs": 100, "unit": None, "samples": [1]}, status.UNKNOWN_UNIT),
        ({"fs": 100, "unit": "mV", "samples": []}, status.BAD_SHAPE),
        ({"fs": 100, "unit": "mV", "samples": ["a"]}, status.BAD_SHAPE),
        ({"fs": 100, "unit": ["mV"], "samples": [1]}, status.UNKNOWN_UNIT),
        ({"fs": 10**400, "unit": "mV", "samples": [1]}, status.BAD_FIELD),
        ({"fs": 100, "t0": -(10**400), "unit": "mV", "samples": [1]}, status.BAD_FIELD),
        ({"fs": 100, "unit": "mV", "samples": [10**400]}, status.BAD_SHAPE),
    ],
)
def test_payload_rejections(msg: dict, code: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_payload(json.dumps(msg).encode())
    assert info.value.code == code


def test_payload_nested_past_the_stack_is_malformed() -> None:
    with pytest.raises(PayloadError) as info:
        decode_payload(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert info.value.code == status.MALFORMED


def test_payload_size_limit_configurable() -> None:
    body = json.dumps({"fs": 100, "unit": "mV", "samples": [0.0] * 100}).encode()
    decode_payload(body, max_payload=len(body))
    with pytest.raises(PayloadError) as info:
        decode_payload(body, max_payload=len(body) - 1)
    assert info.value.code == status.OVERSIZED


def test_backoff_resets_only_after_a_connection_that_held() -> None:
    b = Backoff(initial=1.0, maximum=8.0, jitter=0.0, stable_s=10.0)
    assert [b.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]
    b.connection_ended(2.0)  # cut off soon after connecting: keep backing off
    assert b.next_delay() == 8.0
    b.connection_ended(10.0)  # held: the next loss retries quickly
    assert b.next_delay() == 1.0


async def test_timeout_around_anext_loses_no_item() -> None:
    """A consumer that waits with a timeout (`wait_for(anext(source), t)`) once left a
    getter task behind at every timeout; each took the next item and dropped it."""
    from echopulse.bridges.background import BackgroundSource

    class Slow(BackgroundSource):
        async def _run(self) -> None:
            for i in range(3):
                await asyncio.sleep(0.05)
                self._queue.put_nowait(i)
            await asyncio.sleep(3600)

    got: list[int] = []
    async with Slow(8, "slow") as source:
        async with asyncio.timeout(2):
            while len(got) < 3:
                try:
                    got.append(await asyncio.wait_for(anext(source), 0.01))
                except asyncio.TimeoutError:
                    pass
    assert got == [0, 1, 2]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []  # no waiter left behind


def test_payload_json_with_byte_order_mark() -> None:
    # a file saved with a BOM and sent by `mosquitto_pub -f` was read as msgpack and refused
    d = decode_payload(b"\xef\xbb\xbf" + json.dumps({"fs": 100, "unit": "mV", "samples": [1.0, 2.0]}).encode())
    np.testing.assert_allclose(d.samples, [[1.0, 2.0]])


def test_payload_greek_mu_is_microvolts() -> None:
    # U+03BC looks like the micro sign U+00B5; it was refused with "unknown unit 'μV'; known: ... µV"
    d = decode_payload(json.dumps({"fs": 100, "unit": "\u03bcV", "samples": [1000.0]}).encode())
    np.testing.assert_allclose(d.samples, [[1.0]])


def test_payload_base64_with_line_breaks() -> None:
    import base64

    x = np.arange(64, dtype="<f4")
    text = base64.encodebytes(x.tobytes()).decode()  # MIME style: a newline every 76 characters
    assert "\n" in text.strip()
    d = decode_payload(json.dumps({"fs": 100, "unit": "mV", "samples": text, "shape": [64]}).encode())
    np.testing.assert_allclose(d.samples, x[None])
