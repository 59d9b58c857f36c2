"""The asyncio engine over real ZeroMQ sockets, fed by in-memory sources: frames per beat,
statuses for bad input / silence / overload / errors, raw ECG on disk, clean stop."""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time

import numpy as np
import pytest

from echopulse.bridges.chunk import EcgChunk
from echopulse.bridges.status import SourceStatus
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream import datadir, protocol
from echopulse.stream.backends import Backend
from echopulse.stream.engine import ENGINE_DEVICE, Engine
from echopulse.stream.protocol import FrameMessage, StatusMessage
from echopulse.stream.publish import Publisher
from echopulse.stream.session import EngineLimits
from echopulse.stream.subscribe import AsyncSubscriber, Subscriber

pytestmark = pytest.mark.network

FS = 250.0


class StubBackend(Backend):
    """Frames that encode the beat (pixel value = frame index), optionally slow or failing."""

    name = "stub"

    def __init__(self, delay: float = 0.0, fail_on: int | None = None, frames: int = 3) -> None:
        self.delay, self.fail_on, self.frames = delay, fail_on, frames
        self.rendered = 0

    def new_state(self, device: str) -> dict:
        return {"device": device, "beats": 0}

    def render(self, state: dict, beat) -> tuple[np.ndarray, np.ndarray]:
        state["beats"] += 1
        if self.fail_on is not None and state["beats"] == self.fail_on:
            raise RuntimeError("stub failure")
        time.sleep(self.delay)
        self.rendered += 1
        frames = np.stack([np.full((8, 8), i, np.uint8) for i in range(self.frames)])
        return frames, beat.r_time + beat.rr * np.arange(self.frames) / self.frames


class ListSource:
    """An async source of prepared items, with a pause between them; `hold` keeps it open."""

    def __init__(self, items, pause: float = 0.0, hold: float = 0.0) -> None:
        self.items, self.pause, self.hold = list(items), pause, hold

    async def _gen(self):
        for item in self.items:
            await asyncio.sleep(self.pause)
            yield item
        await asyncio.sleep(self.hold)

    def __aiter__(self):
        return self._gen()


def chunks(device: str, seconds: float, seed: int = 1, step_s: float = 0.25, t0: float = 0.0, seq0: int = 0):
    sig = simulate_ecg(seconds, fs=FS, hr=75.0, seed=seed, pvc_rate=0.0).signal
    step = int(step_s * FS)
    return [EcgChunk(device, sig[:, s:s + step], FS, t0 + s / FS, seq0 + i) for i, s in enumerate(range(0, sig.shape[1], step))]


async def joined(pub: Publisher, sub: AsyncSubscriber) -> None:
    """Probe until the subscriber is connected (ZeroMQ slow joiner), then drain the probes."""
    async def probe() -> None:
        while True:
            pub.publish_status("probe", "source", "probe")
            msg = await sub.recv(timeout=0.05)
            if isinstance(msg, StatusMessage) and msg.device == "probe":
                while await sub.recv(timeout=0.05) is not None:
                    pass
                return

    await asyncio.wait_for(probe(), timeout=5.0)


async def serve_and_collect(engine: Engine, pub: Publisher, timeout: float = 30.0, duration: float | None = None):
    """Run the engine to its end while collecting every message it publishes."""
    async with AsyncSubscriber(pub.endpoint) as sub:
        await joined(pub, sub)
        run = asyncio.create_task(engine.run(duration=duration))
        got = []
        try:
            deadline = time.monotonic() + timeout
            while not run.done() and time.monotonic() < deadline:
                msg = await sub.recv(timeout=0.05)
                if msg is not None:
                    got.append(msg)
            await asyncio.wait_for(run, timeout=5.0)
            while (msg := await sub.recv(timeout=0.2)) is not None:  # the last statuses
                got.append(msg)
        finally:
            if not run.done():
                engine.stop()
                await asyncio.wait_for(run, timeout=5.0)
    return got


def frames_of(got, device):
    return [m for m in got if isinstance(m, FrameMessage) and m.device == device]


