"""The MP4 is encoded off the receiving thread: a slow ffmpeg does not hold up receiving, a full
queue costs MP4 frames only (counted, logged, in the meta), and a hung ffmpeg is abandoned
within the timeout, at close and on SIGTERM, with every frame in the NPZ."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from echopulse.stream.record import Recorder, RotatePolicy
from echopulse.stream.subscribe import Subscriber

from _beat_publisher import BeatPublisher, expected_frame
from test_record import SHAPE, frame_msg, read_mp4_gray


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]


def _npz(out: Path, line: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    with np.load(out / line["device"] / line["npz"]) as z:
        return json.loads(str(z["meta"])), z["seq"], z["frames"]


def _delay_appends(monkeypatch: pytest.MonkeyPatch, delay: Callable[[], object]) -> None:
    """Real imageio writers whose append_data first calls `delay` (a slow or stuck encoder)."""
    import imageio.v2

    real_get_writer = imageio.v2.get_writer

    def get_writer(*args, **kwargs):
        writer = real_get_writer(*args, **kwargs)
        real_append = writer.append_data

        def append_data(image, *rest):
            delay()
            return real_append(image, *rest)

        writer.append_data = append_data
        return writer

    monkeypatch.setattr(imageio.v2, "get_writer", get_writer)


@pytest.fixture
def hung_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """imageio runs an "ffmpeg" that never reads its input nor exits: a hung ffmpeg. Yields
    the file where each one writes its pid; kills any left at the end."""
    script, pids = tmp_path / "hung-ffmpeg", tmp_path / "ffmpeg.pids"
    script.write_text(f"#!{sys.executable}\nimport os, time\n"
                      "with open(os.environ['HUNG_FFMPEG_PIDS'], 'a') as f:\n    f.write(f'{os.getpid()}\\n')\n"
                      "time.sleep(600)\n")
    script.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(script))
    monkeypatch.setenv("HUNG_FFMPEG_PIDS", str(pids))
    yield pids
    for pid in _pids(pids):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running, not a zombie: an ffmpeg the recorder killed may wait for its reaper a while."""
    try:
        os.kill(pid, 0)
        state = Path("/proc", str(pid), "stat").read_text().rpartition(")")[2].split()[0]  # Linux
    except ProcessLookupError:
        return False
    except OSError:  # no /proc: signal 0 went through
        return True
    return state != "Z"


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.network
def test_a_slow_encoder_does_not_hold_up_receiving(tmp_path, monkeypatch):
    streaming = threading.Event()
    streaming.set()
    # 0.1 s a frame while the stream runs: ten times slower than the 100 frames/s published
    _delay_appends(monkeypatch, lambda: streaming.is_set() and time.sleep(0.1))
    shape = (48, 64)
    rec = Recorder(tmp_path)
    publisher = BeatPublisher("tcp://127.0.0.1:0", ("a",), rr=0.1, frames=10, shape=shape).start_and_wait()
    seqs: list[int] = []
    try:
        with Subscriber(publisher.endpoint) as sub:
            first = sub.recv(timeout=10)    # the subscription is through (slow joiner)
            assert first is not None
            rec.add(first)
            seqs.append(first.seq)
            stop_at = time.monotonic() + 1.5
            while time.monotonic() < stop_at:
                _receive(sub, rec, seqs)
            publisher.stop()
            # What is on its way arrives within a second; once each add waited for ffmpeg: ~20 of 150
            drained_by = time.monotonic() + 1.0
            while time.monotonic() < drained_by:
                _receive(sub, rec, seqs)
            assert sub.lost == {}
    finally:
        publisher.stop()
    # none lost, and all in time but what the publisher's closing socket (LINGER 0) may cut from its last beat
    assert seqs == list(range(first.seq, seqs[-1] + 1)) and seqs[-1] >= publisher.sent - 10 and len(seqs) > 100
    streaming.clear()                       # ffmpeg at full speed: the queued frames go through at close
    rec.close()
    (line,) = _lines(tmp_path)
    meta, seq, frames = _npz(tmp_path, line)
    assert list(seq) == seqs and line["frames"] == len(seqs)
    for pixels, s in zip(frames, seq):
        beat, frame = divmod(int(s), 10)
        np.testing.assert_array_equal(pixels, expected_frame(0, beat, frame, 10, int(s), shape))
    # the encoder fell behind: what the queue could not hold is left out of the MP4, and says so
    assert meta["mp4_frames"] + meta["mp4_skipped"] == len(seqs) and meta["mp4_error"] is None
    assert meta["mp4_skipped"] == line["mp4_skipped"] == rec.mp4_skipped > 0
    assert len(read_mp4_gray(tmp_path / "a" / line["mp4"], shape)) == meta["mp4_frames"]


