"""The viewer without a browser: fan-out policy, the browser wire format, HTTP routes and the WebSocket feed."""
from __future__ import annotations

import asyncio
import json
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect

from echopulse.stream.protocol import FrameMessage
from echopulse.stream.publish import Publisher
from echopulse.stream.viewer import ViewerServer
from echopulse.stream.viewer.fanout import ClientFeed, Fanout
from echopulse.stream.viewer.wire import event_payload, frame_payload, parse_frame_payload

from _beat_publisher import BeatPublisher, expected_frame


def _header(**changes):
    header = {"v": 1, "device": "d1", "seq": 7, "beat": 1, "frame": 2, "frames": 10, "t": 1.2, "r_time": 1.0,
              "rr": 0.8, "hr": 75.0, "shape": [4, 6], "dtype": "uint8", "model": "sim", "capture": 10.0,
              "publish": 10.01, "latency": 0.01}
    return {**header, **changes}


async def test_feed_keeps_the_newest_frames_when_full():
    feed = ClientFeed(max_frames=3)
    for i in range(5):
        feed.put_frame("a", bytes([i]))
    feed.put_frame("b", b"\xff")
    feed.put_event("status")
    batch = await asyncio.wait_for(feed.take(timeout=1.0), 2.0)
    assert batch == ["status", b"\x02", b"\x03", b"\x04", b"\xff"]  # events first, the oldest two of "a" dropped
    assert feed.skipped == 2
    assert await asyncio.wait_for(feed.take(timeout=0.05), 2.0) == []  # nothing left: waits, then empty


async def test_a_feed_keeps_nothing_of_devices_whose_frames_it_has_sent():
    # A browser left open for months sees device ids come and go: once its feed kept an empty
    # queue for every id it ever carried.
    feed = ClientFeed(max_frames=2)
    for i in range(100):
        feed.put_frame(f"bed{i}", bytes([i % 256]))
    assert len(await asyncio.wait_for(feed.take(timeout=1.0), 2.0)) == 100
    assert feed._frames == {}
    for i in range(3):
        feed.put_frame("bed0", bytes([i]))
    assert await asyncio.wait_for(feed.take(timeout=1.0), 2.0) == [b"\x01", b"\x02"] and feed.skipped == 1


async def test_viewer_close_writes_the_bad_messages_held_back(caplog):
    import logging

    viewer = ViewerServer("tcp://127.0.0.1:9", port=0)  # never started: close has only its logs to see to
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.viewer.server"):
        for i in range(3):
            viewer.unforwardable(f"d{i}: KeyError")
        viewer.recv_failures("ZMQError: gone")
        await viewer.close()
    lines = [r.getMessage() for r in caplog.records]
    # once: the two held back by the 10 s limit were never written
    assert lines == ["cannot forward message: d0: KeyError (1 in all)",
                     "cannot receive from the engine: ZMQError: gone (1 in all)",
                     "cannot forward message: d2: KeyError (3 in all; 2 since the last report)"]


async def test_fanout_reaches_every_client_until_removed():
    fanout = Fanout(max_frames=2)
    a, b = fanout.add(), fanout.add()
    fanout.put_frame("d", b"1")
    fanout.remove(b)
    fanout.put_event("e")
    assert await asyncio.wait_for(a.take(1.0), 2.0) == ["e", b"1"]
    assert await asyncio.wait_for(b.take(1.0), 2.0) == [b"1"]


def test_frame_payload_round_trip_with_ecg_and_nan():
    pixels = np.arange(24, dtype=np.uint8).reshape(4, 6)
    ecg = np.array([0.1, -0.5, 1.25], dtype="<f4")
    msg = FrameMessage("echo/d1", _header(ecg=ecg.tobytes(), ecg_fs=250.0, hr=float("nan"), blob=b"\x00\x01"),
                       pixels, gap=3)
    header, got = parse_frame_payload(frame_payload(msg, recv=11.0))
    np.testing.assert_array_equal(got, pixels)
    assert header["ecg"] == pytest.approx([0.1, -0.5, 1.25]) and header["ecg_fs"] == 250.0
    assert "hr" not in header and "blob" not in header  # JSON has no NaN; unknown binary is left out
    assert header["gap"] == 3 and header["recv"] == 11.0 and header["seq"] == 7


