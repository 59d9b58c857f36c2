"""The NPZ of a segment does not depend on its MP4: a failing video writer (ffmpeg missing,
crashing, refusing a frame size, a disk error while encoding) costs the MP4 only, and is
logged and counted; the next segment tries the MP4 again. Other writes that can fail on
a long run (the JSON lines, odd but valid header values) cost no frames either."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from echopulse.stream.protocol import FrameMessage
from echopulse.stream.record import Recorder, RotatePolicy

from test_record import frame_msg, read_mp4_gray


def _lines(out, name: str = "segments.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _npz(out, line: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    with np.load(out / line["device"] / line["npz"]) as z:
        return json.loads(str(z["meta"])), z["seq"], z["frames"]


def _record(rec: Recorder, devices: tuple[str, ...], seqs: range) -> list[FrameMessage]:
    sent = [frame_msg(device, s) for s in seqs for device in devices]
    for msg in sent:
        rec.add(msg)
    return sent


def test_npz_is_written_when_the_mp4_writer_cannot_start_and_later_segments_retry(tmp_path, monkeypatch, caplog):
    import imageio.v2

    def no_ffmpeg(*args, **kwargs):
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(imageio.v2, "get_writer", no_ffmpeg)
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=4))
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.record"):
        sent = _record(rec, ("a", "b"), range(4))   # once: the RuntimeError left add() and the recorder stopped
        rec.close()                                 # the segments closed on frames; their NPZs wait for the MP4s
    assert rec.mp4_failed == 2 and rec.failed == 0 and not rec.open
    for line in _lines(tmp_path):
        meta, seq, frames = _npz(tmp_path, line)
        assert line["mp4"] is None and meta["mp4"] is None and meta["mp4_frames"] == 0
        assert "No ffmpeg exe" in meta["mp4_error"] == line["mp4_error"]
        assert list(seq) == [0, 1, 2, 3]
        for pixels, msg in zip(frames, [m for m in sent if m.device == line["device"]]):
            np.testing.assert_array_equal(pixels, msg.pixels)
    assert not list(tmp_path.rglob("*.mp4"))
    assert sum("MP4" in r.getMessage() and "No ffmpeg exe" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.undo()                              # ffmpeg is back: the next segment has its MP4
    _record(rec, ("a",), range(4, 8))
    rec.close()
    last = _lines(tmp_path)[-1]
    assert last["mp4_error"] is None and last["mp4_frames"] == 4
    assert len(read_mp4_gray(tmp_path / "a" / last["mp4"], (24, 30))) == 4


@pytest.mark.parametrize("fail_on", ["append_data", "close"])
def test_npz_is_written_when_the_mp4_writer_fails_while_encoding(tmp_path, monkeypatch, fail_on):
    import imageio.v2

    real_get_writer = imageio.v2.get_writer
    calls = {"append_data": 0}

    def failing_writer(*args, **kwargs):
        writer = real_get_writer(*args, **kwargs)
        real_append, real_close = writer.append_data, writer.close

        def append_data(image, *rest):
            calls["append_data"] += 1
            if fail_on == "append_data" and calls["append_data"] == 3:
                raise OSError(28, "No space left on device")
            return real_append(image, *rest)

        def close():
            real_close()                            # ffmpeg gone either way: nothing left running
            if fail_on == "close":
                raise OSError("ffmpeg crashed")

        writer.append_data, writer.close = append_data, close
        return writer

    monkeypatch.setattr(imageio.v2, "get_writer", failing_writer)
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=100))
    sent = _record(rec, ("a",), range(6))
    rec.close()                                     # once (close): the OSError lost the NPZ
    (line,) = _lines(tmp_path)
    meta, seq, frames = _npz(tmp_path, line)
    assert list(seq) == list(range(6)) and rec.failed == 0 and rec.mp4_failed == 1
    np.testing.assert_array_equal(frames, np.stack([m.pixels for m in sent]))
    expected_error = "No space left" if fail_on == "append_data" else "ffmpeg crashed"
    assert expected_error in meta["mp4_error"] and meta["mp4_error"] == line["mp4_error"]
    if fail_on == "append_data":                    # the MP4 holds the frames before the failure, and says so
        assert meta["mp4_frames"] == 2 and calls["append_data"] == 3
        assert len(read_mp4_gray(tmp_path / "a" / line["mp4"], (24, 30))) == 2
    else:
        assert meta["mp4_frames"] == 6


def test_a_frame_size_the_encoder_refuses_leaves_no_empty_mp4_behind(tmp_path):
    # libx264 refuses 20000 pixels wide; ffmpeg then writes an empty file and imageio says nothing
    rec = Recorder(tmp_path)
    sent = [frame_msg("wide", s, shape=(2, 20000)) for s in range(3)]
    for msg in sent:
        rec.add(msg)
    rec.close()
    (line,) = _lines(tmp_path)
    meta, seq, frames = _npz(tmp_path, line)
    assert list(seq) == [0, 1, 2] and frames.shape == (3, 2, 20000)
    assert meta["mp4"] is None and "no video" in meta["mp4_error"] and rec.mp4_failed == 1
    assert not list(tmp_path.rglob("*.mp4"))        # once: a 0-byte MP4 that the index called fine


def test_unwritable_index_files_are_counted_not_fatal(tmp_path, caplog):
    (tmp_path / "statuses.jsonl").mkdir()           # any write to them fails, as on a full disk
    (tmp_path / "segments.jsonl").mkdir()
    from echopulse.stream.protocol import StatusMessage

    status = {"v": 1, "device": "a", "code": "signal_lost", "message": "flat", "counters": {}, "time": 5.0}
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=2))
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.record"):
        rec.add(StatusMessage("status/a", status))  # once: IsADirectoryError out of add()
        _record(rec, ("a",), range(4))
        rec.close()
    assert rec.lines_failed == 3 and rec.failed == 0
    assert [line["seq"] for line in rec.closed] == [[0, 1], [2, 3]]
    for line in rec.closed:                         # the NPZs are there all the same
        assert list(_npz(tmp_path, line)[1]) == list(range(line["seq"][0], line["seq"][1] + 1))
    assert any("statuses.jsonl" in r.getMessage() for r in caplog.records)


def test_valid_seq_beyond_int64_does_not_lose_the_segment(tmp_path):
    # seq is any non-negative int in v1, and msgpack carries up to 2**64 - 1
    base = frame_msg("a", 0)
    big = 2**63 + 5
    msgs = [FrameMessage(base.topic, {**base.header, "seq": big + i}, base.pixels, gap=big if i == 0 else 0)
            for i in range(3)]
    rec = Recorder(tmp_path)
    for msg in msgs:
        rec.add(msg)
    rec.close()                                     # once: OverflowError building the int64 column, NPZ lost
    assert rec.failed == 0
    (line,) = _lines(tmp_path)
    with np.load(tmp_path / "a" / line["npz"]) as z:
        assert [int(s) for s in z["seq"]] == [big, big + 1, big + 2]
        assert [int(g) for g in z["gap"]] == [big, 0, 0]


def test_index_lines_kept_in_memory_are_bounded_on_long_runs(tmp_path, monkeypatch):
    from echopulse.stream import record

    monkeypatch.setattr(record, "CLOSED_KEPT", 3)
    rec = Recorder(tmp_path, RotatePolicy(rotate_frames=1))
    _record(rec, ("a",), range(10))
    rec.close()
    assert rec.segments == 10 and len(_lines(tmp_path)) == 10
    assert [line["seq"][0] for line in rec.closed] == [7, 8, 9]  # once: every line ever, for good
