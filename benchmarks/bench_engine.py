"""How many synthetic devices at 75 bpm the engine serves in real time, per backend.

1. cost: one device's work per second of ECG, measured stage by stage on this machine
   (ingest = checker + beat detector, per 0.25-s chunk; render = the backend, per beat;
   publish, per beat); 1 / cost is an estimate of the devices one core holds.
   The render cost is measured on torch's (or numba's) threads as configured, so for the
   model backend (torch on every core) the estimate is per machine, not per core.
2. check: that many devices (80 % of the estimate) streamed in real time through the
   whole engine (synthetic source → sessions → backend threads → ZeroMQ publish), timed
   after the detectors have settled, over at least 15 s and 100 beats (full run).
   Served in real time (`_keeps_up`) = no beat dropped and none failed to render, every
   device's beats published keeping pace with the beats it makes (at most one beat short
   per device at the window's edges), the p99 latency under 1 s, and the source no more
   than two chunks behind its real-time schedule at the window's end. Latency runs from
   when the device sent the ECG that completes a beat (its chunk's real-time due time)
   to the beat's publish: a chunk that waits for a busy event loop counts, which the
   engine's own `capture` stamp (taken at ingest) does not see (the synthetic source
   simulates its ECG on that loop too, so its cost counts against the engine). On
   failure the count is lowered and checked again (full run only).
"""
from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import Counter

import numpy as np

from echopulse.bridges.chunk import EcgChunk
from echopulse.bridges.synthetic import SyntheticSource
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream import backends
from echopulse.stream.engine import Engine
from echopulse.stream.publish import Publisher
from echopulse.stream.session import EngineLimits, Session

HR = 75.0
BEATS_PER_S = HR / 60.0
CHUNK_S = 0.25
LATENCY_LIMIT_S = 1.0
MAX_SOURCE_LAG_S = 2 * CHUNK_S  # behind schedule by more at the window's end: not keeping up
MIN_WINDOW_S = 15.0
MIN_WINDOW_BEATS = 100          # a p99 over fewer beats is the maximum


class _TimingPublisher(Publisher):
    """Records each beat's publish: perf_counter, device, and seconds since the engine's
    `capture` stamp (wall clock, the protocol's field, hence time.time here)."""

    def __init__(self) -> None:
        super().__init__("tcp://127.0.0.1:0")
        self.beats: list[tuple[float, str, float, float]] = []  # (perf_counter, device, capture, since capture s)

    def publish_frames(self, device, frames, **fields):  # type: ignore[override]
        n = super().publish_frames(device, frames, **fields)
        capture = fields["capture"]
        self.beats.append((time.perf_counter(), device, capture, time.time() - capture))
        return n


class _PacedSource(SyntheticSource):
    """A synthetic source that notes, per chunk, how far behind its real-time schedule the
    engine took it: the time a real device's chunk would wait for a busy event loop."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._origin: float | None = None  # perf_counter at stream time 0
        self._end: dict[str, float] = {}   # device -> stream time at the end of its last chunk taken
        self.taken: dict[str, tuple[list[float], list[float]]] = {}  # device -> (wall clock taken, lag s)

    async def __anext__(self) -> EcgChunk:
        chunk = await super().__anext__()
        now = time.perf_counter()
        end = chunk.t0 + chunk.n_samples / chunk.fs
        if self._origin is None:
            self._origin = now - end  # the first chunk leaves on time (the source slept until then)
        walls, lags = self.taken.setdefault(chunk.device, ([], []))
        walls.append(time.time())  # the engine stamps `capture` (wall clock) right after, at ingest
        lags.append(max(0.0, now - (self._origin + end)))
        self._end[chunk.device] = end
        return chunk

    def lag_at(self, device: str, capture: float) -> float:
        """Lag of the device's chunk the engine was ingesting at wall time `capture`."""
        walls, lags = self.taken.get(device, ((), ()))
        i = bisect.bisect_right(walls, capture) - 1
        return lags[i] if i >= 0 else 0.0

    def behind(self, now: float) -> float:
        """Seconds since the oldest chunk not yet taken fell due (0: on schedule)."""
        if self._origin is None or len(self._end) < len(self.devices):
            return math.inf
        return max(0.0, now - (self._origin + min(self._end.values()) + self.step / self.fs))