def statuses_of(got, device, code=None):
    return [m.status for m in got if isinstance(m, StatusMessage) and m.device == device
            and (code is None or m.code == code)]


async def test_frames_per_beat_in_order_for_two_devices(tmp_path):
    backend = StubBackend()
    items = [c for pair in zip(chunks("a", 10, 1), chunks("b", 10, 2)) for c in pair]
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], backend, pub, tmp_path, limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    for device in ("a", "b"):
        frames = frames_of(got, device)
        counters = engine.counters()[device]
        assert counters["beats"] >= 10 and counters["beats_published"] == counters["beats"]
        assert len(frames) == 3 * counters["beats"]
        assert [m.seq for m in frames] == list(range(len(frames)))
        assert [(m.header["beat"], m.header["frame"]) for m in frames] == [
            (b, f) for b in range(counters["beats"]) for f in range(3)]
        for m in frames:
            protocol.validate_header(m.header)
            assert m.header["model"] == "stub" and int(m.pixels[0, 0]) == m.header["frame"]
            assert m.header["hr"] == pytest.approx(75.0, rel=0.15)
        assert statuses_of(got, device, "stopped")
        assert not statuses_of(got, device, "bad_input")


async def test_overload_drops_oldest_beats_reports_and_stays_bounded(tmp_path):
    backend = StubBackend(delay=0.25)
    with Publisher("tcp://127.0.0.1:0") as pub:
        limits = EngineLimits(beat_queue=2, status_interval_s=0.0, workers=1, drain_timeout_s=2.0)
        engine = Engine([ListSource(chunks("d", 15))], backend, pub, None, limits=limits)
        got = await serve_and_collect(engine, pub)
    c = engine.counters()["d"]
    assert c["beats_dropped"] > 0
    assert c["beats_published"] + c["beats_dropped"] <= c["beats"]
    overload = statuses_of(got, "d", "overload")
    assert len(overload) == c["beats_dropped"]
    assert overload[-1]["counters"]["beats_dropped"] == c["beats_dropped"]
    beats = [m.header["beat"] for m in frames_of(got, "d") if m.header["frame"] == 0]
    assert beats == sorted(set(beats))  # in order, each once; gaps are the dropped ones


async def test_bad_input_and_source_events_become_statuses_and_counters(tmp_path):
    good = chunks("dev", 6)
    bad = good[10]
    nan = EcgChunk("dev", np.where(np.arange(bad.n_samples) % 7 == 0, np.nan, bad.samples).astype(np.float32),
                   bad.fs, bad.t0, bad.seq)
    items = [*good[:10], nan, *good[11:14], good[12],  # a duplicate
             SourceStatus("dev", "malformed", "not JSON"), SourceStatus(None, "disconnected", "broker gone"),
             SourceStatus("dev", "oversized", "300000 bytes"), *good[14:]]
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, tmp_path,
                        limits=EngineLimits(beat_queue=64, status_interval_s=0.0))
        got = await serve_and_collect(engine, pub)
    messages = [s["message"].split(":")[0] for s in statuses_of(got, "dev", "bad_input")]
    assert messages == ["non_finite", "duplicate", "malformed", "oversized"]
    last = statuses_of(got, "dev", "bad_input")[-1]
    protocol.validate_status(last)
    assert last["counters"]["bad_input"] == 4 and last["counters"]["chunks_dropped"] == 1
    assert [s["message"] for s in statuses_of(got, ENGINE_DEVICE, "source")] == ["disconnected: broker gone"]
    c = engine.counters()
    assert c["dev"]["issue_non_finite"] == 1 and c["dev"]["source_malformed"] == 1
    assert c[ENGINE_DEVICE]["source_disconnected"] == 1
    assert c["dev"]["beats_published"] >= 4  # it went on


