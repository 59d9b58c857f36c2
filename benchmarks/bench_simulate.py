"""Simulator speed: paired clips per second (1 and 2 workers), 128² frame cost, and ECG
synthesis side by side with neurokit2's ECGSYN for the same 10 s at 250 Hz.

    python benchmarks/run.py --only simulate [--quick]
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker, as in training loaders

from echopulse.core.simulate import EchoRenderer, iter_pairs, sample_subject, simulate_ecg, simulate_pair  # noqa: E402
from echopulse.core.simulate.heart import HeartCycle  # noqa: E402


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _clips_per_second(n: int, workers: int) -> float:
    t0 = time.perf_counter()
    for _ in iter_pairs(10_000, n, workers=workers, size=64, frames=11):
        pass
    return n / (time.perf_counter() - t0)


def _frame_ms_128(reps: int) -> tuple[float, float]:
    subject = sample_subject(3)
    t_setup = _median_time(lambda: EchoRenderer(subject, 128), max(reps // 4, 2))
    renderer = EchoRenderer(subject, 128)
    rec = simulate_ecg(10.0, hr=subject.hr, seed=3, morph=subject.ecg)
    heart = HeartCycle(rec.beats, subject.edv, subject.esv)
    times = 4.0 + np.arange(11) / 30.0
    vol, opening = heart.volume(times), heart.mitral_open(times)
    t_render = _median_time(lambda: renderer.render(vol, opening), reps)
    return 1e3 * t_render / len(times), 1e3 * t_setup


def run(quick: bool) -> dict:
    n_clips = 40 if quick else 200
    reps = 5 if quick else 20
    ours = _median_time(lambda: simulate_ecg(10.0, fs=250.0, hr=70.0, seed=1), reps * 4)
    rows = []
    raw: dict[str, Any] = {"n_clips": n_clips}
    try:
        import neurokit2 as nk

        theirs = _median_time(lambda: nk.ecg_simulate(duration=10, sampling_rate=250, heart_rate=70, method="ecgsyn", random_state=1), 3 if quick else 10)
    except ImportError:
        theirs = float("nan")
    one = _clips_per_second(n_clips, 1)
    two = _clips_per_second(n_clips, 2)
    frame_ms, setup_ms = _frame_ms_128(reps)
    clip_ms = 1e3 * _median_time(lambda: simulate_pair(77, size=64), reps)
    # CPU time per clip: what one free core would give, even when the machine is shared.
    c0 = time.process_time()
    for seed in range(reps):
        simulate_pair(500 + seed, size=64)
    clip_cpu_ms = 1e3 * (time.process_time() - c0) / reps
    rows += [
        {"metric": "paired 11x64x64 clips/s, 1 worker", "value": one, "unit": "clips/s", "target": ">= 25"},
        {"metric": "paired 11x64x64 clips/s, 2 workers (iter_pairs)", "value": two, "unit": "clips/s", "target": ">= 50"},
        {"metric": "one paired 11x64x64 clip (median)", "value": clip_ms, "unit": "ms", "target": "<= 40"},
        {"metric": "one paired 11x64x64 clip, CPU time", "value": clip_cpu_ms, "unit": "ms", "target": "<= 40"},
        {"metric": "echo render per 128x128 frame (subject built)", "value": frame_ms, "unit": "ms", "target": None},
        {"metric": "echo subject set-up at 128 (anatomy, scatterers)", "value": setup_ms, "unit": "ms", "target": None},
        {"metric": "ECG 10 s @ 250 Hz, ours", "value": 1e3 * ours, "unit": "ms", "target": None},
        {"metric": "ECG 10 s @ 250 Hz, neurokit2 ecgsyn", "value": 1e3 * theirs, "unit": "ms", "target": None},
        {"metric": "ECG speed-up vs neurokit2 ecgsyn", "value": theirs / ours, "unit": "x", "target": ">= 10"},
    ]
    raw.update({"ecg_ours_s": ours, "ecg_neurokit2_s": theirs, "load_average": os.getloadavg()})
    return {"rows": rows, **raw}


if __name__ == "__main__":
    for row in run(quick=True)["rows"]:
        print(f"{row['metric']:<52} {row['value']:>10.3f} {row['unit']:<8} {row['target'] or ''}")