def _keeps_up(check: dict) -> bool:
    """Whether a check served its devices in real time (see the module's docstring)."""
    min_beats = math.floor(BEATS_PER_S * check["seconds"]) - 1
    return bool(check["dropped"] == 0 and check["render_errors"] == 0
                and check["published_min_per_device"] >= min_beats
                and check["latency_p99_s"] < LATENCY_LIMIT_S
                and check["source_lag_end_s"] <= MAX_SOURCE_LAG_S)


def _check_seconds(devices: int, quick: bool) -> float:
    """How long a check lasts: long enough for a p99 over 100 beats (full run)."""
    return 1.5 if quick else max(MIN_WINDOW_S, MIN_WINDOW_BEATS / (devices * BEATS_PER_S))


def _limits(devices: int) -> EngineLimits:
    """The engine's limits for a check: every device admitted (the default max_devices
    would silently refuse the rest), the engine's default render threads."""
    return EngineLimits(beat_queue=4, workers=2, drain_timeout_s=0.0, signal_timeout_s=60.0,
                        max_devices=max(devices, EngineLimits().max_devices))


def _stage_costs(backend, seconds: float, max_beats: int) -> dict:
    """Seconds of CPU per second of one device's ECG, per stage (kernels compiled first)."""
    Session.warm_up()
    rec = simulate_ecg(seconds, fs=250.0, hr=HR, seed=3, pvc_rate=0.0)
    step = int(CHUNK_S * 250)
    session = Session("cost", EngineLimits(beat_queue=100_000), config=backend.ecg_config)
    t = time.perf_counter()
    for i, s in enumerate(range(0, rec.signal.shape[1], step)):
        session.ingest(EcgChunk("cost", rec.signal[:, s:s + step], 250.0, s / 250.0, i))
    ingest = time.perf_counter() - t
    beats = [p.beat for p in session.take_all()]
    t = time.perf_counter()
    state = backend.new_state("cost")
    setup = time.perf_counter() - t
    backend.render(state, beats[0])  # first beat: per-device setup, not steady state
    t = time.perf_counter()
    beats = beats[: max_beats + 1]
    rendered = [backend.render(state, b) for b in beats[1:]]
    render = (time.perf_counter() - t) / max(1, len(rendered))
    with _TimingPublisher() as pub:
        t = time.perf_counter()
        for b, (frames, times) in zip(beats[1:], rendered):
            pub.publish_frames("cost", frames, times=times, beat=b.index, r_time=b.r_time, rr=b.rr, model=backend.name,
                               capture=time.time())
        publish = (time.perf_counter() - t) / max(1, len(rendered))
    per_s = ingest / seconds + (render + publish) * BEATS_PER_S
    return {"ingest_s_per_ecg_s": ingest / seconds, "render_s_per_beat": render, "publish_s_per_beat": publish,
            "setup_s_per_device": setup, "cpu_s_per_device_s": per_s}


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _total(engine: Engine, counter: str) -> float:
    return sum(c.get(counter, 0) for c in engine.counters().values())


