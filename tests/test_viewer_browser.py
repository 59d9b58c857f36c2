"""`echopulse view` end to end in headless Chromium: a real publisher, the real CLI, a real browser.

Chromium is driven over the DevTools protocol (a WebSocket) so that two screenshots can
be taken some time apart: the echo canvases must show non-blank content that changes.
Skips only when no Chromium binary is installed (CI installs Debian's `chromium`).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from _beat_publisher import BeatPublisher

pytestmark = pytest.mark.network

WIDTH, HEIGHT = 1280, 760


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Cdp:
    """The least of a DevTools protocol client: numbered calls, events ignored."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.last_id = 0

    async def call(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 20.0) -> dict:
        self.last_id += 1
        msg_id = self.last_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await asyncio.wait_for(self.ws.send(json.dumps(msg)), timeout)

        async def reply() -> dict:
            while True:
                answer = json.loads(await self.ws.recv())
                if answer.get("id") == msg_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]

        return await asyncio.wait_for(reply(), timeout)


async def _wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(text := path.read_text().splitlines()) >= 2:
            return text[0] + text[1]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"chromium wrote no {path.name} in {timeout} s")


def _wait_http(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return json.load(answer)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _page_state(cdp: Cdp, session: str) -> dict:
    expression = """JSON.stringify({
        frames: window.echopulse ? window.echopulse.frames : {},
        rects: [...document.querySelectorAll('.card')].map(card => {
            const r = card.querySelector('.echo').getBoundingClientRect();
            return {device: card.querySelector('.device').textContent, rect: [r.x, r.y, r.width, r.height],
                    strip: card.querySelector('.strip-label').textContent,
                    hr: card.querySelector('.hr').textContent,
                    status: card.querySelector('.status').textContent,
                    prime: card.querySelector('.prime').hidden ? null : card.querySelector('.prime').textContent};
        })})"""
    result = await cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    return json.loads(result["result"]["value"])


async def _wait_frames(cdp: Cdp, session: str, devices: tuple[str, ...], above: dict[str, int], timeout: float) -> dict:
    """Poll until every device has drawn more than `above[device] + 3` frames."""
    deadline = time.monotonic() + timeout
    while True:
        state = await _page_state(cdp, session)
        if all(state["frames"].get(d, 0) > above.get(d, 0) + 3 for d in devices):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the page drew too few frames: {state['frames']}")
        await asyncio.sleep(0.2)


async def _screenshot(cdp: Cdp, session: str) -> Image.Image:
    shot = await cdp.call("Page.captureScreenshot", {"format": "png"}, session)
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def _crop(image: Image.Image, rect: list[float]) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in rect)
    inside = image.crop((x + 2, y + 2, x + w - 2, y + h - 2))  # inside the canvas border
    return np.asarray(inside.convert("L"), dtype=np.float64)


async def test_viewer_in_headless_chromium_shows_changing_frames(tmp_path, unused_port):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    devices = ("bedside-1", "holter-2")
    publisher = BeatPublisher("tcp://127.0.0.1:0", devices, rr=0.5, ecg_devices=("bedside-1",), status_every=2,
                              primes={"bedside-1": "reference", "holter-2": "simulated"})
    publisher.start_and_wait()
    viewer = subprocess.Popen(
        [sys.executable, "-m", "echopulse.stream.cli", "view", "--connect", publisher.endpoint, "--port", str(unused_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
    profile = tmp_path / "profile"
    with (tmp_path / "chromium.log").open("wb") as browser_log:
        browser = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=browser_log)  # the child keeps its own copy of the file
    try:
        page_url = f"http://127.0.0.1:{unused_port}/"
        health = await asyncio.to_thread(_wait_http, page_url + "health", 30.0)
        assert health["status"] == "ok"
        port_and_path = await _wait_file(profile / "DevToolsActivePort", 30.0)
        port, path = port_and_path[: port_and_path.index("/")], port_and_path[port_and_path.index("/"):]
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=20) as ws:
            cdp = Cdp(ws)
            target = await cdp.call("Target.createTarget", {"url": "about:blank"})
            attached = await cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            session = attached["sessionId"]
            await cdp.call("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
            await cdp.call("Page.navigate", {"url": page_url}, session)
            first = await _wait_frames(cdp, session, devices, {}, 40.0)
            shot1 = await _screenshot(cdp, session)
            second = await _wait_frames(cdp, session, devices, first["frames"], 20.0)
            shot2 = await _screenshot(cdp, session)
            await cdp.call("Browser.close")
        shot2.save(tmp_path / "viewer.png")
    finally:
        for proc in (browser, viewer):
            if proc is viewer:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        publisher.stop()
    assert viewer.returncode == 0, viewer.stderr.read() if viewer.stderr else ""
    cards = {c["device"]: c for c in second["rects"]}
    assert sorted(cards) == sorted(devices)
    for device in devices:
        before, after = _crop(shot1, cards[device]["rect"]), _crop(shot2, cards[device]["rect"])
        assert before.std() > 15 and after.std() > 15, f"{device}: echo canvas looks blank"
        assert np.abs(after - before).mean() > 1.0, f"{device}: echo canvas did not change"
        assert cards[device]["hr"] == "120"
        assert "test source beat" in cards[device]["status"]
    assert cards["bedside-1"]["strip"].startswith("ECG")          # the stream carries ECG samples
    assert cards["holter-2"]["strip"] == "Beats and heart rate"   # it does not
    assert cards["bedside-1"]["prime"] == "patient's echo"          # primed with its patient's loop
    assert cards["holter-2"]["prime"] == "simulated heart"          # the EF on screen is not the patient's
