"""How many synthetic devices at 75 bpm the engine serves in real time, per backend.

1. cost: one device's work per second of ECG, measured stage by stage on this machine
   (ingest = checker + beat detector, per 0.25-s chunk; render = the backend, per beat;
   publish, per beat); 1 / cost is an estimate of the devices one core holds.
2. check: that many devices (80 % of the estimate) streamed in real time through the
   whole engine (synthetic source → sessions → backend threads → ZeroMQ publish), timed
   after the detectors have settled. Served in real time = no beat dropped, the p99
   latency from the arrival of the ECG that completes a beat to its publish under 1 s,
   and the beats published keeping pace with the beats the devices make. On failure the
   count is lowered and checked again (full run only).
"""
from __future__ import annotations

import asyncio
import math
import time

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


class _TimingPublisher(Publisher):
    """Records each beat's publish time and latency (ECG arrival → publish)."""

    def __init__(self) -> None:
        super().__init__("tcp://127.0.0.1:0")
        self.beats: list[tuple[float, float]] = []  # (perf_counter at publish, latency s)

    def publish_frames(self, device, frames, **fields):  # type: ignore[override]
        n = super().publish_frames(device, frames, **fields)
        self.beats.append((time.perf_counter(), time.time() - fields["capture"]))
        return n


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


async def _serve(backend, devices: int, settle: float, seconds: float) -> dict:
    source = SyntheticSource(devices=devices, hr=HR, seed=1, realtime=True, chunk_s=CHUNK_S)
    limits = EngineLimits(beat_queue=4, workers=2, drain_timeout_s=0.0, signal_timeout_s=60.0)
    pub = _TimingPublisher()
    try:
        engine = Engine([source], backend, pub, None, limits=limits)
        task = asyncio.create_task(engine.run())
        await asyncio.wait_for(engine.started.wait(), timeout=300)  # warm-up is not timed
        await asyncio.sleep(settle)  # the detectors learn the first beats
        dropped0 = sum(c.get("beats_dropped", 0) for c in engine.counters().values())
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        t1 = time.perf_counter()
        dropped = sum(c.get("beats_dropped", 0) for c in engine.counters().values()) - dropped0
        engine.stop()
        await asyncio.wait_for(task, timeout=60)
    finally:
        pub.close()
    window = [lat for t, lat in pub.beats if t0 <= t < t1]
    lat = np.asarray(window) if window else np.asarray([math.inf])
    expected = devices * BEATS_PER_S * (t1 - t0)
    result = {
        "devices": devices, "seconds": t1 - t0, "published": len(window), "expected": expected, "dropped": dropped,
        "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
    }
    result["real_time"] = bool(dropped == 0 and result["latency_p99_s"] < LATENCY_LIMIT_S
                               and len(window) >= 0.8 * expected)
    return result


def _bench_backend(name: str, quick: bool) -> tuple[list[dict], dict]:
    backend = backends.make_backend(name)
    backend.warm_up()
    costs = _stage_costs(backend, 10.0 if quick else 30.0, max_beats=1 if quick else 30)
    estimate = 1.0 / costs["cpu_s_per_device_s"]
    n = max(1, int(0.8 * estimate))
    if quick:
        n = min(n, 4)  # CI: a short check; the full run checks the whole estimate
    checks = []
    while not (quick and estimate < 1.0):  # quick: no check where one device is already too many
        # Settle: per-device backend setup (on the worker threads) and the detectors' first beats.
        settle = 3.0 + n * costs["setup_s_per_device"] / 2
        check = asyncio.run(_serve(backend, n, settle=settle, seconds=1.5 if quick else 15.0))
        checks.append(check)
        if check["real_time"] or quick or n == 1:
            break
        n = max(1, int(n * 0.7))
    backend.close()
    rows = [
        {"metric": f"{name}: render per beat", "value": costs["render_s_per_beat"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: backend setup per new device", "value": costs["setup_s_per_device"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: ingest (check+detect) per s of ECG", "value": costs["ingest_s_per_ecg_s"] * 1000, "unit": "ms", "target": None},
        {"metric": f"{name}: devices at {HR:.0f} bpm per core, estimate", "value": estimate, "unit": "devices", "target": None},
    ]
    if checks:
        last = checks[-1]
        rows += [
            {"metric": f"{name}: devices served in real time (checked)", "value": float(last["devices"] if last["real_time"] else 0),
             "unit": "devices", "target": None},
            {"metric": f"{name}: latency p99 at {last['devices']} devices", "value": last["latency_p99_s"] * 1000, "unit": "ms",
             "target": f"< {LATENCY_LIMIT_S * 1000:.0f}"},
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
