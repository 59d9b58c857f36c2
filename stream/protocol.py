"""Protocol v1: the wire format of frames and status messages (DESIGN §5). The schema lives here.

Every message is a ZeroMQ multipart message.

Frames, one message per video frame::

    [b"echo/<device>", msgpack(header), raw pixels]

    header = {
        "v": 1,                  # protocol version
        "device": str,           # device id (no whitespace, no "/" so topics stay prefix-safe)
        "seq": int,              # per-device frame sequence, +1 per frame: gaps mean lost frames
        "beat": int,             # per-device beat index the frame belongs to
        "frame": int,            # index of the frame within its beat (0 = end-diastole at R)
        "frames": int,           # number of frames in this beat
        "t": float,              # ECG time of the frame, seconds on the device's clock
        "r_time": float,         # ECG time of the beat's R peak (s)
        "rr": float,             # RR interval of the beat (s)
        "hr": float,             # heart rate of the beat, bpm (60 / rr)
        "shape": [H, W],         # pixel array shape
        "dtype": "uint8",        # pixel type (the only one in v1)
        "model": str,            # backend/model that made the frame, e.g. "sim" or "model:tiny"
        "capture": float,        # wall clock (Unix s) when the ECG completing the beat arrived
        "publish": float,        # wall clock (Unix s) when the frame was sent
        "latency": float,        # publish - capture (s)
        # optional, sent by the engine so a viewer can draw the trace under the echo:
        "ecg": bytes,            # the beat's ECG, lead 0, mV, float32 little-endian, from
                                 # r_time for rr seconds; NaN where the stream had no data yet;
                                 # as the generator read it (pacing spikes removed)
        "ecg_fs": float,         # sample rate of "ecg" (the model rate, 250 Hz)
        # optional, from the model backends: what the device's video was primed with
        "prime": str,            # "reference" (the patient's own echo loop) or "simulated"
                                 # (a simulated heart: its EF is not the patient's)
    }

The pixels are the frame's raw bytes, row-major, ``prod(shape) * itemsize`` long.
Every frame of a beat carries the same "ecg", so a viewer that skips frames still has it.

Status, one message per event::

    [b"status/<device>", msgpack(status)]

    status = {"v": 1, "device": str, "code": str (one of STATUS_CODES), "message": str,
              "counters": {str: int | float}, "time": float (wall clock, Unix s)}

A subscriber subscribing to ``echo/dev1`` also receives ``echo/dev10`` (ZeroMQ topics are
prefixes): filter on ``header["device"]`` when that matters.
"""
from __future__ import annotations

import json

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import msgpack
import numpy as np

VERSION = 1
FRAME_PREFIX = "echo/"
STATUS_PREFIX = "status/"
DTYPES = ("uint8",)

# Status codes and what they mean.
STATUS_CODES = (
    "signal_lost",      # no data for N s, or a flat line (lead off): no beats are made meanwhile
    "signal_restored",  # data flows again after signal_lost
    "bad_input",        # NaN/inf, gap, out-of-order/duplicate seq, fs change, saturation, malformed payload
    "overload",         # beats were dropped because the engine could not keep up
    "source",           # a source event: disconnected, reconnected, ended
    "stopped",          # the engine stopped serving this device (clean shutdown, or silent past forget_after_s)
    "error",            # the engine failed on this device's data (a bug): the beat is skipped
)

_DEVICE_RE = re.compile(r"[^\s/]{1,128}")  # used with fullmatch: "$" would let "bed1\n" through

# name -> (accepted python types, check) for every header field.
_INT = (int,)
_NUM = (int, float)
_FRAME_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "v": (_INT, "version"),
    "device": ((str,), "device"),
    "seq": (_INT, "nonneg"),
    "beat": (_INT, "nonneg"),
    "frame": (_INT, "nonneg"),
    "frames": (_INT, "positive"),
    "t": (_NUM, "finite"),
    "r_time": (_NUM, "finite"),
    "rr": (_NUM, "positive"),
    "hr": (_NUM, "positive"),
    "shape": ((list, tuple), "shape"),
    "dtype": ((str,), "dtype"),
    "model": ((str,), "nonempty"),
    "capture": (_NUM, "finite"),
    "publish": (_NUM, "finite"),
    "latency": (_NUM, "finite"),
}
_STATUS_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "v": (_INT, "version"),
    "device": ((str,), "device"),
    "code": ((str,), "code"),
    "message": ((str,), "any"),
    "counters": ((dict,), "counters"),
    "time": (_NUM, "finite"),
}


