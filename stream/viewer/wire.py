"""What the viewer sends to browsers over the WebSocket.

Frames are binary messages::

    [uint32 big-endian n][n bytes of JSON header][H*W bytes of uint8 pixels]

The JSON header is the protocol-v1 header (stream/protocol.py) plus ``gap`` (frames of
the device lost just before this one) and ``recv`` (wall clock, Unix s, when the viewer
received it). An optional ``ecg`` field (raw float32 little-endian samples at ``ecg_fs``
from ``r_time``) becomes a list of numbers; other binary fields are left out.

Everything else is a JSON text message with a ``type``: ``hello`` (once per connection),
``status`` (a protocol status map) and ``stats`` (the viewer's own counters).
"""
from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import numpy as np

from ..protocol import FrameMessage, json_safe, to_json

_LENGTH = struct.Struct(">I")
MAX_ECG_SAMPLES = 4096  # a beat's worth at any sane rate; more is a malformed header


def _json_value(key: str, value: Any) -> Any:
    """A JSON-safe version of one header value, or None to leave the field out."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if key != "ecg" or len(value) % 4 or len(value) // 4 > MAX_ECG_SAMPLES:
            return None
        samples = np.frombuffer(bytes(value), dtype="<f4")
        return [round(float(s), 4) if math.isfinite(s) else None for s in samples]
    return json_safe(value)  # NaN -> None (left out; the page treats it as unknown), nested oddities too


def frame_payload(msg: FrameMessage, recv: float | None = None) -> bytes:
    """The binary WebSocket message for one frame."""
    header: dict[str, Any] = {}
    for key, value in msg.header.items():
        safe = _json_value(key, value)
        if safe is not None:
            header[key] = safe
    header["gap"] = msg.gap
    header["recv"] = time.time() if recv is None else recv
    head = to_json(header, separators=(",", ":")).encode()  # JSON.parse rejects NaN; keys must be text
    return _LENGTH.pack(len(head)) + head + msg.pixels.tobytes()


def parse_frame_payload(payload: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The inverse of :func:`frame_payload` (what the page's JS does; used by tests)."""
    (n,) = _LENGTH.unpack_from(payload)
    header = json.loads(payload[4:4 + n])
    h, w = header["shape"]
    return header, np.frombuffer(payload[4 + n:], dtype=np.uint8).reshape(h, w)


def event_payload(kind: str, body: dict[str, Any]) -> str:
    """A JSON text message: ``{"type": kind, **body}``; NaN/inf as null, binary fields left out."""
    return to_json({"type": kind, **body}, separators=(",", ":"))
