"""`echopulse record` as a process: it keeps recording across a publisher restart on the same port,
and SIGTERM leaves readable MP4 and NPZ files holding both runs' frames."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _beat_publisher import BeatPublisher, expected_frame
from test_record import read_mp4_gray

pytestmark = pytest.mark.network

DEVICES = ("dev-a", "dev-b")
SHAPE = (32, 40)


def _wait(condition, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"recorder died: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _segments(out: Path) -> list[dict]:
    path = out / "segments.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_record_survives_publisher_restart(tmp_path, unused_port):
    endpoint = f"tcp://127.0.0.1:{unused_port}"
    out = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "echopulse.stream.cli", "record", endpoint, "--out", str(out),
                             "--rotate-s", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
    try:
        for run in ("run1", "run2"):
            publisher = BeatPublisher(endpoint, DEVICES, rr=0.2, frames=5, shape=SHAPE, model=run).start_and_wait()
            try:
                if run == "run1":  # the recorder has opened a segment per device: it hears us
                    _wait(lambda: all(list((out / d).glob("*.mp4")) for d in DEVICES), "first frames", proc)
                else:              # seq went back to 0: the first run's segments closed as "restart"
                    _wait(lambda: sum(s["closed"] == "restart" for s in _segments(out)) == 2, "restart", proc)
                time.sleep(0.6)    # a few more beats
            finally:
                publisher.stop()   # closes the socket: the port is free for the next run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    segments = _segments(out)
    assert sorted((s["device"], s["opened"], s["closed"]) for s in segments) == sorted(
        [(d, "start", "restart") for d in DEVICES] + [(d, "restart", "stopped") for d in DEVICES])
    for s in segments:
        k = DEVICES.index(s["device"])
        with np.load(out / s["device"] / s["npz"]) as z:
            models = set(z["model"])
            assert models == ({"run1"} if s["opened"] == "start" else {"run2"})
            assert s["frames"] == len(z["seq"]) >= 5
            assert np.all(np.diff(z["seq"]) > 0) and np.all(np.diff(z["t"]) > 0)
            for i, seq in enumerate(z["seq"]):
                expected = expected_frame(k, int(z["beat"][i]), int(z["frame"][i]), 5, int(seq), SHAPE)
                np.testing.assert_array_equal(z["frames"][i], expected)
            frames = len(z["seq"])
        assert len(read_mp4_gray(out / s["device"] / s["mp4"], SHAPE)) == frames