async def test_raw_ecg_on_disk_equals_what_was_sent(tmp_path):
    sent = chunks("x", 4, step_s=0.1) + chunks("y", 3, seed=5, step_s=0.3)
    weird = EcgChunk("x", np.full((1, 5), np.nan, np.float32), FS, 99.0, 999)  # kept as received
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource([*sent, weird])], StubBackend(), pub, tmp_path)
        await serve_and_collect(engine, pub)
    assert datadir.list_devices(tmp_path) == ["x", "y"]
    for device in ("x", "y"):
        mine = [c for c in sent if c.device == device] + ([weird] if device == "x" else [])
        samples, entries = datadir.read_device(tmp_path, device)
        np.testing.assert_array_equal(samples, np.concatenate([c.samples for c in mine], axis=1))
        assert [(e["seq"], e["t0"], e["fs"], e["n"]) for e in entries] == [(c.seq, c.t0, c.fs, c.n_samples) for c in mine]


async def test_silence_gives_signal_lost_then_restored(tmp_path):
    class Pausing:
        async def _gen(self):
            for c in chunks("q", 2, step_s=0.25):
                yield c
            await asyncio.sleep(1.2)  # silent for longer than the timeout
            for c in chunks("q", 1, step_s=0.25, t0=3.2, seq0=100):
                yield c

        def __aiter__(self):
            return self._gen()

    with Publisher("tcp://127.0.0.1:0") as pub:
        limits = EngineLimits(signal_timeout_s=0.5, watchdog_interval_s=0.1)
        engine = Engine([Pausing()], StubBackend(), pub, tmp_path, limits=limits)
        got = await serve_and_collect(engine, pub)
    codes = [s["code"] for s in statuses_of(got, "q") if s["code"] in ("signal_lost", "signal_restored")]
    assert codes == ["signal_lost", "signal_restored"]
    assert "no data" in statuses_of(got, "q", "signal_lost")[0]["message"]


async def test_devices_long_silent_are_forgotten_and_free_their_slots(tmp_path):
    class ComeAndGo:
        async def _gen(self):
            for pair in zip(chunks("a", 2), chunks("b", 2, seed=2)):
                for c in pair:
                    yield c
            await asyncio.sleep(1.5)  # a and b are gone, under ids they will not use again
            for c in chunks("c", 3, seed=3):
                yield c

        def __aiter__(self):
            return self._gen()

    with Publisher("tcp://127.0.0.1:0") as pub:
        limits = EngineLimits(max_devices=2, signal_timeout_s=0.3, watchdog_interval_s=0.1, forget_after_s=0.8, beat_queue=64)
        engine = Engine([ComeAndGo()], StubBackend(), pub, tmp_path, limits=limits)
        got = await serve_and_collect(engine, pub)
    for gone in ("a", "b"):
        last = statuses_of(got, gone, "stopped")
        assert last and "forgotten after" in last[0]["message"] and last[0]["counters"]["chunks"] == len(chunks(gone, 2))
    assert not statuses_of(got, ENGINE_DEVICE, "bad_input")  # once: "refused device 'c': over the limit of 2"
    assert frames_of(got, "c") and engine.counters()[ENGINE_DEVICE]["devices_forgotten"] == 2
    assert set(engine.counters()) == {"c", ENGINE_DEVICE}


async def test_render_failure_is_reported_and_the_device_goes_on(tmp_path):
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(chunks("f", 8))], StubBackend(fail_on=2), pub, None,
                        limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    errors = statuses_of(got, "f", "error")
    assert len(errors) == 1 and "stub failure" in errors[0]["message"]
    c = engine.counters()["f"]
    assert c["render_errors"] == 1 and c["beats_published"] == c["beats"] - 1


async def test_devices_over_the_limit_are_refused_once(tmp_path):
    items = [c for pair in zip(chunks("one", 3), chunks("two", 3, seed=2)) for c in pair]
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, tmp_path, limits=EngineLimits(max_devices=1))
        got = await serve_and_collect(engine, pub)
    refused = statuses_of(got, ENGINE_DEVICE, "bad_input")
    assert len(refused) == 1 and "'two'" in refused[0]["message"]
    assert engine.counters()[ENGINE_DEVICE]["refused_chunks"] == len(items) // 2
    assert datadir.list_devices(tmp_path) == ["one"]


