"""The CPU benchmarks measure what their rows say: neurokit2 runs its documented pipeline,
ours' whole-recording row does the peers' work, latency is from the true R at every
rate, publish pairs alternate who goes first, and the engine's real-time check sees a
chunk that waited for the event loop, a starved device, and admits every device."""
from __future__ import annotations

import asyncio
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_beats  # noqa: E402
import bench_engine  # noqa: E402
import bench_publish  # noqa: E402
from echopulse.core.simulate.ecg import simulate_ecg  # noqa: E402
from echopulse.kernels import qrs  # noqa: E402
from echopulse.stream import backends  # noqa: E402
from echopulse.stream.beat_score import score  # noqa: E402
from echopulse.stream.engine import Engine  # noqa: E402


def test_neurokit_peer_cleans_before_finding_peaks() -> None:
    nk = pytest.importorskip("neurokit2")
    rec = simulate_ecg(20.0, fs=bench_beats.FS, hr=45, seed=45, noise=3.0)  # very noisy: raw and cleaned differ
    x = rec.signal[0].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = nk.ecg_peaks(nk.ecg_clean(x, sampling_rate=bench_beats.FS), sampling_rate=bench_beats.FS)
    documented = np.asarray(info["ECG_R_Peaks"], np.float64) / bench_beats.FS
    found = bench_beats._neurokit(x, bench_beats.FS)
    np.testing.assert_array_equal(found, documented)
    assert score(rec.r_peaks[rec.r_peaks > 0.3], found[found > 0.3], bench_beats.TOL).f1 > 0.99


def test_whole_recording_row_times_the_detector_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_remover(*args, **kwargs):
        raise AssertionError("the peers' work has no spike remover")

    monkeypatch.setattr(qrs.SpikeBlanker, "push", no_remover)
    bench_beats._whole_detector(np.zeros(3600, np.float32), 360.0)


def test_latency_runs_from_the_true_r_not_the_detected_one() -> None:
    truth = np.array([1.0, 3.0, 4.0, 5.0])
    r = np.array([3.03, 4.0, 5.3])  # 5.3: no true R within 50 ms
    d = np.array([3.2, 4.2, 5.5])
    lat = bench_beats._latencies(truth, r, d)
    np.testing.assert_allclose(lat, [0.2, 0.2])  # 3.2 - 3.0, not 3.2 - 3.03; 1.0 is in the learning period


def test_publish_pairs_alternate_who_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(kind: str, n_beats: int) -> dict:
        calls.append(kind)
        return {"delivered_fps": 1.0, "send_fps": 1.0, "dropped_fraction": 0.0}

    monkeypatch.setattr(bench_publish, "_measure", fake)
    bench_publish.run(quick=True)
    firsts = calls[::2]
    assert firsts.count("ours") == firsts.count("bare") > 0


def _check(**changes) -> dict:
    check = {"devices": 4, "seconds": 15.0, "published": 75, "expected": 75.0, "published_min_per_device": 18,
             "dropped": 0, "render_errors": 0, "latency_p99_s": 0.4, "source_lag_end_s": 0.0}
    return {**check, **changes}


def test_keeping_up_needs_every_device_served_and_the_source_on_time() -> None:
    assert bench_engine._keeps_up(_check())
    assert not bench_engine._keeps_up(_check(published=60, published_min_per_device=3))  # one device starved (80 %)
    assert not bench_engine._keeps_up(_check(source_lag_end_s=1.5))  # the loop takes the ECG late
    assert not bench_engine._keeps_up(_check(render_errors=1))
    assert not bench_engine._keeps_up(_check(dropped=1))
    assert not bench_engine._keeps_up(_check(latency_p99_s=1.2))


def test_a_long_check_gives_p99_a_hundred_beats() -> None:
    assert bench_engine._check_seconds(3, quick=False) * 3 * bench_engine.BEATS_PER_S >= 100
    assert bench_engine._check_seconds(60, quick=False) >= 15.0


def test_engine_check_admits_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class Refused(Exception):
        pass

    class Recorder:
        def __init__(self, sources, backend, publisher, data, limits) -> None:
            seen["limits"] = limits
            raise Refused

    monkeypatch.setattr(bench_engine, "Engine", Recorder)
    with pytest.raises(Refused):
        asyncio.run(bench_engine._serve(None, 300, settle=0.0, seconds=0.0))
    assert seen["limits"].max_devices >= 300  # the default 256 would refuse 44 devices unseen


@pytest.mark.slow
def test_a_chunk_that_waited_for_the_event_loop_counts_in_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends.make_backend("sim")
    backend.warm_up()
    original = Engine._on_chunk
    state: dict = {}

    def stalling(self, chunk) -> None:
        first = state.setdefault("first", time.perf_counter())
        if "stalled" not in state and time.perf_counter() - first > 2.5:
            state["stalled"] = True
            time.sleep(2.0)  # the event loop blocked: the devices' chunks wait meanwhile
        original(self, chunk)

    monkeypatch.setattr(Engine, "_on_chunk", stalling)
    try:
        check = asyncio.run(bench_engine._serve(backend, 2, settle=2.0, seconds=4.0))
    finally:
        backend.close()
    assert state.get("stalled")
    assert check["latency_p99_s"] > bench_engine.LATENCY_LIMIT_S, check
    assert not check["real_time"]