class ProtocolError(ValueError):
    """A message that does not follow protocol v1 (missing or bad field, wrong size)."""


@dataclass(frozen=True)
class FrameMessage:
    """One decoded frame: its header and a read-only view of its pixels (H×W)."""

    topic: str
    header: dict[str, Any]
    pixels: np.ndarray
    gap: int = 0  # frames of this device lost just before this one (set by the subscriber)

    @property
    def device(self) -> str:
        return self.header["device"]

    @property
    def seq(self) -> int:
        return self.header["seq"]


@dataclass(frozen=True)
class StatusMessage:
    """One decoded status event."""

    topic: str
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.status["device"]

    @property
    def code(self) -> str:
        return self.status["code"]


Message = Union[FrameMessage, StatusMessage]


def check_device(device: Any) -> str:
    """Return `device` if it is a valid device id, else raise ProtocolError."""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ProtocolError(f"bad device id {device!r}: 1-128 characters, no whitespace or '/'")
    return device


def frame_topic(device: str) -> bytes:
    return (FRAME_PREFIX + check_device(device)).encode()


def status_topic(device: str) -> bytes:
    return (STATUS_PREFIX + check_device(device)).encode()


def _check_field(name: str, value: Any, types: tuple[type, ...], rule: str) -> None:
    # bool is an int subclass; a True where a number belongs is a bug upstream.
    if isinstance(value, bool) or not isinstance(value, types):
        raise ProtocolError(f"field {name!r} must be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if rule == "version" and value != VERSION:
        raise ProtocolError(f"unsupported protocol version {value!r} (this is v{VERSION})")
    if rule == "device":
        check_device(value)
    if rule == "nonneg" and value < 0:
        raise ProtocolError(f"field {name!r} must be >= 0, got {value}")
    if rule in ("finite", "positive") and not math.isfinite(value):
        raise ProtocolError(f"field {name!r} must be finite, got {value}")
    if rule == "positive" and value <= 0:
        raise ProtocolError(f"field {name!r} must be > 0, got {value}")
    if rule == "nonempty" and not value:
        raise ProtocolError(f"field {name!r} must not be empty")
    if rule == "dtype" and value not in DTYPES:
        raise ProtocolError(f"field 'dtype' must be one of {DTYPES}, got {value!r}")
    if rule == "shape" and not (
        len(value) == 2 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        raise ProtocolError(f"field 'shape' must be [H, W] of positive ints, got {value!r}")
    if rule == "code" and value not in STATUS_CODES:
        raise ProtocolError(f"unknown status code {value!r}; known: {', '.join(STATUS_CODES)}")
    if rule == "counters" and not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ProtocolError("field 'counters' must map names to numbers")


def _validate(kind: str, data: Any, fields: dict[str, tuple[tuple[type, ...], str]]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind} must be a map, got {type(data).__name__}")
    if "v" in data:  # another version may lack v1's fields: name the version, not the fields
        _check_field("v", data["v"], *fields["v"])
    missing = [name for name in fields if name not in data]
    if missing:
        raise ProtocolError(f"{kind} lacks field(s): {', '.join(missing)}")
    for name, (types, rule) in fields.items():
        _check_field(name, data[name], types, rule)
    return data


def validate_header(header: Any) -> dict[str, Any]:
    """Check a frame header against v1; return it, or raise ProtocolError naming the first problem.

    Extra fields are allowed (a later minor addition must not break old subscribers).
    """
    header = _validate("frame header", header, _FRAME_FIELDS)
    if header["frame"] >= header["frames"]:
        raise ProtocolError(f"frame index {header['frame']} out of range for {header['frames']} frames")
    return header


def validate_status(status: Any) -> dict[str, Any]:
    """Check a status map against v1; return it, or raise ProtocolError."""
    return _validate("status", status, _STATUS_FIELDS)


def beat_ecg_fields(window: np.ndarray, valid: np.ndarray, fs: float, pre_r_s: float, rr: float) -> dict[str, Any]:
    """The optional "ecg"/"ecg_fs" header fields of a beat, from its model-rate window.

    window: leads × n starting `pre_r_s` before R; valid: per-sample mask of what the
    stream had delivered. Lead 0 from R for one RR, unknown samples as NaN.
    """
    start = int(round(pre_r_s * fs))
    stop = min(start + int(round(rr * fs)), window.shape[-1])
    trace = np.where(valid[start:stop], window[0, start:stop], np.nan).astype("<f4")
    return {"ecg": trace.tobytes(), "ecg_fs": float(fs)}


_BINARY = (bytes, bytearray, memoryview)
_JSON_DEPTH = 32  # deeper nesting in an extra field is cut (a recursion limit must not crash a consumer)


def _json_key(key: Any) -> str:
    return key.decode("utf-8", errors="replace") if isinstance(key, _BINARY) else str(key)


def json_safe(value: Any, _depth: int = 0) -> Any:
    """`value` made JSON-safe, for any message that passed validation (extra fields may hold
    anything msgpack carries): binary values are left out of maps and become null in lists,
    NaN/inf become null, keys become text, and types JSON lacks become their text."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN; browsers reject it
    if _depth >= _JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {_json_key(k): json_safe(v, _depth + 1) for k, v in value.items() if not isinstance(v, _BINARY)}
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, _BINARY) else json_safe(v, _depth + 1) for v in value]
    if isinstance(value, _BINARY):
        return None
    return str(value)


def to_json(value: Any, **dumps_args: Any) -> str:
    """JSON text of :func:`json_safe` (`value`): never fails on a valid message, never writes NaN."""
    return json.dumps(json_safe(value), allow_nan=False, **dumps_args)


def header_json(header: dict[str, Any]) -> str:
    """A header as JSON text, for saving beside its frames. Binary fields (the beat's
    "ecg") are left out: JSON has no bytes, and every frame of a beat repeats them."""
    return to_json(header)


def decode_ecg(header: dict[str, Any]) -> np.ndarray | None:
    """The "ecg" field of a header as float32 samples, or None when it has none."""
    data = header.get("ecg")
    if not isinstance(data, (bytes, bytearray)) or len(data) % 4:
        return None
    return np.frombuffer(data, dtype="<f4")


def encode_frame(header: dict[str, Any], pixels: np.ndarray) -> list[Any]:
    """Build the multipart message of one frame. The pixels go out as a buffer, not a copy.

    `header` must carry every field but shape and dtype, which are taken from `pixels`.
    The caller must not modify `pixels` after sending (ZeroMQ may still be reading it).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ProtocolError(f"pixels must be a 2-D uint8 array, got {pixels.ndim}-D {pixels.dtype}")
    pixels = np.ascontiguousarray(pixels)
    full = {**header, "shape": list(pixels.shape), "dtype": "uint8"}
    validate_header(full)
    return [frame_topic(full["device"]), msgpack.packb(full, use_bin_type=True), memoryview(pixels).cast("B")]


def encode_status(status: dict[str, Any]) -> list[bytes]:
    """Build the multipart message of one status event."""
    validate_status(status)
    return [status_topic(status["device"]), msgpack.packb(status, use_bin_type=True)]


def _unpack(data: Any) -> Any:
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"header is not valid msgpack: {err}") from None


def decode(parts: Sequence[Any]) -> Message:
    """Decode one received multipart message (bytes or zmq.Frame parts) into a Message.

    Frame pixels are a read-only view of the received buffer, no copy.
    """
    if not parts:
        raise ProtocolError("empty message")
    topic = bytes(parts[0]).decode("utf-8", errors="replace")
    if topic.startswith(FRAME_PREFIX):
        if len(parts) != 3:
            raise ProtocolError(f"frame message must have 3 parts, got {len(parts)}")
        header = validate_header(_unpack(parts[1]))
        if topic != FRAME_PREFIX + header["device"]:
            raise ProtocolError(f"topic {topic!r} does not match device {header['device']!r}")
        buffer = getattr(parts[2], "buffer", parts[2])
        h, w = header["shape"]
        if len(memoryview(buffer)) != h * w:
            raise ProtocolError(f"pixel buffer has {len(memoryview(buffer))} bytes, shape {h}x{w} needs {h * w}")
        pixels = np.frombuffer(buffer, dtype=np.uint8).reshape(h, w)
        pixels.flags.writeable = False  # a view of the received message: never write into it
        return FrameMessage(topic, header, pixels)
    if topic.startswith(STATUS_PREFIX):
        if len(parts) != 2:
            raise ProtocolError(f"status message must have 2 parts, got {len(parts)}")
        status = validate_status(_unpack(parts[1]))
        if topic != STATUS_PREFIX + status["device"]:
            raise ProtocolError(f"topic {topic!r} does not match device {status['device']!r}")
        return StatusMessage(topic, status)
    raise ProtocolError(f"unknown topic {topic!r}")