async def test_stop_ends_an_endless_source_and_flushes(tmp_path):
    sent = chunks("s", 2)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(sent, hold=60.0)], StubBackend(), pub, tmp_path)
        run = asyncio.create_task(engine.run())
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        engine.stop()
        await asyncio.wait_for(run, timeout=5.0)
        assert time.monotonic() - t0 < 2.0
    samples, entries = datadir.read_device(tmp_path, "s")
    assert len(entries) == len(sent) and samples.shape == (1, 500)


async def test_duration_limits_the_run(tmp_path):
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(chunks("s", 2), hold=60.0)], StubBackend(), pub, tmp_path)
        t0 = time.monotonic()
        await asyncio.wait_for(engine.run(duration=0.8), timeout=10.0)
    assert 0.7 < time.monotonic() - t0 < 5.0
    assert math.isfinite(engine.counters()["s"]["chunks"])


async def test_a_failing_raw_store_is_reported_and_the_beats_go_on(tmp_path):
    items = chunks("a", 8, 1)
    store = tmp_path / "store"
    store.mkdir()
    (store / "a").write_text("a file where the device's folder should be")  # as a full or read-only disk would fail
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, store, limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    errors = statuses_of(got, "a", "error")
    assert errors and "raw ECG store" in errors[0]["message"]
    assert engine.counters()["a"]["raw_store_errors"] == len(items)
    counters = engine.counters()["a"]
    assert counters["beats"] >= 3 and counters["beats_published"] == counters["beats"]  # live output did not stop
    assert len(frames_of(got, "a")) == 3 * counters["beats"]


async def test_device_ids_that_cannot_be_topics_are_refused_once(tmp_path):
    items = chunks("bad id", 2) + chunks("ok", 2)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, tmp_path)
        got = await serve_and_collect(engine, pub)
    refused = statuses_of(got, ENGINE_DEVICE, "bad_input")
    assert len(refused) == 1 and "'bad id'" in refused[0]["message"]
    assert datadir.list_devices(tmp_path) == ["ok"] and "bad id" not in engine.counters()


async def test_frames_carry_the_beats_ecg(tmp_path):
    items = chunks("a", 8, 1)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, tmp_path, limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    frames = frames_of(got, "a")
    assert frames
    sent = np.concatenate([c.samples[0] for c in items])
    for m in frames:
        trace = protocol.decode_ecg(m.header)
        assert m.header["ecg_fs"] == 250.0
        assert len(trace) == round(m.header["rr"] * 250.0)
        # Model-rate samples of the input (also 250 Hz here) from the beat's R onwards.
        known = trace[np.isfinite(trace)]
        i0 = round(m.header["r_time"] * FS)
        np.testing.assert_allclose(known[:20], sent[i0:i0 + 20], atol=0.05)


async def test_rr_intervals_alone_drive_beats_and_ecg_wins_when_both_come(tmp_path):
    from echopulse.bridges.chunk import RrIntervals

    # A Heart Rate service strap: two intervals per notification at 75 then 100 bpm.
    rhythm = [RrIntervals("strap", 100.0 + 1.6 * i, 75, (0.8, 0.8), i) for i in range(4)]
    rhythm += [RrIntervals("strap", 106.4 + 1.2 * i, 100, (0.6, 0.6), 4 + i) for i in range(3)]
    rhythm.append(RrIntervals("strap", 110.0, 0, (9.0,), 7))  # a glitch: out of range, reported
    # A device sending ECG too: its RR is only counted.
    both = chunks("chest", 6, 2) + [RrIntervals("chest", 3.0, 75, (0.8,), 0)]
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(rhythm + both)], StubBackend(), pub, tmp_path, limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    strap = frames_of(got, "strap")
    beats = sorted({m.header["beat"] for m in strap})
    assert beats == list(range(14))
    hrs = [m.header["hr"] for m in strap if m.header["frame"] == 0]
    assert hrs[:8] == pytest.approx([75.0] * 8) and hrs[8:] == pytest.approx([100.0] * 6)
    starts = [m.header["r_time"] for m in strap if m.header["frame"] == 0]
    assert np.allclose(np.diff(starts), [0.8] * 8 + [0.6] * 5)  # contiguous beats, no overlap
    assert all(np.isnan(protocol.decode_ecg(m.header)).all() for m in strap)  # no ECG to show
    assert engine.counters()["strap"]["bad_input"] == 1
    assert engine.counters()["chest"]["rr_ignored"] == 1