def _receive(sub: Subscriber, rec: Recorder, seqs: list[int]) -> None:
    msg = sub.recv(timeout=0.05)
    if msg is not None:
        rec.add(msg)
        seqs.append(msg.seq)


def test_a_full_queue_leaves_frames_out_of_the_mp4_not_the_npz(tmp_path, monkeypatch, caplog):
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(30)

    _delay_appends(monkeypatch, hold)
    rec = Recorder(tmp_path, mp4_queue_frames=3)
    sent = [frame_msg("a", s) for s in range(20)]
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.record"):
        rec.add(sent[0])
        assert holding.wait(10)             # the encoder is stuck on frame 0
        started = time.monotonic()
        for msg in sent[1:]:                # 3 queue up, 16 are left out of the MP4
            rec.add(msg)
        assert time.monotonic() - started < 1.0
        live = [r.getMessage() for r in caplog.records if "MP4 encoder behind" in r.getMessage()]
        release.set()
        rec.close()
    assert len(live) == 1 and "1 in all" in live[0]     # rate-limited: one line, not 16
    # the 15 held back are written at close, not lost with the process
    behind = [r.getMessage() for r in caplog.records if "MP4 encoder behind" in r.getMessage()]
    assert len(behind) == 2 and "16 in all; 15 since the last report" in behind[1]
    assert any("16 of 20 frame(s) left out of the MP4" in r.getMessage() for r in caplog.records)
    (line,) = _lines(tmp_path)
    meta, seq, frames = _npz(tmp_path, line)
    assert list(seq) == list(range(20)) and line["frames"] == 20
    np.testing.assert_array_equal(frames, np.stack([m.pixels for m in sent]))
    assert (meta["mp4_frames"], meta["mp4_skipped"], meta["mp4_error"]) == (4, 16, None)
    assert line["mp4_skipped"] == rec.mp4_skipped == 16 and rec.mp4_failed == rec.mp4_abandoned == 0
    video = read_mp4_gray(tmp_path / "a" / line["mp4"], SHAPE)
    assert len(video) == 4                  # frames 0-3: those the encoder took
    for gray, msg in zip(video, sent):
        assert np.abs(gray.astype(float) - msg.pixels).mean() < 12


@pytest.mark.parametrize("shape, where", [(SHAPE, "close"), ((300, 300), "append_data")])
def test_a_hung_ffmpeg_is_abandoned_within_the_timeout(tmp_path, hung_ffmpeg, caplog, shape, where):
    # Small frames all fit in ffmpeg's input pipe and the writer hangs in close; a 90 kB frame
    # fills the pipe at once and the writer hangs in append_data.
    out = tmp_path / "rec"
    rec = Recorder(out, mp4_timeout_s=0.5)
    sent = [frame_msg("a", s, shape=shape) for s in range(10)]
    started = time.monotonic()
    for msg in sent:
        rec.add(msg)
    assert time.monotonic() - started < 1.0  # receiving never waits on ffmpeg
    assert _wait_for(lambda: len(_pids(hung_ffmpeg)) == 1)
    with caplog.at_level(logging.ERROR, logger="echopulse.stream.record"):
        closing = threading.Thread(target=rec.close, daemon=True)
        started = time.monotonic()
        closing.start()
        closing.join(10)
    assert not closing.is_alive(), "close() waited on a hung ffmpeg"
    assert time.monotonic() - started < 0.5 + 2.0
    (line,) = _lines(out)
    meta, seq, frames = _npz(out, line)
    assert list(seq) == list(range(10))
    np.testing.assert_array_equal(frames, np.stack([m.pixels for m in sent]))
    assert "abandoned: ffmpeg did not finish within 0.5 s" in meta["mp4_error"] and meta["mp4"] is None
    # hung in close: every frame went to ffmpeg; hung in append_data: none did, all counted as skipped
    assert meta["mp4_skipped"] == (0 if where == "close" else 10) == rec.mp4_skipped
    assert rec.mp4_abandoned == rec.mp4_failed == 1 and rec.failed == 0
    assert any("abandoned" in r.getMessage() for r in caplog.records)
    (pid,) = _pids(hung_ffmpeg)
    assert _wait_for(lambda: not _alive(pid)), "the hung ffmpeg was left running"


