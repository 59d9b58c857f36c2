"""Decode one ECG message (MQTT payload) into an `EcgChunk`.

Wire format: a map `{fs, t0, seq, unit, samples[, shape]}`, as JSON (UTF-8 text whose
first non-blank byte is `{`, after any byte order mark) or as msgpack (anything else).

- fs: sample rate in Hz (number > 0). Required.
- unit: a key of `UNIT_TO_MV` ("mV", "uV", "µV", "V"; "μV" with a Greek mu too). Required:
  a guessed unit is off by a factor of 1000.
- samples, one of:
    a list of numbers (one lead);
    a list of lists, one per lead, all the same length;
    little-endian float32 bytes with `shape` = [n] or [leads, n] (row-major): msgpack
    `bin`, or in JSON a base64 string (line breaks allowed).
- t0: time of the first sample in seconds on the device's clock. Optional: the receiver
  stamps the chunk on its monotonic clock instead, at its receive time minus its duration,
  or at the end of the device's previous chunk when it follows on (`MqttSource`).
- seq: integer chunk counter. Optional: the receiver numbers the device's chunks itself.

Non-finite samples are passed through: `validate.ChunkChecker` reports and repairs them.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .chunk import UNIT_TO_MV
from . import status

MAX_LEADS = 12

# Units that look like a key of UNIT_TO_MV but are other code points: Greek mu (U+03BC,
# what NFKC makes of the micro sign) was refused with "unknown unit 'μV'; known: ... µV".
_LOOKALIKE_UNITS = {"\u03bcV": "\u00b5V"}


class PayloadError(ValueError):
    """A payload that cannot become a chunk; `code` is a `status` code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DecodedPayload:
    samples: np.ndarray  # float32 mV, (leads, n)
    fs: float
    t0: float | None
    seq: int | None


def decode_payload(payload: bytes, max_payload: int = 262144, max_leads: int = MAX_LEADS) -> DecodedPayload:
    """Decode and check one message; raises `PayloadError` for anything unusable."""
    if len(payload) > max_payload:
        raise PayloadError(status.OVERSIZED, f"payload of {len(payload)} bytes over the limit of {max_payload}")
    msg = _parse(payload)
    if not isinstance(msg, dict):
        raise PayloadError(status.MALFORMED, f"payload is a {type(msg).__name__}, not a map")
    fs = _number(msg, "fs", required=True)
    if not (math.isfinite(fs) and fs > 0):
        raise PayloadError(status.BAD_FIELD, f"fs must be a positive finite number, got {fs!r}")
    unit = msg.get("unit")
    if isinstance(unit, str):
        unit = _LOOKALIKE_UNITS.get(unit, unit)
    if not isinstance(unit, str) or unit not in UNIT_TO_MV:
        raise PayloadError(status.UNKNOWN_UNIT, f"unknown unit {unit!r}; known: {', '.join(UNIT_TO_MV)}")
    t0 = _number(msg, "t0", required=False)
    if t0 is not None and not math.isfinite(t0):
        raise PayloadError(status.BAD_FIELD, f"t0 must be finite, got {t0!r}")
    seq = msg.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise PayloadError(status.BAD_FIELD, f"seq must be an integer, got {seq!r}")
    samples = _samples(msg, max_leads)
    samples = (samples * np.float32(UNIT_TO_MV[unit])).astype(np.float32, copy=False)
    return DecodedPayload(samples=samples, fs=float(fs), t0=t0, seq=seq)


def _parse(payload: bytes) -> Any:
    # A UTF-8 byte order mark (a file saved by Notepad, sent with `mosquitto_pub -f`) is
    # still JSON; without this it was read as msgpack and refused as "bad msgpack".
    if payload.startswith(codecs.BOM_UTF8):
        payload = payload[len(codecs.BOM_UTF8):]
    if payload.lstrip()[:1] == b"{":
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PayloadError(status.MALFORMED, f"bad JSON: {exc}") from None
        except RecursionError:  # nesting deeper than the interpreter's stack, well under max_payload
            raise PayloadError(status.MALFORMED, "bad JSON: nested too deeply") from None
    try:
        # strict_map_key=False: keys are checked below; raw=False: str keys and values.
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types (ExtraData, ValueError...)
        raise PayloadError(status.MALFORMED, f"bad msgpack: {type(exc).__name__}: {exc}") from None


def _number(msg: dict, key: str, required: bool) -> float | None:
    value = msg.get(key)
    if value is None:
        if required:
            raise PayloadError(status.BAD_FIELD, f"missing field {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(status.BAD_FIELD, f"{key} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise PayloadError(status.BAD_FIELD, f"{key} is out of range") from None


def _samples(msg: dict, max_leads: int) -> np.ndarray:
    raw = msg.get("samples")
    if raw is None:
        raise PayloadError(status.BAD_FIELD, "missing field 'samples'")
    if isinstance(raw, (bytes, bytearray, str)):
        arr = _from_bytes(raw, msg.get("shape"))
    elif isinstance(raw, list):
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise PayloadError(status.BAD_SHAPE, "samples must be numbers, or lists of numbers of equal length") from None
    else:
        raise PayloadError(status.BAD_SHAPE, f"samples of type {type(raw).__name__}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise PayloadError(status.BAD_SHAPE, f"samples of shape {arr.shape}; want (n,) or (leads, n) with n > 0")
    if not 1 <= arr.shape[0] <= max_leads:
        raise PayloadError(status.BAD_SHAPE, f"{arr.shape[0]} leads; at most {max_leads}")
    return arr.astype(np.float32)


def _from_bytes(raw: bytes | bytearray | str, shape: Any) -> np.ndarray:
    if isinstance(raw, str):
        try:
            # Line breaks are left out first: MIME encoders (Python's base64.encodebytes)
            # wrap every 76 characters, and validate=True refuses them.
            raw = base64.b64decode("".join(raw.split()), validate=True)
        except (binascii.Error, ValueError):
            raise PayloadError(status.MALFORMED, "samples string is not base64") from None
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(type(s) is int and s > 0 for s in shape)):
        raise PayloadError(status.BAD_SHAPE, f"byte samples need shape [n] or [leads, n], got {shape!r}")
    count = math.prod(shape)
    if len(raw) != 4 * count:
        raise PayloadError(status.BAD_SHAPE, f"{len(raw)} bytes of samples do not fit shape {shape} as float32")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)