def open_files_under(folder) -> list[str]:
    """Files under `folder` this process holds open (what lsof would list)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # fds closed while we look
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder) + os.sep):
                found.append(target)
    return found


def late_joiner_statuses(pub: Publisher) -> list:
    """What a subscriber that joins now gets from the last-value cache."""
    with Subscriber(pub.endpoint, topics=("status/",)) as sub:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            pub.serve_subscriptions()  # the engine's watchdog does this
            got = list(sub.messages(timeout=0.1))
            if got:
                return got
    return []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_forgotten_device_closes_its_files_and_leaves_the_status_cache(tmp_path):
    class ComeAndGo:
        async def _gen(self):
            for c in chunks("gone", 2):
                yield c
            await asyncio.sleep(1.0)  # forgotten meanwhile
            for c in chunks("stays", 1, seed=3):
                yield c
            await asyncio.sleep(30.0)

        def __aiter__(self):
            return self._gen()

    with Publisher("tcp://127.0.0.1:0", last_value_cache=True) as pub:
        limits = EngineLimits(signal_timeout_s=0.2, watchdog_interval_s=0.05, forget_after_s=0.4, beat_queue=64)
        engine = Engine([ComeAndGo()], StubBackend(), pub, tmp_path, limits=limits)
        run = asyncio.create_task(engine.run())
        deadline = time.monotonic() + 10.0
        while "stays" not in engine.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        held = open_files_under(tmp_path.resolve())
        engine.stop()
        await asyncio.wait_for(run, timeout=10.0)
        late = {m.device for m in late_joiner_statuses(pub)}  # the loop has nothing else to do now
    assert engine.counters()[ENGINE_DEVICE]["devices_forgotten"] == 1
    # once: every device ever seen kept two files open until "Too many open files"
    assert held and not [f for f in held if "/gone/" in f]
    # and came back to every subscriber that joined later, forever
    assert "stays" in late and "gone" not in late
    assert len(datadir.read_device(tmp_path, "gone")[1]) == len(chunks("gone", 2))


class StuckBackend(StubBackend):
    """A render (or warm-up) that hangs until the test lets it go, as a wedged model would."""

    def __init__(self, stuck_in: str) -> None:
        super().__init__()
        self.stuck_in, self.entered, self.release = stuck_in, threading.Event(), threading.Event()

    def _hang(self) -> None:
        self.entered.set()
        self.release.wait(30.0)

    def warm_up(self) -> None:
        if self.stuck_in == "warm_up":
            self._hang()

    def render(self, state: dict, beat) -> tuple[np.ndarray, np.ndarray]:
        if self.stuck_in == "render":
            self._hang()
        return super().render(state, beat)


async def time_a_stop_once_stuck(engine: Engine, backend: StuckBackend) -> float:
    """Run the engine until the backend is stuck, stop it, and time how long the stop took."""
    run = asyncio.create_task(engine.run())
    assert await asyncio.to_thread(backend.entered.wait, 10.0)
    t0 = time.monotonic()
    engine.stop()
    await asyncio.wait_for(run, timeout=10.0)
    return time.monotonic() - t0


@pytest.mark.parametrize("stuck_in", ["render", "warm_up"])
async def test_stop_waits_for_a_stuck_backend_at_most_stop_timeout(tmp_path, stuck_in):
    backend = StuckBackend(stuck_in)
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(chunks("s", 4), hold=60.0)], backend, pub, tmp_path,
                        limits=EngineLimits(stop_timeout_s=0.5, beat_queue=64))
        try:
            waited = await time_a_stop_once_stuck(engine, backend)  # once: until the render returned, or never (warm-up)
            # and the process would not exit: the thread left behind must not be joined at exit
            left = [t for t in threading.enumerate() if t.name.startswith("echopulse-render")]
        finally:
            backend.release.set()
    assert waited < 2.0
    assert left and all(t.daemon for t in left)


class HangsOnClose(ListSource):
    """A source whose close never finishes by itself (a broker or radio that never answers),
    swallowing the cancellation too, until the test lets it go."""

    def __init__(self, items, release: asyncio.Event) -> None:
        super().__init__(items, hold=60.0)
        self.release = release

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()


class RecordsClose(StuckBackend):
    def close(self, timeout: float | None = None) -> None:
        self.close_timeout = timeout


async def test_a_stop_takes_at_most_stop_timeout_in_all(tmp_path):
    # Two sources hanging on close and a stuck render share one stop_timeout_s: once each
    # source waited 10 s (MQTT, BLE) or for ever (wait_for awaits the cancellation), then the
    # render stop_timeout_s more, then the backend's close up to 10 s more.
    release = asyncio.Event()
    backend = RecordsClose("render")
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([HangsOnClose(chunks("a", 4), release), HangsOnClose([], release)], backend, pub, None,
                        limits=EngineLimits(stop_timeout_s=0.5, beat_queue=64))
        try:
            waited = await time_a_stop_once_stuck(engine, backend)
        finally:
            release.set()
            backend.release.set()
    assert waited < 1.5
    assert engine.counters()[ENGINE_DEVICE]["sources_left_open"] == 2
    assert backend.close_timeout is not None and 0.0 <= backend.close_timeout <= 0.5


async def test_a_backend_failing_every_beat_is_reported_once_per_status_interval(tmp_path, caplog):
    class Broken(StubBackend):
        def render(self, state, beat):
            raise RuntimeError("CUDA out of memory")

    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(chunks("f", 8))], Broken(), pub, None,
                        limits=EngineLimits(beat_queue=64, status_interval_s=60.0))
        got = await serve_and_collect(engine, pub)
    c = engine.counters()["f"]
    assert c["render_errors"] == c["beats"] >= 5  # every failure counted
    # once: a status and a traceback in the log per beat, the beat number making each one "new"
    errors = statuses_of(got, "f", "error")
    assert len(errors) == 1 and "CUDA out of memory" in errors[0]["message"]
    assert len([r for r in caplog.records if r.exc_info]) == 1


async def test_a_refused_device_sending_bad_payloads_is_reported_once(tmp_path):
    # A device outside --allow-device on a shared broker, in a format we do not read: every
    # message of it is a "malformed" source event.
    stranger = [SourceStatus("stranger", "malformed", "not JSON") for _ in range(40)]
    items = [x for pair in zip(stranger, chunks("ok", 10)) for x in pair]
    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(items)], StubBackend(), pub, tmp_path, devices=["ok"],
                        limits=EngineLimits(beat_queue=64))
        got = await serve_and_collect(engine, pub)
    about = [s["message"] for s in statuses_of(got, ENGINE_DEVICE) if "stranger" in s["message"] or "JSON" in s["message"]]
    assert len(about) == 1 and "refused device 'stranger'" in about[0]  # once: one more status per message
    assert engine.counters()[ENGINE_DEVICE]["source_malformed"] == 40  # still counted
    assert "stranger" not in engine.counters() and frames_of(got, "ok")


async def test_a_backend_failing_to_close_does_not_fail_the_stop(tmp_path, caplog):
    class FailsToClose(StubBackend):
        def close(self, timeout: float | None = None) -> None:
            raise RuntimeError("CUDA context lost")

    with Publisher("tcp://127.0.0.1:0") as pub:
        engine = Engine([ListSource(chunks("c", 2))], FailsToClose(), pub, tmp_path, limits=EngineLimits(beat_queue=64))
        await asyncio.wait_for(engine.run(), timeout=30.0)  # once: the RuntimeError escaped run()
    assert any("failed to close" in r.getMessage() and r.exc_info for r in caplog.records)
    assert len(datadir.read_device(tmp_path, "c")[1]) == len(chunks("c", 2))  # the raw store was closed whole