async def _serve(backend, devices: int, settle: float, seconds: float) -> dict:
    source = _PacedSource(devices=devices, hr=HR, seed=1, realtime=True, chunk_s=CHUNK_S)
    pub = _TimingPublisher()
    try:
        engine = Engine([source], backend, pub, None, limits=_limits(devices))
        task = asyncio.create_task(engine.run())
        await asyncio.wait_for(engine.started.wait(), timeout=300)  # warm-up is not timed
        await asyncio.sleep(settle)  # the detectors learn the first beats
        dropped0, errors0 = _total(engine, "beats_dropped"), _total(engine, "render_errors")
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        t1 = time.perf_counter()
        dropped = _total(engine, "beats_dropped") - dropped0
        render_errors = _total(engine, "render_errors") - errors0
        behind = source.behind(t1)
        engine.stop()
        await asyncio.wait_for(task, timeout=60)
    finally:
        pub.close()
    window = [(device, since + source.lag_at(device, capture)) for t, device, capture, since in pub.beats if t0 <= t < t1]
    lat = np.asarray([w[1] for w in window]) if window else np.asarray([math.inf])
    per_device = Counter(device for device, _ in window)
    result = {
        "devices": devices, "seconds": t1 - t0, "published": len(window), "expected": devices * BEATS_PER_S * (t1 - t0),
        "published_min_per_device": min((per_device[d] for d in source.devices), default=0),
        "dropped": dropped, "render_errors": render_errors, "workers": _limits(devices).workers,
        "latency_from": "the chunk completing the beat due (device sent it) -> publish",
        "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
        "latency_n": len(window), "source_lag_end_s": behind,
    }
    result["real_time"] = _keeps_up(result)
    return result


def _bench_backend(name: str, quick: bool) -> tuple[list[dict], dict]:
    backend = backends.make_backend(name)
    backend.warm_up()
    costs = _stage_costs(backend, 10.0 if quick else 30.0, max_beats=1 if quick else 30)
    costs["torch_threads"] = _torch_threads()  # the model's render cost depends on them
    estimate = 1.0 / costs["cpu_s_per_device_s"]
    n = max(1, int(0.8 * estimate))
    if quick:
        n = min(n, 4)  # CI: a short check; the full run checks the whole estimate
    checks = []
    while not (quick and estimate < 1.0):  # quick: no check where one device is already too many
        # Settle: per-device backend setup (on the worker threads) and the detectors' first beats.
        settle = 3.0 + n * costs["setup_s_per_device"] / 2
        check = asyncio.run(_serve(backend, n, settle=settle, seconds=_check_seconds(n, quick)))
        checks.append(check)
        if check["real_time"] or quick or n == 1:
            break
        n = max(1, int(n * 0.7))
    backend.close()
    rows = [
        {"metric": f"{name}: render per beat", "value": costs["render_s_per_beat"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: backend setup per new device", "value": costs["setup_s_per_device"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: ingest (check+detect) per s of ECG", "value": costs["ingest_s_per_ecg_s"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: devices at {HR:.0f} bpm, estimate from stage costs", "value": estimate, "unit": "devices", "target": None},
    ]
    if checks:
        last = checks[-1]
        rows += [
            {"metric": f"{name}: devices served in real time (checked)", "value": float(last["devices"] if last["real_time"] else 0),
             "unit": "devices", "target": None},
            {"metric": f"{name}: latency p99 (ECG sent -> publish) at {last['devices']} devices", "value": last["latency_p99_s"] * 1000,
             "unit": "ms", "target": f"< {LATENCY_LIMIT_S * 1000:.0f}"},
            {"metric": f"{name}: beats dropped at {last['devices']} devices", "value": float(last["dropped"]), "unit": "beats",
             "target": "0"},
        ]
    return rows, {"costs": costs, "checks": checks}


def run(quick: bool) -> dict:
    rows: list[dict] = []
    raw: dict = {}
    for name in ("sim", "model"):
        if name == "model" and not backends.model_available():
            raw[name] = "not available (core/generator.py missing)"
            continue
        r, detail = _bench_backend(name, quick)
        rows += r
        raw[name] = detail
    return {"rows": rows, **raw}


if __name__ == "__main__":
    for row in run(quick=True)["rows"]:
        print(f"{row['metric']:<60} {row['value']:>12.4g} {row['unit']}")
