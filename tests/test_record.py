"""The recorder without sockets: segments, rotation, restarts, gaps, and what the files hold."""
from __future__ import annotations

import json
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from echopulse.stream import protocol
from echopulse.stream.protocol import FrameMessage, StatusMessage
from echopulse.stream.record import Recorder, RotatePolicy

from _beat_publisher import expected_frame

SHAPE = (24, 30)


def frame_msg(device: str, seq: int, *, shape=SHAPE, gap: int = 0, frames: int = 5, rr: float = 0.5) -> FrameMessage:
    beat, frame = divmod(seq, frames)
    header = {"v": 1, "device": device, "seq": seq, "beat": beat, "frame": frame, "frames": frames,
              "t": beat * rr + frame * rr / frames, "r_time": beat * rr, "rr": rr, "hr": 60 / rr, "model": "sim",
              "capture": 100.0 + seq, "publish": 100.01 + seq, "latency": 0.01, "ecg": b"\x00\x00\x80\x3f"}
    pixels = expected_frame(0, beat, frame, frames, seq, shape)
    msg = protocol.decode([bytes(p) for p in protocol.encode_frame(header, pixels)])
    assert isinstance(msg, FrameMessage)
    return FrameMessage(msg.topic, msg.header, msg.pixels, gap=gap)


def read_mp4_gray(path, shape: tuple[int, int]) -> np.ndarray:
    """Every frame of an MP4 as uint8 N×H×W, decoded by the ffmpeg that imageio-ffmpeg ships."""
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "gray", "-"], capture_output=True, timeout=60, check=True)
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, *shape)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _segments(out) -> list[dict]:
    return [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]


def test_segments_rotate_on_frames_restart_and_shape(tmp_path):
    clock = Clock()
    rec = Recorder(tmp_path, RotatePolicy(rotate_s=600, rotate_frames=8), clock=clock)
    sent = [frame_msg("a", s) for s in range(10)]                     # 8 + 2: rotates on frames
    sent += [frame_msg("a", s) for s in range(3)]                      # seq back to 0: the publisher restarted
    sent += [frame_msg("a", s, shape=(20, 20)) for s in range(3, 5)]   # new frame size
    sent += [frame_msg("b", s) for s in range(4)]
    for msg in sent:
        clock.now += 0.1
        rec.add(msg)
    rec.close()
    lines = _segments(tmp_path)
    assert [(x["device"], x["opened"], x["closed"], x["frames"]) for x in lines] == [
        ("a", "start", "rotate_frames", 8), ("a", "rotate_frames", "restart", 2), ("a", "restart", "shape", 3),
        ("a", "shape", "stopped", 2), ("b", "start", "stopped", 4)]
    assert rec.frames == len(sent) == sum(x["frames"] for x in lines)
    # Every frame is in exactly one NPZ, bit for bit, with its header fields.
    got = []
    for line in lines:
        with np.load(tmp_path / line["device"] / line["npz"]) as z:
            meta = json.loads(str(z["meta"]))
            assert meta["closed"] == line["closed"] and meta["mp4"] == line["mp4"]
            for i in range(len(z["seq"])):
                header = json.loads(z["headers"][i])
                assert "ecg" not in header  # binary fields stay out of the JSON
                assert z["t"][i] == header["t"] and z["beat_frames"][i] == header["frames"]
                got.append((line["device"], int(z["seq"][i]), z["frames"][i]))
    assert len(got) == len(sent)
    for (device, seq, pixels), msg in zip(got, sent):
        assert (device, seq) == (msg.device, msg.seq)
        np.testing.assert_array_equal(pixels, msg.pixels)


def test_mp4_has_every_frame_close_to_the_original(tmp_path):
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=100))
    sent = [frame_msg("a", s, shape=(25, 31)) for s in range(12)]  # odd sides: padded, not rescaled
    for msg in sent:
        rec.add(msg)
    rec.close()
    (line,) = _segments(tmp_path)
    assert line["fps"] == pytest.approx(10.0)  # 5 frames per 0.5 s beat
    video = read_mp4_gray(tmp_path / "a" / line["mp4"], (26, 32))
    assert video.shape == (len(sent), 26, 32)  # padded to even sides
    for frame, msg in zip(video, sent):
        gray = frame[:25, :31].astype(float)
        assert np.abs(gray - msg.pixels).mean() < 12  # H.264 is lossy; a wrong frame differs by ~40


def test_rotate_on_time_and_gaps_are_marked_not_split(tmp_path):
    clock = Clock()
    rec = Recorder(tmp_path, RotatePolicy(rotate_s=2.0, rotate_frames=1000), clock=clock)
    rec.add(frame_msg("a", 0))
    rec.add(frame_msg("a", 5, gap=4))  # four frames lost in transit
    clock.now += 2.5
    rec.tick()                          # no frame needed to close an old segment
    assert not rec.open
    rec.add(frame_msg("a", 6))
    rec.close()
    first, second = _segments(tmp_path)
    assert (first["closed"], first["frames"], first["lost"]) == ("rotate_time", 2, 4)
    assert second["opened"] == "rotate_time" and second["seq"] == [6, 6]  # once "start"
    with np.load(tmp_path / "a" / first["npz"]) as z:
        assert list(z["gap"]) == [0, 4] and list(z["seq"]) == [0, 5]
        assert list(z["recv"]) == [clock.now - 2.5] * 2


