"""BLE: byte parsers on hand-built frames, sources against a fake radio.

Only the radio is faked: `FakeRadio` stands in for BleakClient (same method names) and
replays frames built here byte by byte, independently of the parser under test.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np
import pytest

from echopulse.bridges import status
from echopulse.bridges.backoff import Backoff
from echopulse.bridges.ble import HeartRateSource, PolarH10Source, find_device
from echopulse.bridges.ble_frames import (
    HR_MEASUREMENT,
    PMD_CONTROL,
    PMD_DATA,
    PMD_START_ECG,
    PMD_STOP_ECG,
    FrameError,
    parse_heart_rate,
    parse_pmd_ecg,
)
from echopulse.bridges.chunk import EcgChunk, RrIntervals
from echopulse.bridges.status import SourceStatus


def pmd_frame(timestamp_ns: int, microvolts: list[int], mtype: int = 0, ftype: int = 0) -> bytes:
    head = bytes([mtype]) + timestamp_ns.to_bytes(8, "little") + bytes([ftype])
    return head + b"".join(v.to_bytes(3, "little", signed=True) for v in microvolts)


# -- parsers ---------------------------------------------------------------------------------


def test_pmd_command_bytes() -> None:
    assert PMD_START_ECG == bytes([0x02, 0x00, 0x00, 0x01, 0x82, 0x00, 0x01, 0x01, 0x0E, 0x00])
    assert PMD_STOP_ECG == bytes([0x03, 0x00])


def test_parse_pmd_ecg_signed_24_bit() -> None:
    values = [0, 1, -1, 8388607, -8388608, 1234, -987]
    ts = 599_000_000_123_456_789
    frame = pmd_frame(ts, values)
    got_ts, got = parse_pmd_ecg(frame)
    assert got_ts == ts
    assert got.tolist() == values


def test_parse_pmd_ecg_literal_bytes() -> None:
    # type 0 | timestamp 0x0102030405060708 LE | frame type 0 | 1, -1, max, min (3 bytes LE)
    frame = bytes.fromhex("00" "0807060504030201" "00" "010000" "ffffff" "ffff7f" "000080")
    ts, uv = parse_pmd_ecg(frame)
    assert ts == 0x0102030405060708
    assert uv.tolist() == [1, -1, 2**23 - 1, -(2**23)]


@pytest.mark.parametrize(
    "frame",
    [b"", pmd_frame(1, [])[:9], pmd_frame(1, [5], mtype=2), pmd_frame(1, [5], ftype=128), pmd_frame(1, [5, 6]) + b"\x01"],
)
def test_parse_pmd_ecg_rejects(frame: bytes) -> None:
    with pytest.raises(FrameError):
        parse_pmd_ecg(frame)


def test_parse_heart_rate_variants() -> None:
    assert parse_heart_rate(bytes([0x00, 72])) == (72, [])
    assert parse_heart_rate(bytes([0x01, 0x2C, 0x01])) == (300, [])  # uint16 HR
    rr = [820, 1024]  # 1/1024 s
    body = b"".join(v.to_bytes(2, "little") for v in rr)
    assert parse_heart_rate(bytes([0x10, 75]) + body) == (75, [820 / 1024, 1.0])
    # energy expended (2 bytes) comes before the RR values and is skipped
    assert parse_heart_rate(bytes([0x19, 75, 0, 0x34, 0x12]) + body) == (75, [820 / 1024, 1.0])


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x01\x50", b"\x10\x50\x01"])
def test_parse_heart_rate_rejects(data: bytes) -> None:
    with pytest.raises(FrameError):
        parse_heart_rate(data)


# -- sources against a fake radio ------------------------------------------------------------------


class FakeRadio:
    """A BleakClient stand-in: records subscriptions and writes; tests push notifications."""

    def __init__(self, address: str, disconnected_callback: Callable[[Any], None] | None = None, **_: Any) -> None:
        self.address = address
        self._on_lost = disconnected_callback
        self.is_connected = False
        self.callbacks: dict[str, Callable[[Any, bytearray], None]] = {}
        self.writes: list[tuple[str, bytes]] = []

    async def connect(self) -> None:
        self.is_connected = True

    async def disconnect(self) -> None:
        self.is_connected = False

    async def start_notify(self, uuid: str, callback: Callable[[Any, bytearray], None]) -> None:
        self.callbacks[uuid] = callback

    async def write_gatt_char(self, uuid: str, data: bytes, response: bool | None = None) -> None:
        self.writes.append((uuid, bytes(data)))

    def notify(self, uuid: str, data: bytes) -> None:
        self.callbacks[uuid](None, bytearray(data))

    def drop(self) -> None:
        """The link is lost (out of range, BlueZ supervision timeout...)."""
        self.is_connected = False
        assert self._on_lost is not None
        self._on_lost(self)


class Radios:
    """Factory handed to the source; keeps every client made; fails the first connects."""

    def __init__(self, fail_first: int = 0) -> None:
        self.made: list[FakeRadio] = []
        self.fail_first = fail_first

    def __call__(self, address: str, **kw: Any) -> FakeRadio:
        radio = FakeRadio(address, **kw)
        if len(self.made) < self.fail_first:

            async def refuse() -> None:
                raise OSError("device not found")

            radio.connect = refuse  # type: ignore[method-assign]
        self.made.append(radio)
        return radio


FAST = Backoff(initial=0.01, maximum=0.05)


async def next_item(source: Any, timeout: float = 2.0) -> Any:
    return await asyncio.wait_for(anext(source), timeout)


async def test_polar_streams_back_dated_chunks_and_reconnects() -> None:
    radios = Radios()
    async with PolarH10Source("AA:BB", client_factory=radios, device="strap", backoff=FAST) as src:
        assert (await next_item(src)).code == status.CONNECTED
        radio = radios.made[-1]
        assert (PMD_CONTROL, PMD_START_ECG) in radio.writes
        ts = 10_000_000_000  # 10 s on the strap's clock, time of the last sample
        uv = list(range(-36, 37))  # 73 samples, the H10's usual frame
        radio.notify(PMD_DATA, pmd_frame(ts, uv))
        radio.notify(PMD_DATA, pmd_frame(ts + int(73 / 130 * 1e9), uv[::-1]))
        a, b = await next_item(src), await next_item(src)
        assert isinstance(a, EcgChunk) and isinstance(b, EcgChunk)
        assert a.device == "strap" and a.fs == 130 and a.samples.shape == (1, 73) and a.samples.dtype == np.float32
        np.testing.assert_allclose(a.samples[0], np.array(uv) * 1e-3, rtol=1e-6)
        assert a.t0 == pytest.approx(10.0 - 72 / 130)
        assert b.t0 == pytest.approx(a.t_end, abs=1e-6)  # back-dating makes frames contiguous
        assert (a.seq, b.seq) == (0, 1)
        assert a.received is not None and a.received <= b.received

        radio.notify(PMD_DATA, b"\x00\x01\x02")  # garbage from the radio
        bad = await next_item(src)
        assert isinstance(bad, SourceStatus) and bad.code == status.MALFORMED

        radio.drop()
        assert (await next_item(src)).code == status.DISCONNECTED
        assert (await next_item(src)).code == status.RECONNECTED
        again = radios.made[-1]
        assert again is not radio and (PMD_CONTROL, PMD_START_ECG) in again.writes  # re-sent
        again.notify(PMD_DATA, pmd_frame(ts + 2 * int(73 / 130 * 1e9), uv))
        c = await next_item(src)
        assert isinstance(c, EcgChunk) and c.seq == 2
    assert not again.is_connected and (PMD_CONTROL, PMD_STOP_ECG) in again.writes  # closed cleanly
    assert src.counters[status.MALFORMED] == 1 and src.counters["chunks"] == 3


async def test_polar_retries_when_connect_fails() -> None:
    radios = Radios(fail_first=2)
    async with PolarH10Source("AA:BB", client_factory=radios, backoff=FAST) as src:
        codes = [(await next_item(src)).code for _ in range(3)]
    assert codes == [status.CONNECT_FAILED, status.CONNECT_FAILED, status.CONNECTED]


async def test_polar_device_error_reported() -> None:
    radios = Radios()
    async with PolarH10Source("AA:BB", client_factory=radios, backoff=FAST) as src:
        await next_item(src)
        radios.made[-1].notify(PMD_CONTROL, bytes([0xF0, 0x02, 0x00, 0x05, 0x00]))
        item = await next_item(src)
    assert item.code == "device_error"


async def test_overflow_drops_oldest_and_says_so() -> None:
    radios = Radios()
    async with PolarH10Source("AA:BB", client_factory=radios, backoff=FAST, queue_size=4) as src:
        await next_item(src)
        for k in range(10):
            radios.made[-1].notify(PMD_DATA, pmd_frame(10**9 * (k + 1), [k] * 3))
        first = await next_item(src)
        rest = [await next_item(src) for _ in range(4)]
    assert first.code == status.OVERFLOW and "6" in first.message
    assert [int(round(c.samples[0, 0] * 1000)) for c in rest] == [6, 7, 8, 9]  # newest kept
    assert src.counters["dropped"] == 6


async def test_heart_rate_source_gives_rr_only() -> None:
    radios = Radios()
    async with HeartRateSource("CC:DD", client_factory=radios, backoff=FAST) as src:
        await next_item(src)
        radios.made[-1].notify(HR_MEASUREMENT, bytes([0x10, 60, 0x00, 0x04]))
        item = await next_item(src)
    assert isinstance(item, RrIntervals) and item.hr_bpm == 60 and item.rr == (1.0,)


async def test_find_device_matches_name_prefix() -> None:
    class Dev:
        name, address = "Polar H10 1A2B3C", "AA:BB"

    class Adv:
        local_name = "Polar H10 1A2B3C"

    class FakeScanner:
        @staticmethod
        async def find_device_by_filter(pred: Callable[[Any, Any], bool], timeout: float) -> Any:
            return Dev() if pred(Dev(), Adv()) else None

    assert await find_device("Polar H10", scanner=FakeScanner) == "AA:BB"
    assert await find_device("Garmin", scanner=FakeScanner) is None


async def test_hanging_start_command_times_out_and_retries() -> None:
    radios = Radios()

    def factory(address: str, **kw: Any) -> FakeRadio:
        radio = radios(address, **kw)
        if len(radios.made) == 1:  # the first sensor never answers the start command

            async def hang(uuid: str, data: bytes, response: bool | None = None) -> None:
                await asyncio.sleep(3600)

            radio.write_gatt_char = hang  # type: ignore[method-assign]
        return radio

    async with PolarH10Source("AA:BB", client_factory=factory, backoff=FAST, connect_timeout=0.1) as src:
        first, second = await next_item(src), await next_item(src)
    assert first.code == status.CONNECT_FAILED and "Timeout" in first.message
    assert second.code == status.CONNECTED
    assert not radios.made[0].is_connected  # the hung link was released


async def test_heart_rate_malformed_is_a_status() -> None:
    radios = Radios()
    async with HeartRateSource("CC:DD", client_factory=radios, backoff=FAST) as src:
        await next_item(src)
        radios.made[-1].notify(HR_MEASUREMENT, b"\x10")
        item = await next_item(src)
    assert isinstance(item, SourceStatus) and item.code == status.MALFORMED
    assert src.counters[status.MALFORMED] == 1


async def test_link_cut_at_once_backs_off() -> None:
    """A sensor that accepts the connection and drops it at once was retried at the
    initial delay for ever: the backoff was reset at every connect, not after a
    connection that held."""
    radios = Radios()

    def factory(address: str, **kw: Any) -> FakeRadio:
        radio = radios(address, **kw)

        async def start_then_drop(uuid: str, data: bytes, response: bool | None = None) -> None:
            radio.writes.append((uuid, bytes(data)))
            asyncio.get_running_loop().call_soon(radio.drop)

        radio.write_gatt_char = start_then_drop  # type: ignore[method-assign]
        return radio

    backoff = Backoff(initial=0.001, maximum=0.02, jitter=0.0)
    async with PolarH10Source("AA:BB", client_factory=factory, backoff=backoff) as src:
        codes = [(await next_item(src)).code for _ in range(12)]
    assert codes[:3] == [status.CONNECTED, status.DISCONNECTED, status.RECONNECTED]
    assert backoff.attempt >= 4  # 1, 2, 4, 8, 16 ms...: growing, not 1 ms each time