@pytest.mark.network
def test_sigterm_with_a_hung_ffmpeg_exits_within_the_timeout(tmp_path, hung_ffmpeg, unused_port):
    endpoint, out, devices = f"tcp://127.0.0.1:{unused_port}", tmp_path / "rec", ("dev-a", "dev-b")
    proc = subprocess.Popen([sys.executable, "-m", "echopulse.stream.cli", "record", endpoint, "--out", str(out),
                             "--mp4-timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "error"})
    publisher = BeatPublisher(endpoint, devices, rr=0.1, frames=10).start_and_wait()
    try:
        # one ffmpeg per device started: frames came, and 96×96 frames soon fill its pipe
        assert _wait_for(lambda: len(_pids(hung_ffmpeg)) == 2 or proc.poll() is not None, 30)
        assert proc.poll() is None and len(_pids(hung_ffmpeg)) == 2, "no frames recorded"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=20)  # once: stuck in append_data for good
        took = time.monotonic() - started
    finally:
        publisher.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert took < 1.0 + 4.0
    assert "2 MP4 writer(s) abandoned" in err.decode()
    lines = _lines(out)
    assert sorted(line["device"] for line in lines) == sorted(devices)
    for line in lines:
        meta, seq, _ = _npz(out, line)
        assert "abandoned" in meta["mp4_error"] and len(seq) == line["frames"] > 10
        assert np.all(np.diff(seq) == 1)    # every frame received, none lost while ffmpeg hung
    assert _wait_for(lambda: not any(_alive(pid) for pid in _pids(hung_ffmpeg)))


def test_rotation_does_not_wait_for_a_hung_ffmpeg_and_tick_writes_the_segment(tmp_path, hung_ffmpeg):
    out = tmp_path / "rec"
    rec = Recorder(out, RotatePolicy(rotate_frames=5), mp4_timeout_s=0.3)
    started = time.monotonic()
    for s in range(12):                     # two segments close on the receiving thread, each ffmpeg hung
        rec.add(frame_msg("a", s, shape=(300, 300)))
    assert time.monotonic() - started < 1.0
    assert _wait_for(lambda: rec.tick() or rec.segments == 2, 5)  # no close() needed: tick writes them
    assert [line["seq"] for line in _lines(out)] == [[0, 4], [5, 9]] and list(rec.open) == ["a"]
    assert all("abandoned" in line["mp4_error"] and line["mp4_skipped"] == 5 for line in _lines(out))
    rec.close()
    assert rec.segments == 3 and rec.mp4_abandoned == 3 and rec.mp4_skipped == 12
    assert _wait_for(lambda: len(_pids(hung_ffmpeg)) == 3 and not any(_alive(p) for p in _pids(hung_ffmpeg)))


def test_a_devices_segments_are_written_in_order_when_an_older_mp4_finishes_last(tmp_path, monkeypatch):
    release = threading.Event()

    def hold_segment_0() -> None:           # segment 0's encoder is slow, segment 1's is not
        if threading.current_thread().name.endswith("segment 0"):
            release.wait(30)

    _delay_appends(monkeypatch, hold_segment_0)
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=3))
    for s in range(6):
        rec.add(frame_msg("a", s))
    assert _wait_for(lambda: rec.closing[1].video.done.is_set())  # segment 1's MP4 is done first
    rec.tick()
    assert rec.segments == 0                # held back behind segment 0
    release.set()
    assert _wait_for(lambda: rec.tick() or rec.segments == 2)
    assert [line["segment"] for line in _lines(tmp_path)] == [0, 1]
    assert all(line["mp4_frames"] == 3 and line["mp4_error"] is None for line in _lines(tmp_path))