def test_event_payload_is_typed_json():
    assert json.loads(event_payload("status", {"device": "d1", "code": "overload"})) == {
        "type": "status", "device": "d1", "code": "overload"}


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read()


@pytest.mark.network
async def test_viewer_serves_page_and_feeds_websocket_from_zeromq():
    publisher = BeatPublisher("tcp://127.0.0.1:0", ("d1", "d2"), rr=0.2, frames=5, shape=(16, 20), status_every=1)
    publisher.start_and_wait()
    try:
        async with ViewerServer(publisher.endpoint, port=0) as viewer:
            status, kind, body = await asyncio.to_thread(_get, viewer.url)
            assert status == 200 and kind.startswith("text/html") and b"/viewer.js" in body
            assert b"http" not in body.replace(b"http-equiv", b"")  # no CDN: every resource is ours
            for path, kind_prefix in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
                status, kind, _ = await asyncio.to_thread(_get, viewer.url + path)
                assert status == 200 and kind.startswith(kind_prefix)
            assert (await asyncio.to_thread(_get, viewer.url + "nope"))[0] == 404
            frames: dict[str, list] = {"d1": [], "d2": []}
            kinds: set[str] = set()
            async with connect(viewer.url.replace("http", "ws") + "ws", open_timeout=10) as ws:
                while min(len(v) for v in frames.values()) < 6 or not {"hello", "status", "stats"} <= kinds:
                    message = await asyncio.wait_for(ws.recv(), 10.0)
                    if isinstance(message, str):
                        kinds.add(json.loads(message)["type"])
                        continue
                    header, pixels = parse_frame_payload(message)
                    frames[header["device"]].append((header, pixels))
            for _ in range(50):  # the server forgets a closed browser promptly
                health = json.loads((await asyncio.to_thread(_get, viewer.url + "health"))[2])
                if health["clients"] == 0:
                    break
                await asyncio.sleep(0.05)
    finally:
        publisher.stop()
    assert health["frames"]["d1"] >= 6 and health["clients"] == 0
    for k, device in enumerate(("d1", "d2")):
        for header, pixels in frames[device]:
            expected = expected_frame(k, header["beat"], header["frame"], header["frames"], header["seq"], (16, 20))
            np.testing.assert_array_equal(pixels, expected)
        seqs = [h["seq"] for h, _ in frames[device]]
        assert seqs == sorted(seqs)  # in order, none repeated


@pytest.mark.parametrize("argv, words", [
    (["view", "--connect", "tcp://127.0.0.1:5556", "--port", "70000"], "port must be between"),
    (["view", "--connect", "nonsense", "--port", "0"], "cannot connect"),
    (["view"], "--connect"),
])
def test_view_bad_arguments_are_one_line_exit_2(argv, words, capsys):
    from echopulse.stream.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:  # argparse errors exit from the parser
        status = exit.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and words in err and len(err.splitlines()) == 1


def _strict_json(text):
    def reject(word: str):
        raise ValueError(f"not JSON: {word}")  # a browser's JSON.parse rejects NaN and Infinity

    return json.loads(text, parse_constant=reject)


def test_payloads_of_odd_but_valid_messages_are_strict_json():
    status = {"v": 1, "device": "d1", "code": "overload", "message": "m", "counters": {"rate": float("nan")},
              "time": 1.0, "raw": b"\x00", "nested": {"x": float("-inf"), "b": b"\x01"}}
    got = _strict_json(event_payload("status", status))  # once: NaN in the text, the page's feed died
    assert got["counters"] == {"rate": None} and got["nested"] == {"x": None} and "raw" not in got
    msg = FrameMessage("echo/d1", _header(probe={"gain": float("nan"), "raw": b"\x00"}), np.zeros((4, 6), np.uint8))
    payload = frame_payload(msg, recv=1.0)
    (n,) = struct.unpack_from(">I", payload)
    header = _strict_json(payload[4:4 + n])
    assert header["probe"] == {"gain": None}


def test_page_survives_a_message_it_cannot_parse():
    from importlib import resources

    script = (resources.files("echopulse.stream.viewer") / "static" / "viewer.js").read_text()
    # Every JSON.parse sits in the one guarded helper: an unreadable message is skipped, not fatal.
    assert script.count("JSON.parse(") == 1
    helper = script[script.index("function parseJson"):]
    assert helper.index("try {") < helper.index("JSON.parse(") < helper.index("catch")
    assert "parseJson(data)" in script and "parseJson(decoder.decode(" in script



