"""MqttSource against a real mosquitto broker (tests/conftest.py)."""
from __future__ import annotations

import asyncio
import logging
import base64
import json
import uuid

import aiomqtt
import msgpack
import numpy as np
import pytest

from echopulse.bridges import status
from echopulse.bridges.backoff import Backoff
from echopulse.bridges.chunk import EcgChunk
from echopulse.bridges.mqtt import MqttSource
from echopulse.bridges.status import SourceStatus

pytestmark = pytest.mark.network

FAST = Backoff(initial=0.05, maximum=0.3)


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def next_where(source: MqttSource, pred, timeout: float = 5.0):
    """The next item satisfying `pred`, skipping others."""
    async with asyncio.timeout(timeout):
        async for item in source:
            if pred(item):
                return item
    raise AssertionError("source ended")


async def take(source: MqttSource, n: int, pred, timeout: float = 5.0) -> list:
    out = []
    async with asyncio.timeout(timeout):
        async for item in source:
            if pred(item):
                out.append(item)
                if len(out) == n:
                    return out
    raise AssertionError("source ended")


def is_status(code: str):
    return lambda item: isinstance(item, SourceStatus) and item.code == code


def is_chunk(item) -> bool:
    return isinstance(item, EcgChunk)


async def publish(broker, topic: str, payloads: list[bytes]) -> None:
    async with asyncio.timeout(5):
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            for p in payloads:
                await pub.publish(topic, p, qos=1)


def js(**kw) -> bytes:
    return json.dumps(kw).encode()


def mp(**kw) -> bytes:
    return msgpack.packb(kw, use_bin_type=True)


async def test_three_devices_all_payload_forms(running_broker) -> None:
    pre = prefix()
    x = np.arange(8, dtype=np.float32)
    two = np.stack([x, -x])
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        await publish(running_broker, f"{pre}/a", [js(fs=250, t0=1.0, seq=0, unit="mV", samples=x.tolist())])
        await publish(running_broker, f"{pre}/b", [js(fs=250, t0=2.0, seq=5, unit="uV", samples=(two * 1000).tolist())])
        await publish(
            running_broker,
            f"{pre}/c",
            [
                mp(fs=130, t0=3.0, seq=1, unit="µV", samples=(two * 1000).astype("<f4").tobytes(), shape=[2, 8]),
                js(fs=130, t0=3.1, seq=2, unit="V", samples=base64.b64encode((x / 1000).astype("<f4").tobytes()).decode(), shape=[8]),
            ],
        )
        chunks = await take(src, 4, is_chunk)
    by = {(c.device, c.seq): c for c in chunks}
    assert set(by) == {("a", 0), ("b", 5), ("c", 1), ("c", 2)}
    for c in chunks:
        assert c.samples.dtype == np.float32 and c.unit == "mV"
    np.testing.assert_allclose(by["a", 0].samples, x[None])
    np.testing.assert_allclose(by["b", 5].samples, two, rtol=1e-6)
    np.testing.assert_allclose(by["c", 1].samples, two, rtol=1e-6)
    np.testing.assert_allclose(by["c", 2].samples, x[None], rtol=1e-6)
    assert by["b", 5].fs == 250 and by["c", 1].t0 == 3.0
    assert src.counters["chunks"] == 4


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", status.MALFORMED),
        (b"\xc1\xc1\xc1", status.MALFORMED),  # 0xc1 is never valid msgpack
        (js(fs=250, unit="furlong", samples=[1.0]), status.UNKNOWN_UNIT),
        (js(fs=250, unit="mV", samples=[[1.0, 2.0], [3.0]]), status.BAD_SHAPE),
        (js(fs=250, unit="mV", samples=[[[1.0]]]), status.BAD_SHAPE),
        (js(fs=250, unit="mV", samples=[[0.0] * 4] * 13), status.BAD_SHAPE),
        (mp(fs=250, unit="mV", samples=b"\x00" * 12, shape=[2, 2]), status.BAD_SHAPE),
        (js(fs=-1, unit="mV", samples=[1.0]), status.BAD_FIELD),
        (js(unit="mV", samples=[1.0]), status.BAD_FIELD),
        (b"[1, 2]", status.MALFORMED),
        (js(fs=250, unit="mV", samples=[0.0] * 40000), status.OVERSIZED),
        (js(fs=250, unit=["mV"], samples=[1.0]), status.UNKNOWN_UNIT),  # unhashable: once a TypeError
        (b'{"fs": 1' + b"0" * 400 + b', "unit": "mV", "samples": [1.0]}', status.BAD_FIELD),  # once an OverflowError
        (b'{"fs": 250, "unit": "mV", "samples": [1' + b"0" * 400 + b"]}", status.BAD_SHAPE),
        (b'{"a": ' + b"[" * 30000 + b"]" * 30000 + b"}", status.MALFORMED),  # once a RecursionError
    ],
)
async def test_bad_payloads_become_status_and_count(running_broker, payload: bytes, code: str) -> None:
    pre = prefix()
    good = js(fs=250, t0=0.0, seq=0, unit="mV", samples=[1.0, 2.0])
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST, max_payload=100_000) as src:
        await next_where(src, is_status(status.CONNECTED))
        await publish(running_broker, f"{pre}/dev1", [payload, good])
        bad = await next_where(src, lambda i: isinstance(i, SourceStatus) and i.device == "dev1")
        assert bad.code == code, bad
        # the source goes on: the good message after the bad one arrives
        chunk = await next_where(src, is_chunk)
        assert chunk.device == "dev1" and chunk.n_samples == 2
        assert src.counters[code] == 1 and src.counters["chunks"] == 1
        assert src.counters[status.DISCONNECTED] == 0  # one bad message never costs the connection


