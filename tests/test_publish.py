"""Publisher → Subscriber over real ZeroMQ sockets on loopback."""
from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np
import pytest

from echopulse.stream import protocol
from echopulse.stream.protocol import FrameMessage, StatusMessage
from echopulse.stream.publish import Publisher
from echopulse.stream.subscribe import AsyncSubscriber, Subscriber

pytestmark = pytest.mark.network


def wait_joined(pub: Publisher, sub: Subscriber, timeout: float = 5.0) -> None:
    """Publish probe statuses until the subscriber sees one (ZeroMQ's slow joiner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish_status("probe", "source", "probe")
        msg = sub.recv(timeout=0.05)
        if isinstance(msg, StatusMessage) and msg.device == "probe":
            while sub.recv(timeout=0.05) is not None:  # drain the other probes
                pass
            return
    raise TimeoutError("subscriber never joined")


def beat_frames(n: int = 10, size: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def send_beat(pub: Publisher, device: str, frames: np.ndarray, beat: int) -> None:
    times = 10.0 + beat * 0.8 + np.arange(len(frames)) * 0.08
    pub.publish_frames(device, frames, times=times, beat=beat, r_time=float(times[0]), rr=0.8, model="sim",
                       capture=time.time())


def test_frames_arrive_with_valid_headers_in_order():
    with Publisher("tcp://127.0.0.1:0") as pub, Subscriber(pub.endpoint) as sub:
        wait_joined(pub, sub)
        frames = [beat_frames(seed=b) for b in range(3)]
        for beat, f in enumerate(frames):
            send_beat(pub, "dev1", f, beat)
        got = list(sub.messages(timeout=1.0))
    assert len(got) == 30 and all(isinstance(m, FrameMessage) for m in got)
    assert [m.seq for m in got] == list(range(30))
    for m in got:
        protocol.validate_header(m.header)
        assert m.gap == 0
        np.testing.assert_array_equal(m.pixels, frames[m.header["beat"]][m.header["frame"]])
        assert m.header["hr"] == pytest.approx(75.0)
        assert 0 <= m.header["latency"] < 5.0
    assert sub.lost == {} and sub.errors == 0


def test_topic_filter_and_status():
    with Publisher("tcp://127.0.0.1:0") as pub, Subscriber(pub.endpoint, topics=("status/", "echo/b")) as sub:
        wait_joined(pub, sub)
        send_beat(pub, "a", beat_frames(2), 0)
        send_beat(pub, "b", beat_frames(2), 0)
        pub.publish_status("a", "signal_lost", "no data for 3 s", {"chunks": 4})
        got = list(sub.messages(timeout=0.5))
    assert [type(m).__name__ for m in got] == ["FrameMessage", "FrameMessage", "StatusMessage"]
    assert {m.device for m in got[:2]} == {"b"}
    assert got[2].status["code"] == "signal_lost" and got[2].status["counters"] == {"chunks": 4}


def test_subscriber_counts_gaps_and_skips_malformed():
    sub_side = Subscriber("tcp://127.0.0.1:1")  # the tracker works without a live peer
    try:
        def parts(seq: int) -> list[bytes]:
            header = {"v": 1, "device": "d", "seq": seq, "beat": 0, "frame": 0, "frames": 1, "t": 0.0,
                      "r_time": 0.0, "rr": 1.0, "hr": 60.0, "model": "sim", "capture": 0.0, "publish": 0.0,
                      "latency": 0.0}
            return [bytes(p) for p in protocol.encode_frame(header, np.zeros((2, 2), np.uint8))]

        seen = [sub_side.decode(parts(s)) for s in (0, 1, 5, 6)]
        assert [m.gap for m in seen] == [0, 0, 3, 0]
        assert sub_side.lost == {"d": 3}
        assert sub_side.decode([b"echo/d", msgpack.packb({"v": 1}), b""]) is None
        assert sub_side.errors == 1
        sub_side.decode(parts(0))
        assert sub_side.restarts == {"d": 1}
    finally:
        sub_side.close()


async def test_async_subscriber_receives_frames():
    with Publisher("tcp://127.0.0.1:0") as pub:
        async with AsyncSubscriber(pub.endpoint, topics=("echo/",)) as sub:
            got = []
            deadline = time.monotonic() + 5.0
            while not got and time.monotonic() < deadline:  # slow joiner: resend until one lands
                send_beat(pub, "dev1", beat_frames(1), 0)
                msg = await asyncio.wait_for(sub.recv(timeout=0.05), timeout=1.0)
                if msg is not None:
                    got.append(msg)
            assert got and isinstance(got[0], FrameMessage)
            protocol.validate_header(got[0].header)


def test_bind_failure_is_an_oserror():
    with Publisher("tcp://127.0.0.1:0") as pub:
        with pytest.raises(OSError, match="cannot bind"):
            Publisher(pub.endpoint)


def test_publish_rejects_bad_frames():
    with Publisher("tcp://127.0.0.1:0") as pub:
        with pytest.raises(protocol.ProtocolError, match="uint8"):
            pub.publish_frames("d", np.zeros((1, 4, 4), np.float32), times=[0.0], beat=0, r_time=0.0, rr=1.0,
                               model="sim", capture=0.0)
        with pytest.raises(protocol.ProtocolError, match="times"):
            pub.publish_frames("d", np.zeros((2, 4, 4), np.uint8), times=[0.0], beat=0, r_time=0.0, rr=1.0,
                               model="sim", capture=0.0)
        assert pub.next_seq("d") == 0


def test_last_value_cache_gives_late_joiners_the_latest_statuses():
    with Publisher("tcp://127.0.0.1:0", last_value_cache=True) as pub:
        pub.publish_status("a", "signal_lost", "old news")
        pub.publish_status("a", "signal_lost", "flat line")
        pub.publish_status("b", "overload", "dropped 1 beat", {"beats_dropped": 1})
        with Subscriber(pub.endpoint, topics=("status/a",)) as sub:
            deadline = time.monotonic() + 5.0
            got = None
            while got is None and time.monotonic() < deadline:
                pub.serve_subscriptions()  # the engine's watchdog does this
                got = sub.recv(timeout=0.05)
            assert isinstance(got, StatusMessage) and got.device == "a"
            assert got.status["message"] == "flat line" and got.status["cached"] is True
            protocol.validate_status(got.status)
            assert sub.recv(timeout=0.2) is None  # only the latest, only the subscribed device
            send_beat(pub, "a", beat_frames(1), 0)  # frames still flow through an XPUB
            assert sub.recv(timeout=0.2) is None  # (not subscribed to echo/)
        with Subscriber(pub.endpoint, topics=("echo/",)) as sub2:
            deadline = time.monotonic() + 5.0
            frame = None
            while frame is None and time.monotonic() < deadline:
                send_beat(pub, "a", beat_frames(1), 1)
                frame = sub2.recv(timeout=0.05)
            assert isinstance(frame, FrameMessage)


def test_one_publisher_serves_several_endpoints():
    with Publisher(["tcp://127.0.0.1:0", "tcp://127.0.0.1:0"]) as pub:
        assert len(pub.endpoints) == 2 and pub.endpoints[0] != pub.endpoints[1]
        with Subscriber(pub.endpoints[0]) as first, Subscriber(pub.endpoints[1]) as second:
            wait_joined(pub, first)
            wait_joined(pub, second)
            send_beat(pub, "dev", beat_frames(n=2, size=16), beat=0)
            got = [[m for m in sub.messages(timeout=1.0) if isinstance(m, FrameMessage)] for sub in (first, second)]
    # Both sides see the same frames with the same per-device sequence numbers.
    assert [[m.seq for m in side] for side in got] == [[0, 1], [0, 1]]


def test_beat_ecg_fields_round_trip_with_nan_where_unknown():
    fs, pre, rr = 250.0, 0.5, 0.8
    window = np.arange(625, dtype=np.float32)[None, :] / 100
    valid = np.ones(625, bool)
    valid[300:] = False  # the stream had not delivered these yet
    fields = protocol.beat_ecg_fields(window, valid, fs, pre, rr)
    trace = protocol.decode_ecg(fields)
    assert fields["ecg_fs"] == fs and trace.shape == (200,)  # R .. R + rr at 250 Hz
    np.testing.assert_array_equal(trace[:175], window[0, 125:300])
    assert np.isnan(trace[175:]).all()
    assert protocol.decode_ecg({}) is None


def test_a_forgotten_device_is_not_replayed_to_late_joiners_and_restarts_its_seq():
    with Publisher("tcp://127.0.0.1:0", last_value_cache=True) as pub:
        send_beat(pub, "gone", beat_frames(2, size=8), 0)
        pub.publish_status("gone", "stopped", "forgotten after 600 s without data")
        pub.publish_status("here", "signal_lost", "no data for 3 s")
        pub.forget("gone")
        with Subscriber(pub.endpoint, topics=("status/",)) as sub:
            got = []
            deadline = time.monotonic() + 5.0
            while not got and time.monotonic() < deadline:
                pub.serve_subscriptions()
                got = list(sub.messages(timeout=0.1))
        # once: every device ever forgotten came back to each new subscriber (a card per id on the viewer)
        assert [m.device for m in got] == ["here"]
        assert pub.next_seq("gone") == 0 and pub.next_seq("here") == 0