async def _until(ws, predicate, timeout: float = 10.0) -> list:
    """Read the WebSocket until a message satisfies `predicate`; return what was read."""
    seen = []

    async def read() -> list:
        while True:
            message = await ws.recv()
            item = parse_frame_payload(message)[0] if isinstance(message, bytes) else json.loads(message)
            seen.append(item)
            if predicate(item):
                return seen

    return await asyncio.wait_for(read(), timeout)


def _beat(pub: Publisher, device: str, n: int = 0) -> None:
    pub.publish_frames(device, np.zeros((2, 4, 6), np.uint8), times=[n, n + 0.4], beat=n, r_time=float(n), rr=0.8,
                       model="sim", capture=0.0)


async def _viewer_has(viewer: ViewerServer, *devices: str, send=None) -> None:
    """Wait until the viewer has had a frame of each device, calling `send` meanwhile (ZeroMQ's slow joiner)."""
    async def wait() -> None:
        while min(viewer.frames[d] for d in devices) == 0:
            if send is not None:
                send()
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), 10.0)


@pytest.mark.network
async def test_a_stopped_device_gets_no_card_in_browsers_that_connect_later():
    with Publisher("tcp://127.0.0.1:0") as pub:
        async with ViewerServer(pub.endpoint, port=0) as viewer:
            url = viewer.url.replace("http", "ws") + "ws"
            async with connect(url, open_timeout=10) as first:
                await _viewer_has(viewer, "gone", "here", send=lambda: (_beat(pub, "gone"), _beat(pub, "here")))
                pub.publish_status("gone", "stopped", "forgotten after 600 s without data")
                pub.publish_status("here", "signal_lost", "no data for 3 s")
                await _until(first, lambda m: m.get("type") == "status" and m["device"] == "here")
            async with connect(url, open_timeout=10) as later:
                _beat(pub, "here", 1)
                seen = await _until(later, lambda m: "seq" in m and m["beat"] == 1)
    # once: the last frame and status of every device ever seen, a card each, for good
    assert {m["device"] for m in seen if "device" in m} == {"here"}


@pytest.mark.network
async def test_a_browser_that_connects_later_gets_the_status_of_every_device():
    devices = [f"bed{i}" for i in range(100)]
    with Publisher("tcp://127.0.0.1:0") as pub:
        async with ViewerServer(pub.endpoint, port=0) as viewer:
            await _viewer_has(viewer, "joined", send=lambda: _beat(pub, "joined"))
            for device in devices:
                pub.publish_status(device, "signal_lost", "flat line on every lead (lead off?)")
            _beat(pub, "after")  # sent after the statuses: once it is in, so are they
            await _viewer_has(viewer, "after")
            async with connect(viewer.url.replace("http", "ws") + "ws", open_timeout=10) as ws:
                seen = await _until(ws, lambda m: "seq" in m)
    # once: 64 events at most, so "hello" and the first 37 devices' statuses never reached it
    assert seen[0]["type"] == "hello"
    assert sorted(m["device"] for m in seen if m.get("type") == "status") == sorted(devices)


def test_rate_limited_log_reports_the_first_at_once_then_counts(caplog):
    import logging

    from echopulse.stream.logs import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t.limited"), "dropping", interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.limited"):
        for i in range(50):
            limited(f"bad {i}")
        limited.flush()                   # within the interval: nothing more
        now[0] = 10.0
        limited.flush()                   # the 49 held back get one line
        limited.flush()                   # and only one
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropping: bad 0 (1 in all)", "dropping: bad 49 (50 in all; 49 since the last report)"]
    assert limited.count == 50 and limited.last == "bad 49"