async def test_missing_seq_and_t0_are_filled_in(running_broker) -> None:
    pre = prefix()
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        await publish(running_broker, f"{pre}/d", [js(fs=100, unit="mV", samples=[0.0] * 10)] * 3)
        chunks = await take(src, 3, is_chunk)
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert all(np.isfinite(c.t0) for c in chunks)


async def test_reconnects_after_broker_restart(running_broker) -> None:
    pre = prefix()
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        await publish(running_broker, f"{pre}/d", [js(fs=100, seq=0, t0=0, unit="mV", samples=[1.0])])
        assert (await next_where(src, is_chunk)).seq == 0
        await asyncio.to_thread(running_broker.stop)
        await next_where(src, is_status(status.DISCONNECTED))
        await asyncio.to_thread(running_broker.start)
        await next_where(src, is_status(status.RECONNECTED), timeout=10)
        # re-subscribed: new messages arrive
        await publish(running_broker, f"{pre}/d", [js(fs=100, seq=1, t0=0.01, unit="mV", samples=[2.0])])
        chunk = await next_where(src, is_chunk)
    assert chunk.seq == 1 and chunk.device == "d"
    assert src.counters[status.DISCONNECTED] == 1 and src.counters[status.RECONNECTED] == 1


async def test_unreachable_broker_retries_without_raising(unused_port: int) -> None:
    src = MqttSource("127.0.0.1", unused_port, backoff=FAST, connect_timeout=1)
    try:
        first = await next_where(src, lambda i: True)
        second = await next_where(src, lambda i: True)
    finally:
        await src.aclose()
    assert first.code == second.code == status.CONNECT_FAILED
    assert src.counters[status.CONNECT_FAILED] >= 2


async def test_overflow_drops_oldest_and_reports(running_broker) -> None:
    pre = prefix()
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST, queue_size=3) as src:
        await next_where(src, is_status(status.CONNECTED))
        payloads = [js(fs=100, seq=i, t0=i * 0.01, unit="mV", samples=[float(i)]) for i in range(10)]
        await publish(running_broker, f"{pre}/d", payloads)
        # let the source take all ten in while nobody reads
        async with asyncio.timeout(5):
            while src.counters["chunks"] < 10:
                await asyncio.sleep(0.01)
        first = await next_where(src, lambda i: True)
        rest = await take(src, 3, is_chunk)
    assert first.code == status.OVERFLOW and "7" in first.message
    assert [c.seq for c in rest] == [7, 8, 9]  # the newest kept
    assert src.counters["dropped"] == 7


