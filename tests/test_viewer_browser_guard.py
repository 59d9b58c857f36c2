"""The page in headless Chromium keeps drawing every device while it gets frames it cannot draw.

The viewer drops what is not protocol v1, but the page must not rely on it (a viewer of
another version, a bug): bad frames are put straight into the viewer's fan-out here, next
to a hand-written publisher's good frames and malformed ZeroMQ messages.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import subprocess
import time

import numpy as np
import pytest
import zmq
from websockets.asyncio.client import connect

from echopulse.stream import protocol
from echopulse.stream.viewer import ViewerServer

from test_viewer_browser import HEIGHT, WIDTH, Cdp, _wait_file, chromium_binary

pytestmark = pytest.mark.network

GOOD = ("good", "__proto__")  # "__proto__" is a valid device id: the page's maps must hold it too
FPS = 10


def _good_frame(device: str, seq: int) -> list:
    beat, frame = divmod(seq, 5)
    header = {"v": 1, "device": device, "seq": seq, "beat": beat, "frame": frame, "frames": 5, "t": seq / FPS,
              "r_time": beat * 0.5, "rr": 0.5, "hr": 120.0, "model": "sim", "capture": time.time(),
              "publish": time.time(), "latency": 0.0}
    pixels = np.full((8, 10), (seq * 37) % 256, np.uint8)
    return protocol.encode_frame(header, pixels)


async def _publish(pub: zmq.Socket) -> None:
    """Good frames of GOOD at FPS, each round with one malformed message, until cancelled."""
    seq = 0
    while True:
        for device in GOOD:
            pub.send_multipart(_good_frame(device, seq))
        pub.send_multipart([b"echo/good", b"\xc1 not msgpack", b""])
        seq += 1
        await asyncio.sleep(1 / FPS)


def _page_frame(header: object, pixels: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + pixels


def _bad_page_messages(t: float) -> tuple[list[bytes], list[str]]:
    """Binary frames and text events the page cannot use, with ECG times near `t`."""
    base = {"seq": 0, "beat": 0, "frame": 0, "frames": 5, "r_time": t, "rr": 0.5, "hr": 120.0, "model": "sim",
            "publish": 0.0, "recv": 0.0, "latency": 0.0, "gap": 0}
    frames = [
        _page_frame({**base, "device": "bad-empty", "t": t, "shape": [0, 0]}, b""),           # once: tick died here
        _page_frame({**base, "device": "bad-t", "t": str(t), "shape": [2, 2]}, bytes(4)),     # and here
        _page_frame({**base, "t": t, "shape": [2, 2]}, bytes(4)),                             # no device
        _page_frame({**base, "device": "bad-size", "t": t, "shape": [4, 4]}, bytes(5)),       # 5 bytes for 16
        _page_frame({**base, "device": "bad-huge", "t": t, "shape": [100000, 100000]}, bytes(4)),
        _page_frame(["not", "a", "map"], b""),
        b"\x00\x01",                                                                           # no length prefix
        struct.pack(">I", 1000) + b"{}",                                                       # length past the end
        struct.pack(">I", 5) + b"{nope" + bytes(4),                                            # not JSON
    ]
    events = [
        json.dumps({"type": "status", "code": "overload", "message": "no device", "time": 1.0}),
        json.dumps({"type": "stats", "endpoint": "x", "frames": None, "lost": None}),
        json.dumps({"type": "from-the-future"}),
    ]
    return frames, events


_STATE = """JSON.stringify({
    frames: window.echopulse ? window.echopulse.frames : {},
    undrawable: window.echopulse ? window.echopulse.undrawable : 0,
    unreadable: window.echopulse ? window.echopulse.unreadable : 0,
    cards: [...document.querySelectorAll('.card .device')].map(node => node.textContent),
    summary: document.querySelector('#summary')?.textContent || ''})"""


async def _state(cdp: Cdp, session: str) -> dict:
    result = await cdp.call("Runtime.evaluate", {"expression": _STATE, "returnByValue": True}, session)
    return json.loads(result["result"]["value"])


async def _wait_state(cdp: Cdp, session: str, ok, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while not ok(state := await _state(cdp, session)):
        assert time.monotonic() < deadline, f"{what}: {state}"
        await asyncio.sleep(0.2)
    return state


async def _open_page(binary: str, profile, url: str, stack) -> tuple[Cdp, str]:
    browser = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (browser.kill(), browser.wait(timeout=15)))
    port_and_path = await _wait_file(profile / "DevToolsActivePort", 30.0)
    port, path = port_and_path[: port_and_path.index("/")], port_and_path[port_and_path.index("/"):]
    ws = await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=20))
    cdp = Cdp(ws)
    target = await cdp.call("Target.createTarget", {"url": "about:blank"})
    session = (await cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))["sessionId"]
    await cdp.call("Page.navigate", {"url": url}, session)
    return cdp, session


@contextlib.asynccontextmanager
async def _viewed_good_devices(tmp_path):
    """The viewer fed the good devices' frames over a real ZeroMQ socket, and the page open
    in headless Chromium: (viewer, cdp, session)."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    publishing = asyncio.create_task(_publish(pub))
    try:
        async with contextlib.AsyncExitStack() as stack, ViewerServer(f"tcp://127.0.0.1:{port}", port=0) as viewer:
            cdp, session = await _open_page(binary, tmp_path / "profile", viewer.url, stack)
            yield viewer, cdp, session
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        pub.close()
        context.term()