def _bad_messages() -> list[list[bytes]]:
    """Messages any publisher could send to the viewer's endpoint, none of them protocol v1."""
    import msgpack

    good = _header(device="bad", shape=[4, 6])
    pixels = bytes(24)
    pack = msgpack.packb

    def frame(header, data=pixels, topic=b"echo/bad"):
        return [topic, pack(header, use_bin_type=True), data]

    without = [frame({k: v for k, v in good.items() if k != key}) for key in ("device", "seq", "t", "shape")]
    return without + [
        frame(good, bytes(23)),                                    # one byte short of 4x6
        frame({**good, "shape": [4, "6"]}),                        # shape of the wrong type
        frame({**good, "t": float("nan")}),
        frame({**good, "dtype": "float32"}),
        frame(good, topic=b"echo/someone-else"),                   # topic and device disagree
        [b"echo/bad", b"\xc1 not msgpack", pixels],
        [b"echo/bad", pack(good)],                                 # two parts
        [b"status/bad", pack({"v": 1, "device": "bad", "code": "on_fire", "message": "", "counters": {},
                              "time": 1.0})],
        [b"status/bad", pack([1, 2, 3])],                          # not a map
        [b"weird/kind", b"x"],                                     # a message kind v1 does not have
        [b"echo/boom", pack(good), pixels],                        # the decoder itself fails (patched below)
    ]


@pytest.mark.network
async def test_malformed_messages_are_dropped_counted_and_logged_without_stopping_other_devices(caplog, monkeypatch):
    import logging

    import zmq

    from echopulse.stream import protocol

    real_decode = protocol.decode

    def decode(parts):  # a decoder bug on some bytes: it must cost one message, not the feed
        if bytes(parts[0]) == b"echo/boom":
            raise TypeError("decoder bug")
        return real_decode(parts)

    monkeypatch.setattr(protocol, "decode", decode)
    bad = _bad_messages()
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    seq = [0]

    def good() -> None:
        header = {k: v for k, v in _header(device="good", seq=seq[0], t=float(seq[0])).items()
                  if k not in ("shape", "dtype")}
        pub.send_multipart(protocol.encode_frame(header, np.full((4, 6), seq[0] % 256, np.uint8)))
        seq[0] += 1

    try:
        async with ViewerServer(f"tcp://127.0.0.1:{port}", port=0, topics=("",)) as viewer:
            await _viewer_has(viewer, "good", send=good)  # subscribed: nothing sent from now on is missed
            async with connect(viewer.url.replace("http", "ws") + "ws", open_timeout=10) as ws:
                with caplog.at_level(logging.WARNING):
                    for parts in bad:
                        pub.send_multipart(parts)
                    last = seq[0]
                    good()              # sent after the bad ones: once it is through, so are they
                    seen = await _until(ws, lambda m: m.get("device") == "good" and m.get("seq") == last)
                    health = json.loads((await asyncio.to_thread(_get, viewer.url + "health"))[2])
    finally:
        pub.close()
        context.term()
    assert seen[-1]["seq"] == last                        # the good device is still served
    assert health["malformed"] == len(bad)                # once: not in /health at all
    assert "decoder bug" in health["last_malformed"]           # the latest, for whoever looks
    assert list(health["frames"]) == ["good"]            # no card for any bad message
    dropped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(dropped) == 2                              # once: one line per message
    assert dropped[0].endswith("(1 in all)")              # the first at once, the rest held back
    assert dropped[1].endswith(f"({len(bad)} in all; {len(bad) - 1} since the last report)")  # written at close


@pytest.mark.network
async def test_a_stopped_device_leaves_nothing_behind_in_the_viewer():
    # A viewer that runs for months sees device ids come and go: a forgotten one must not stay in
    # /health, in every stats message to every browser, nor in the seq bookkeeping.
    with Publisher("tcp://127.0.0.1:0") as pub:
        async with ViewerServer(pub.endpoint, port=0, stats_interval_s=0.05) as viewer:
            await _viewer_has(viewer, "gone", "here", send=lambda: (_beat(pub, "gone"), _beat(pub, "here")))
            async with connect(viewer.url.replace("http", "ws") + "ws", open_timeout=10) as ws:
                pub.publish_status("gone", "stopped", "forgotten after 600 s without data")
                _beat(pub, "here", 1)   # sent after the status: once it is in, so is the status
                await _viewer_has(viewer, "here")
                await _until(ws, lambda m: m.get("type") == "status" and m["device"] == "gone")
                stats = await _until(ws, lambda m: m.get("type") == "stats" and "gone" not in m["frames"], 5.0)
            health = json.loads((await asyncio.to_thread(_get, viewer.url + "health"))[2])
    assert list(health["frames"]) == ["here"]     # once: every id ever seen, for good
    assert "gone" not in stats[-1]["lost"] and "gone" not in stats[-1]["restarts"]
