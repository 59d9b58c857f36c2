"""Protocol v1: encode/decode round trips and every way a header can be wrong."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from echopulse.stream import protocol
from echopulse.stream.protocol import FrameMessage, ProtocolError, StatusMessage


def frame_header(**changes) -> dict:
    header = {
        "v": 1, "device": "dev1", "seq": 7, "beat": 2, "frame": 3, "frames": 10, "t": 12.5,
        "r_time": 12.2, "rr": 0.8, "hr": 75.0, "model": "sim", "capture": 1.7e9, "publish": 1.7e9 + 0.01,
        "latency": 0.01,
    }
    header.update(changes)
    return header


def status_map(**changes) -> dict:
    status = {"v": 1, "device": "dev1", "code": "overload", "message": "dropped 1 beat",
              "counters": {"beats_dropped": 1}, "time": 1.7e9}
    status.update(changes)
    return status


def test_frame_round_trip_keeps_header_and_pixels():
    pixels = np.arange(64 * 48, dtype=np.uint32).astype(np.uint8).reshape(64, 48)
    parts = protocol.encode_frame(frame_header(), pixels)
    assert parts[0] == b"echo/dev1"
    msg = protocol.decode([bytes(p) for p in parts])
    assert isinstance(msg, FrameMessage)
    assert msg.header == {**frame_header(), "shape": [64, 48], "dtype": "uint8"}
    np.testing.assert_array_equal(msg.pixels, pixels)
    assert not msg.pixels.flags.writeable


def test_frame_encode_sends_pixels_without_copy():
    pixels = np.zeros((128, 128), dtype=np.uint8)
    buffer = protocol.encode_frame(frame_header(), pixels)[2]
    assert np.shares_memory(np.frombuffer(buffer, dtype=np.uint8), pixels)


def test_status_round_trip():
    parts = protocol.encode_status(status_map())
    msg = protocol.decode(parts)
    assert isinstance(msg, StatusMessage)
    assert msg.topic == "status/dev1" and msg.code == "overload" and msg.status == status_map()


@pytest.mark.parametrize("field", sorted(set(frame_header()) | {"shape", "dtype"}))
def test_header_missing_field_is_named(field):
    header = {**frame_header(), "shape": [4, 4], "dtype": "uint8"}
    del header[field]
    with pytest.raises(ProtocolError, match=field):
        protocol.validate_header(header)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"v": 2}, "version"),
        ({"seq": -1}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"seq": True}, "seq"),
        ({"t": math.nan}, "finite"),
        ({"hr": 0.0}, "hr"),
        ({"rr": -0.8}, "rr"),
        ({"frame": 10}, "out of range"),
        ({"device": "a/b"}, "device"),
        ({"device": ""}, "device"),
        ({"device": "dev 1"}, "device"),
        ({"model": ""}, "model"),
        ({"shape": [4]}, "shape"),
        ({"shape": [4, 0]}, "shape"),
        ({"dtype": "float32"}, "dtype"),
    ],
)
def test_header_bad_field_is_rejected(changes, words):
    header = {**frame_header(), "shape": [4, 4], "dtype": "uint8", **changes}
    with pytest.raises(ProtocolError, match=words):
        protocol.validate_header(header)


def test_header_extra_fields_are_allowed():
    header = {**frame_header(), "shape": [4, 4], "dtype": "uint8", "ef": 0.6}
    assert protocol.validate_header(header) is header


@pytest.mark.parametrize(
    "changes, words",
    [({"code": "weird"}, "unknown status code"), ({"counters": {"a": "x"}}, "counters"), ({"time": math.inf}, "finite")],
)
def test_status_bad_field_is_rejected(changes, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.validate_status(status_map(**changes))


def test_encode_rejects_non_uint8_pixels():
    with pytest.raises(ProtocolError, match="uint8"):
        protocol.encode_frame(frame_header(), np.zeros((4, 4), dtype=np.float32))


def good_parts() -> list[bytes]:
    return [bytes(p) for p in protocol.encode_frame(frame_header(), np.zeros((4, 4), dtype=np.uint8))]


@pytest.mark.parametrize(
    "mangle, words",
    [
        (lambda p: p[:2], "3 parts"),
        (lambda p: [p[0], p[1], p[2][:-1]], "needs 16"),
        (lambda p: [b"echo/other", p[1], p[2]], "does not match"),
        (lambda p: [p[0], b"\xc1not msgpack", p[2]], "msgpack"),
        (lambda p: [p[0], msgpack.packb([1, 2]), p[2]], "must be a map"),
        (lambda p: [b"video/dev1", p[1], p[2]], "unknown topic"),
        (lambda p: [], "empty"),
    ],
)
def test_decode_rejects_malformed_messages(mangle, words):
    with pytest.raises(ProtocolError, match=words):
        protocol.decode(mangle(good_parts()))


@pytest.mark.parametrize("device", ["bed1\n", "bed1\r\n", "\nbed1", "bed 1", "bed1\t", "a/b", "", "x" * 129])
def test_device_ids_with_whitespace_or_slash_are_rejected(device):
    with pytest.raises(ProtocolError, match="device id"):
        protocol.check_device(device)  # "bed1\n" once passed: re.match with "$" allows a final newline
    with pytest.raises(ProtocolError):
        protocol.validate_header({**frame_header(device=device), "shape": [4, 4], "dtype": "uint8"})


def strict_json(text: str):
    """json.loads as a browser's JSON.parse reads: NaN and Infinity are errors."""
    import json

    def reject(word: str):
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=reject)


def test_header_json_of_any_valid_header_is_strict_json():
    odd = {"probe": {"raw": b"\x00", "list": [b"\x01", 1.5, math.nan], b"key": 1}, "ecg": b"\0\0\0\0",
           "gain": math.inf, "stamp": msgpack.Timestamp(1, 0), "deep": [[[[1]]]] * 2}
    header = {**frame_header(), "shape": [4, 4], "dtype": "uint8", **odd}
    msg = protocol.decode([bytes(p) for p in protocol.encode_frame(header, np.zeros((4, 4), np.uint8))])
    got = strict_json(protocol.header_json(msg.header))  # once: TypeError on the nested bytes
    assert "ecg" not in got and got["gain"] is None and got["seq"] == 7
    assert got["probe"] == {"list": [None, 1.5, None], "key": 1}  # bytes left out of maps, null in lists
    assert isinstance(got["stamp"], str) and got["deep"] == [[[[1]]]] * 2


def test_to_json_cuts_deep_nesting_instead_of_failing():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    text = protocol.to_json({"deep": deep})  # a recursion limit must not crash a recorder or viewer
    assert strict_json(text) and text.count("[") <= 40 and "null" in text