async def test_page_keeps_drawing_good_devices_among_frames_it_cannot_draw(tmp_path):
    async with _viewed_good_devices(tmp_path) as (viewer, cdp, session):
        every = lambda s: all(s["frames"].get(d, 0) > 3 for d in GOOD)  # noqa: E731
        before = await _wait_state(cdp, session, every, "the page drew too few frames")
        frames, events = _bad_page_messages(t=max(viewer.frames.values()) / FPS)
        for payload in frames:
            viewer._fanout.put_frame("bad", payload)  # straight to the page, past the viewer's checks
        for payload in events:
            viewer._fanout.put_event(payload)
        after = await _wait_state(
            cdp, session, lambda s: all(s["frames"][d] > before["frames"][d] + 10 for d in GOOD),
            "the page stopped drawing after the bad frames")  # once: its animation loop died
        await _wait_state(cdp, session, lambda s: "malformed dropped" in s["summary"], "no malformed count shown")
    assert sorted(after["cards"]) == sorted(GOOD)   # no card for any frame it could not draw
    assert after["undrawable"] == 6                  # the six frames with a JSON header
    assert after["unreadable"] == 5                  # three frames, the status without a device, the unknown type


class _Poison(dict):
    """A JSON object no JavaScript can turn into a number or text: `{"toString": 1, "valueOf": 1}`."""

    def __init__(self) -> None:
        super().__init__(toString=1, valueOf=1)


def _odd_but_parsable(t: float) -> tuple[list[bytes], list[str]]:
    """Messages whose JSON parses but whose fields throw where the page turns them into numbers
    or text; and JSON `null`, which once was dropped without being counted."""
    base = {"seq": 0, "frame": 0, "frames": 5, "rr": 0.5, "hr": 120.0, "publish": 0.0, "recv": 0.0, "latency": 0.0,
            "gap": 0, "shape": [8, 10]}
    frames = [
        # a beat of a good device whose ECG cannot be drawn, in the strip for 100 s: once, every
        # later frame of that device failed to draw its strip, each counted
        _page_frame({**base, "device": "good", "t": t, "beat": 10 ** 6, "r_time": t - 1.0, "rr": 100.0,
                     "model": "sim", "ecg": [_Poison(), 0.5], "ecg_fs": 250.0}, bytes(80)),
        _page_frame({**base, "device": "odd-fields", "t": t, "beat": "one", "r_time": _Poison(), "model": _Poison(),
                     "prime": _Poison(), "ecg": [0.1, 0.2], "ecg_fs": _Poison()}, bytes(80)),
        _page_frame(None, b""),
    ]
    events = [
        # a status whose time is no number: once, the card's state failed on every animation frame
        json.dumps({"type": "status", "device": "good", "code": "error", "message": "m", "time": _Poison()}),
        "null",
    ]
    return frames, events


async def test_fields_the_page_cannot_use_cost_one_message_each_not_every_frame_after(tmp_path):
    async with _viewed_good_devices(tmp_path) as (viewer, cdp, session):
        before = await _wait_state(cdp, session, lambda s: all(s["frames"].get(d, 0) > 3 for d in GOOD),
                                   "the page drew too few frames")
        frames, events = _odd_but_parsable(t=max(viewer.frames.values()) / FPS + 0.05)
        for payload in frames:
            viewer._fanout.put_frame("odd", payload)
        for payload in events:
            viewer._fanout.put_event(payload)
        mid = await _wait_state(cdp, session, lambda s: s["frames"].get("odd-fields", 0) >= 1,
                                "the frame with odd fields was not drawn")
        after = await _wait_state(
            cdp, session, lambda s: all(s["frames"][d] > mid["frames"][d] + 15 for d in GOOD),
            "the page stopped drawing")
    assert before["undrawable"] == before["unreadable"] == 0
    assert after["undrawable"] == 1   # the null header; once 0 (not counted), then one per frame of "good"
    assert after["unreadable"] == 2   # the status and "null"; once one per animation frame, and "null" not counted