async def test_username_password(auth_broker) -> None:
    pre = prefix()
    wrong = MqttSource(auth_broker.host, auth_broker.port, f"{pre}/+", username="ecg", password="nope", backoff=FAST)
    try:
        refused = await next_where(wrong, lambda i: True)
    finally:
        await wrong.aclose()
    assert refused.code == status.CONNECT_FAILED and "auth" in refused.message.lower()
    async with MqttSource(auth_broker.host, auth_broker.port, f"{pre}/+", username="ecg", password="s3cret", backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        async with asyncio.timeout(5):
            async with aiomqtt.Client(auth_broker.host, auth_broker.port, username="ecg", password="s3cret") as pub:
                await pub.publish(f"{pre}/d", js(fs=100, unit="mV", samples=[1.0]), qos=1)
        assert (await next_where(src, is_chunk)).device == "d"


async def test_persistent_session_keeps_messages_while_away(running_broker) -> None:
    """With a client id, QoS 1 messages sent while the source is away wait at the broker."""
    pre = prefix()
    cid = f"{pre}-engine"
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", client_id=cid, backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
    await publish(running_broker, f"{pre}/d", [js(fs=100, seq=i, unit="mV", samples=[float(i)]) for i in range(3)])
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", client_id=cid, backoff=FAST) as src:
        chunks = await take(src, 3, is_chunk)
    assert [c.seq for c in chunks] == [0, 1, 2]


async def test_tls(tls_broker) -> None:
    import ssl

    pre = prefix()
    ctx = ssl.create_default_context(cafile=str(tls_broker.cafile))
    async with MqttSource(tls_broker.host, tls_broker.port, f"{pre}/+", tls=ctx, backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        async with asyncio.timeout(5):
            async with aiomqtt.Client(tls_broker.host, tls_broker.port, tls_context=ctx) as pub:
                await pub.publish(f"{pre}/d", js(fs=100, unit="mV", samples=[1.0, 2.0]), qos=1)
        assert (await next_where(src, is_chunk)).n_samples == 2
    # a client that does not trust the certificate never gets in, and says so
    untrusting = MqttSource(tls_broker.host, tls_broker.port, f"{pre}/+", tls=ssl.create_default_context(), backoff=FAST)
    try:
        refused = await next_where(untrusting, lambda i: True)
    finally:
        await untrusting.aclose()
    assert refused.code == status.CONNECT_FAILED and "certificate" in refused.message.lower()


async def test_retained_message_is_skipped_not_taken_for_live_ecg(running_broker) -> None:
    """The broker re-sends a retained message at every subscribe: it used to arrive as a
    fresh chunk (receiver-stamped at now, numbered anew) after each (re)connect."""
    pre = prefix()
    async with asyncio.timeout(5):
        async with aiomqtt.Client(running_broker.host, running_broker.port) as pub:
            await pub.publish(f"{pre}/d", js(fs=100, unit="mV", samples=[9.0]), qos=1, retain=True)
    try:
        async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST) as src:
            await next_where(src, is_status(status.CONNECTED))
            await publish(running_broker, f"{pre}/d", [js(fs=100, unit="mV", samples=[1.0])])
            chunk = await next_where(src, is_chunk)
        assert chunk.samples[0, 0] == 1.0 and chunk.seq == 0  # the live one is the device's first chunk
        assert src.counters["chunks"] == 1 and src.counters[status.RETAINED] == 1  # the old one: a status
    finally:
        async with asyncio.timeout(5):
            async with aiomqtt.Client(running_broker.host, running_broker.port) as pub:
                await pub.publish(f"{pre}/d", b"", qos=1, retain=True)  # clears it from the shared broker


async def test_chunks_without_t0_arriving_together_stay_contiguous(running_broker) -> None:
    """Stamped by arrival alone, a burst of t0-less chunks (a backlog, network jitter)
    overlapped, and the checker trimmed nine tenths of the ECG away."""
    from echopulse.bridges.validate import ChunkChecker

    pre = prefix()
    async with MqttSource(running_broker.host, running_broker.port, f"{pre}/+", backoff=FAST) as src:
        await next_where(src, is_status(status.CONNECTED))
        await publish(running_broker, f"{pre}/d", [js(fs=250, unit="mV", samples=[0.0] * 25)])
        first = await next_where(src, is_chunk)
        await asyncio.sleep(0.8)  # silent for longer than MAX_LATE_S: a gap, stamped at arrival again
        await publish(running_broker, f"{pre}/d", [js(fs=250, unit="mV", samples=[0.1 * (i % 3)] * 25) for i in range(10)])
        chunks = await take(src, 10, is_chunk)
    assert first.t0 == pytest.approx(first.received - 0.1, abs=1e-6)
    assert chunks[0].t0 > first.t_end + 0.5
    assert all(b.t0 == pytest.approx(a.t_end, abs=1e-9) for a, b in zip(chunks, chunks[1:]))
    checker = ChunkChecker()
    kept = [checker.check(c).chunk for c in chunks]
    assert sum(c.n_samples for c in kept if c is not None) == 250


async def fight_for_one_client_id(broker, seconds: float) -> list[MqttSource]:
    """Two sources sharing a client id, drained for `seconds`: each connect takes the
    session from the other. Returns them, closed."""
    pre = prefix()
    cid = f"{pre}-shared"
    # connect_timeout: aiomqtt now and then loses a connect whose socket the broker closed at
    # once, and waits out the timeout before it retries
    sources = [MqttSource(broker.host, broker.port, f"{pre}/+", client_id=cid, connect_timeout=0.5,
                          backoff=Backoff(initial=0.05, maximum=0.3)) for _ in range(2)]

    async def drain(src: MqttSource) -> None:
        async for _ in src:
            pass

    async with sources[0], sources[1]:
        tasks = [asyncio.create_task(drain(s)) for s in sources]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return sources


async def test_two_sources_sharing_a_client_id_back_off(running_broker) -> None:
    """Each connect takes the session from the other. With the backoff reset at every
    connect they reconnected at the initial delay for ever (dozens of times a second)."""
    sources = await fight_for_one_client_id(running_broker, 2.0)
    assert sum(s.counters[status.DISCONNECTED] for s in sources) >= 2  # they did fight
    assert max(s.backoff.attempt for s in sources) >= 3  # and the delays grew
    assert sum(s.counters[status.RECONNECTED] for s in sources) <= 20  # not ~80 in 2 s


async def test_a_lost_connection_leaves_no_unretrieved_error_behind(running_broker, caplog) -> None:
    """aiomqtt keeps why a connection ended in a future only its own waiters read. Once
    asyncio logged "Future exception was never retrieved" for every disconnection when
    the future was collected: a traceback in a daemon's log, in whatever ran then."""
    import gc

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await fight_for_one_client_id(running_broker, 1.5)  # lost connections, both ways
        gc.collect()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
