"""Byte formats of the BLE devices we read (pure functions; REFERENCE "Devices").

Polar H10 PMD (Polar Measurement Data) service:
- start ECG: write `02 00 00 01 82 00 01 01 0e 00` to the control point (request start,
  type 0 = ECG, setting 0 = sample rate: 1 value, 0x0082 = 130 Hz; setting 1 =
  resolution: 1 value, 0x000e = 14 bits); stop: `03 00`.
- data notification: byte 0 measurement type (0 = ECG), bytes 1–8 timestamp (uint64 LE,
  ns, of the LAST sample in the frame), byte 9 frame type (0 = raw), then samples of 3
  bytes, signed little-endian, in µV.

Heart Rate Measurement (0x2A37): flags byte; bit 0: HR is uint16 (else uint8); bit 3:
energy expended (uint16) present; bit 4: RR intervals present, uint16 each, 1/1024 s.
"""
from __future__ import annotations

import numpy as np

PMD_SERVICE = "fb005c80-02e7-f387-1cad-8acd2d8df0c8"
PMD_CONTROL = "fb005c81-02e7-f387-1cad-8acd2d8df0c8"
PMD_DATA = "fb005c82-02e7-f387-1cad-8acd2d8df0c8"
PMD_START_ECG = bytes.fromhex("02000001820001010e00")
PMD_STOP_ECG = bytes.fromhex("0300")
POLAR_ECG_FS = 130.0

HR_SERVICE = "0000180d-0000-1000-8000-00805f9b34fb"
HR_MEASUREMENT = "00002a37-0000-1000-8000-00805f9b34fb"

_PMD_HEADER = 10


class FrameError(ValueError):
    """Bytes that are not a frame of the expected kind."""


def parse_pmd_ecg(data: bytes) -> tuple[int, np.ndarray]:
    """PMD ECG data frame → (timestamp_ns of the last sample, samples in µV as int32)."""
    if len(data) < _PMD_HEADER + 3:
        raise FrameError(f"PMD frame of {len(data)} bytes; need a 10-byte header and samples")
    if data[0] != 0:
        raise FrameError(f"PMD measurement type {data[0]}, not ECG (0)")
    if data[9] != 0:
        raise FrameError(f"PMD frame type {data[9]}; only raw frames (0) are read")
    body = len(data) - _PMD_HEADER
    if body % 3:
        raise FrameError(f"PMD ECG body of {body} bytes is not whole 3-byte samples")
    timestamp = int.from_bytes(data[1:9], "little")
    b = np.frombuffer(data, np.uint8, offset=_PMD_HEADER).reshape(-1, 3).astype(np.int32)
    value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    value -= (value & 0x800000) << 1  # sign-extend 24 → 32 bits
    return timestamp, value


def parse_heart_rate(data: bytes) -> tuple[int, list[float]]:
    """Heart Rate Measurement → (heart rate in bpm, RR intervals in seconds)."""
    if len(data) < 2:
        raise FrameError(f"heart rate measurement of {len(data)} bytes")
    flags = data[0]
    i = 1
    if flags & 0x01:
        if len(data) < 3:
            raise FrameError("heart rate flagged uint16 but only 1 byte follows")
        hr = int.from_bytes(data[1:3], "little")
        i = 3
    else:
        hr = data[1]
        i = 2
    if flags & 0x08:
        i += 2  # energy expended, not used
    rr: list[float] = []
    if flags & 0x10:
        if i > len(data) or (len(data) - i) % 2:
            raise FrameError(f"RR field of {len(data) - i} bytes is not whole uint16 values")
        rr = [int.from_bytes(data[j : j + 2], "little") / 1024.0 for j in range(i, len(data), 2)]
    return hr, rr