@pytest.mark.parametrize("device", ["ward3.bed12", "..", ".hidden", "Patient-Müller-" + "é" * 60])
def test_device_ids_with_dots_or_too_long_keep_every_segment_inside_out(tmp_path, device):
    out = tmp_path / "out"
    rec = Recorder(out, RotatePolicy(rotate_frames=4))
    for s in range(12):
        rec.add(frame_msg(device, s))
    rec.close()
    segments = _segments(out)
    assert len(segments) == 3 and len({s["npz"] for s in segments}) == 3  # "ward3.bed12" once overwrote one file
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert all(p.is_relative_to(out) for p in files) and not (tmp_path / "out_").exists()
    npz = sorted(p for p in files if p.suffix == ".npz")
    assert [p.name for p in npz] == sorted(s["npz"] for s in segments)
    for path, first in zip(npz, (0, 4, 8)):
        with np.load(path) as z:
            assert list(z["seq"]) == list(range(first, first + 4))


def test_statuses_go_to_jsonl(tmp_path):
    rec = Recorder(tmp_path)
    status = {"v": 1, "device": "a", "code": "signal_lost", "message": "flat", "counters": {"x": 1}, "time": 5.0}
    rec.add(StatusMessage("status/a", status))
    rec.close()
    assert [json.loads(x) for x in (tmp_path / "statuses.jsonl").read_text().splitlines()] == [status]
    assert not (tmp_path / "segments.jsonl").exists()


def test_policy_rejects_nonsense(tmp_path):
    with pytest.raises(ValueError):
        RotatePolicy(rotate_s=0)
    with pytest.raises(ValueError):
        RotatePolicy(rotate_frames=0)
    with pytest.raises(ValueError):
        Recorder(tmp_path, mp4_queue_frames=0)
    with pytest.raises(ValueError):
        Recorder(tmp_path, mp4_timeout_s=0)


@pytest.mark.parametrize("argv, words", [
    (["record", "tcp://127.0.0.1:5556", "--out", "{tmp}/r", "--rotate-s", "0"], "rotate-s must be between"),
    (["record", "tcp://127.0.0.1:5556", "--out", "{tmp}/r", "--rotate-frames", "0"], "rotate-frames must be 1 or more"),
    (["record", "nonsense", "--out", "{tmp}/r"], "cannot connect"),
    (["record", "tcp://127.0.0.1:5556", "--out", "{tmp}/file.txt/r"], "--out"),
    (["record", "tcp://127.0.0.1:5556", "--out", "{tmp}/r", "--mp4-queue", "0"], "mp4-queue must be 1 or more"),
    (["record", "tcp://127.0.0.1:5556", "--out", "{tmp}/r", "--mp4-timeout", "0"], "mp4-timeout must be between"),
])
def test_record_bad_arguments_are_one_line_exit_2(argv, words, tmp_path, capsys):
    from echopulse.stream.cli import main

    (tmp_path / "file.txt").write_text("not a folder")
    try:
        status = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and words in err and len(err.splitlines()) == 1


def _strict_lines(path) -> list[dict]:
    def reject(word: str):
        raise ValueError(f"not JSON: {word}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_odd_statuses_and_headers_valid_in_v1_are_recorded(tmp_path):
    # Extra fields are allowed in v1: a publisher other than the engine may send bytes, NaN, nesting.
    status = {"v": 1, "device": "a", "code": "source", "message": "battery", "counters": {"volts": float("nan")},
              "time": 5.0, "raw": b"\x01\x02"}
    status_msg = protocol.decode(protocol.encode_status(status))
    frame = frame_msg("a", 0)
    header = {**frame.header, "probe": {"raw": b"\x00", "gain": float("inf")}}
    odd = FrameMessage(frame.topic, header, frame.pixels)
    rec = Recorder(tmp_path)
    rec.add(status_msg)                 # once: TypeError from json.dumps, the recorder stopped
    rec.add(odd)
    rec.add(frame_msg("b", 0))
    rec.close()                         # once: TypeError in header_json, both NPZs lost
    (saved,) = _strict_lines(tmp_path / "statuses.jsonl")
    assert saved["counters"] == {"volts": None} and "raw" not in saved and saved["message"] == "battery"
    assert sorted(s["device"] for s in _strict_lines(tmp_path / "segments.jsonl")) == ["a", "b"]
    with np.load(tmp_path / "a" / rec.closed[0]["npz"]) as z:
        assert json.loads(z["headers"][0])["probe"] == {"gain": None}


def test_a_segment_that_cannot_be_written_does_not_lose_the_others(tmp_path, monkeypatch):
    from echopulse.stream import record

    rec = Recorder(tmp_path)
    for device in ("a", "b", "c"):
        rec.add(frame_msg(device, 0))
    real_close = record.Segment.close

    def close(self):
        if self.device == "b":
            self.video.done.wait(10)    # no ffmpeg left behind
            raise OSError("disk full")
        return real_close(self)

    monkeypatch.setattr(record.Segment, "close", close)
    rec.close()                         # once: the OSError ended close() and "c" was never written
    assert rec.failed == 1 and not rec.open
    assert [s["device"] for s in _segments(tmp_path)] == ["a", "c"]
    monkeypatch.undo()
    rec.add(frame_msg("b", 1))          # and recording goes on
    rec.close()
    assert [s["device"] for s in _segments(tmp_path)] == ["a", "c", "b"]


def test_record_help_states_the_recorders_mp4_defaults(capsys):
    from echopulse.stream import record
    from echopulse.stream.cli import main

    with pytest.raises(SystemExit):
        main(["record", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(default {record.MP4_QUEUE_FRAMES})" in text and f"(default {record.MP4_TIMEOUT_S:g})" in text
