"""End to end against a real mosquitto broker: ECG published over MQTT by a test client →
engine (sim backend) → frames and statuses at a ZeroMQ subscriber; raw ECG on disk.

Payload parsing is tested with the bridge (test_bridges_mqtt.py); here each kind of bad
input is followed to the status message the engine publishes for it.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiomqtt
import msgpack
import numpy as np
import pytest

from echopulse.bridges.backoff import Backoff
from echopulse.bridges.mqtt import MqttSource
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream import datadir, protocol
from echopulse.stream.backends import SimBackend
from echopulse.stream.engine import ENGINE_DEVICE, Engine
from echopulse.stream.protocol import FrameMessage, StatusMessage
from echopulse.stream.publish import Publisher
from echopulse.stream.session import EngineLimits
from echopulse.stream.subscribe import AsyncSubscriber

pytestmark = pytest.mark.network

FS = 250.0
STEP = 50  # samples per MQTT message (0.2 s)


def payload(samples: np.ndarray, t0: float, seq: int, fs: float = FS, unit: str = "mV") -> bytes:
    return msgpack.packb({"fs": fs, "t0": t0, "seq": seq, "unit": unit, "samples": samples.tolist()})


def ecg_messages(seconds: float, seed: int, fs: float = FS, t0: float = 0.0, seq0: int = 0):
    rec = simulate_ecg(seconds, fs=fs, hr=75.0, seed=seed, pvc_rate=0.0)
    step = int(STEP * fs / FS)
    msgs = [payload(rec.signal[0, s:s + step], t0 + s / fs, seq0 + i, fs)
            for i, s in enumerate(range(0, rec.signal.shape[1], step))]
    return rec, msgs


class Rig:
    """Publisher + subscriber + engine on an MQTT source; collects every message."""

    def __init__(self, broker, tmp_path, limits: EngineLimits | None = None) -> None:
        self.broker = broker
        self.prefix = f"e2e-{uuid.uuid4().hex[:8]}"
        self.pub = Publisher("tcp://127.0.0.1:0")
        self.sub = AsyncSubscriber(self.pub.endpoint)
        self.source = MqttSource(broker.host, broker.port, f"{self.prefix}/+", backoff=Backoff(0.05, 0.3))
        self.engine = Engine([self.source], SimBackend(), self.pub, tmp_path,
                             limits=limits or EngineLimits(beat_queue=256, status_interval_s=0.0))
        self.got: list = []
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Rig":
        async def probe() -> None:
            while True:
                self.pub.publish_status("probe", "source", "probe")
                msg = await self.sub.recv(timeout=0.05)
                if isinstance(msg, StatusMessage) and msg.device == "probe":
                    return

        await asyncio.wait_for(probe(), timeout=5.0)
        self._tasks = [asyncio.create_task(self.engine.run()), asyncio.create_task(self._collect())]
        await self.wait_for(lambda: self.statuses(ENGINE_DEVICE, "source"), timeout=10.0)  # subscribed
        return self

    async def __aexit__(self, *exc) -> None:
        self.engine.stop()
        await asyncio.wait_for(self._tasks[0], timeout=10.0)
        await asyncio.sleep(0.2)  # the last statuses
        self._tasks[1].cancel()
        await asyncio.wait_for(asyncio.gather(self._tasks[1], return_exceptions=True), timeout=5.0)
        self.sub.close()
        self.pub.close()

    async def _collect(self) -> None:
        while True:
            msg = await self.sub.recv(timeout=0.1)
            if msg is not None and msg.device != "probe":
                self.got.append(msg)

    async def send(self, device: str, messages: list[bytes], pause: float = 0.0) -> None:
        async with asyncio.timeout(20):
            async with aiomqtt.Client(self.broker.host, self.broker.port) as client:
                for m in messages:
                    await client.publish(f"{self.prefix}/{device}", m, qos=1)
                    if pause:
                        await asyncio.sleep(pause)

    async def wait_for(self, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s; statuses: {[m.status for m in self.got if isinstance(m, StatusMessage)][-10:]}")

    def frames(self, device: str) -> list[FrameMessage]:
        return [m for m in self.got if isinstance(m, FrameMessage) and m.device == device]

    def statuses(self, device: str, code: str | None = None) -> list[dict]:
        return [m.status for m in self.got
                if isinstance(m, StatusMessage) and m.device == device and (code is None or m.code == code)]


async def test_three_devices_end_to_end(running_broker, tmp_path):
    devices = {"strap-1": 11, "watch-2": 12, "patch-3": 13}
    sent = {d: ecg_messages(10.0, seed) for d, seed in devices.items()}
    async with Rig(running_broker, tmp_path) as rig:
        await asyncio.gather(*(rig.send(d, msgs, pause=0.005) for d, (_, msgs) in sent.items()))
        for d, (rec, _) in sent.items():
            # every R but the last one's beat (it waits for the next R)
            await rig.wait_for(lambda: len({m.header["beat"] for m in rig.frames(d)}) >= len(rec.r_peaks) - 1,
                               timeout=30.0)
    for d, (rec, msgs) in sent.items():
        frames = rig.frames(d)
        assert [m.seq for m in frames] == list(range(len(frames)))  # in order, none lost
        per_beat = {}
        for m in frames:
            protocol.validate_header(m.header)
            per_beat.setdefault(m.header["beat"], []).append(m)
        assert sorted(per_beat) == list(range(len(per_beat)))
        for beat, group in per_beat.items():  # one complete group per beat, frames in order
            assert [m.header["frame"] for m in group] == list(range(group[0].header["frames"]))
            ts = [m.header["t"] for m in group]
            assert ts == sorted(ts) and group[0].header["t"] == pytest.approx(group[0].header["r_time"], abs=1e-6)
            assert group[0].header["model"] == "sim" and group[0].pixels.dtype == np.uint8
        r_times = [per_beat[b][0].header["r_time"] for b in sorted(per_beat)]
        np.testing.assert_allclose(r_times, rec.r_peaks[:len(r_times)], atol=0.02)
        assert all(g[0].header["hr"] == pytest.approx(75.0, rel=0.2) for g in per_beat.values())
        # raw ECG on disk is what was sent
        samples, entries = datadir.read_device(tmp_path, d)
        assert len(entries) == len(msgs)
        np.testing.assert_array_equal(samples[0], np.concatenate([np.asarray(msgpack.unpackb(m)["samples"], np.float32) for m in msgs]))
        assert rig.statuses(d, "stopped")
        assert not rig.statuses(d, "bad_input") and not rig.statuses(d, "overload")


def _bad_cases():
    """device → (messages, expected status code, expected first word of its message)."""
    rec, good = ecg_messages(6.0, seed=21)
    sig = rec.signal[0]
    n = len(good)

    def at(i, samples=None, **kw):
        s = sig[i * STEP:(i + 1) * STEP] if samples is None else samples
        return payload(s, kw.pop("t0", i * STEP / FS), kw.pop("seq", i), **kw)

    nan = sig[10 * STEP:11 * STEP].copy()
    nan[::5] = np.nan
    sat = sig[10 * STEP:11 * STEP].copy()
    sat[:] = sig.max()
    return {
        "nan": ([*good[:10], at(10, nan), *good[11:]], "bad_input", "non_finite"),
        "gap": ([*good[:10], *[at(i, t0=i * STEP / FS + 2.0) for i in range(15, n)]], "bad_input", "gap"),
        "dup": ([*good[:10], good[9], *good[10:]], "bad_input", "duplicate"),
        "ooo": ([*good[:10], good[11], good[10], *good[12:]], "bad_input", "out_of_order"),
        "fs": ([*good[:10], *[payload(sig[i * STEP:(i + 1) * STEP], 2.0 + (i - 10) * STEP / 500, i, fs=500.0)
                              for i in range(10, n)]], "bad_input", "fs_change"),
        "sat": ([*good[:10], at(10, sat), *good[11:]], "bad_input", "saturation"),
        "flat": ([*good[:5], *[at(i, np.zeros(STEP, np.float32)) for i in range(5, n)]], "signal_lost", "flat line"),
        "malformed": ([*good[:3], b"{not json", *good[3:]], "bad_input", "malformed"),
        "oversized": ([*good[:3], msgpack.packb({"fs": FS, "unit": "mV", "samples": [0.0] * 40000}), *good[3:]],
                      "bad_input", "oversized"),
        "unit": ([*good[:3], json.dumps({"fs": FS, "unit": "furlong", "samples": [0.0] * 10}).encode(), *good[3:]],
                 "bad_input", "unknown_unit"),
    }


async def test_each_bad_input_gives_a_status_and_a_counter(running_broker, tmp_path):
    cases = _bad_cases()
    async with Rig(running_broker, tmp_path) as rig:
        await asyncio.gather(*(rig.send(d, msgs) for d, (msgs, _, _) in cases.items()))
        for d, (_, code, word) in cases.items():
            await rig.wait_for(lambda: [s for s in rig.statuses(d, code) if s["message"].startswith(word)], timeout=15.0)
        going_on = ("nan", "dup", "ooo", "sat", "malformed", "unit")
        await rig.wait_for(lambda: all(rig.engine.counters().get(d, {}).get("beats_published", 0) >= 4 for d in going_on),
                           timeout=15.0)
    counters = rig.engine.counters()
    for d, (_, code, word) in cases.items():
        status = [s for s in rig.statuses(d, code) if s["message"].startswith(word)][0]
        protocol.validate_status(status)
        key = "signal_lost" if code == "signal_lost" else "bad_input"
        assert counters[d][key] >= 1 and status["counters"][key] >= 1, d
        assert rig.statuses(d, "stopped"), d  # the engine survived every one of them
    # a flat line invents no beat: the only beats are from the 1 s of ECG before it
    assert counters["flat"].get("beats", 0) <= 1
    assert not rig.frames("flat") or max(m.header["r_time"] for m in rig.frames("flat")) < 1.0
    # the others keep producing beats after the bad input (waited for above)
    assert all(counters[d].get("render_errors", 0) == 0 for d in going_on)


async def test_broker_restart_engine_reconnects_and_resumes(running_broker, tmp_path):
    rec, msgs = ecg_messages(12.0, seed=31)
    half = len(msgs) // 2
    async with Rig(running_broker, tmp_path) as rig:
        await rig.send("d", msgs[:half])
        await rig.wait_for(lambda: rig.frames("d"), timeout=15.0)
        await asyncio.wait_for(asyncio.to_thread(running_broker.restart), timeout=30.0)
        await rig.wait_for(lambda: [s for s in rig.statuses(ENGINE_DEVICE, "source") if s["message"].startswith("reconnected")],
                           timeout=15.0)
        before = max(m.header["beat"] for m in rig.frames("d"))
        await rig.send("d", msgs[half:])
        await rig.wait_for(lambda: max(m.header["beat"] for m in rig.frames("d")) >= before + 4, timeout=15.0)
    messages = [s["message"].split(":")[0] for s in rig.statuses(ENGINE_DEVICE, "source")]
    assert messages[0] == "connected" and "disconnected" in messages and messages[-1] == "reconnected"
    assert rig.engine.counters()[ENGINE_DEVICE]["source_reconnected"] >= 1
    frames = rig.frames("d")
    assert [m.seq for m in frames] == list(range(len(frames)))
