"""ECG and rhythm from BLE devices (bleak): Polar H10 PMD ECG, and the standard Heart
Rate service as a rhythm-only fallback.

    async with PolarH10Source("A0:9E:1A:xx:xx:xx") as source:
        async for item in source:   # EcgChunk (1 lead, 130 Hz, mV) or SourceStatus
            ...
    async with HeartRateSource(address) as source:
        async for item in source:   # RrIntervals or SourceStatus: rhythm only, no ECG
            ...

bleak does not reconnect by itself (REFERENCE): a loop connects, subscribes, sends the
PMD start command, waits for `disconnected_callback`, then retries after a capped
jittered backoff, subscribing and re-sending the start command every time. The
notification callback is synchronous and O(1): it enqueues the bytes with their
monotonic receive time; frames are parsed when the consumer takes them.

Timing: the PMD frame's timestamp (device clock, ns) belongs to its last sample; earlier
samples are back-dated at 130 Hz, so t0 = t_last − (n − 1)/130.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Union

import numpy as np
from bleak import BleakClient, BleakScanner

from . import status
from .backoff import Backoff
from .ble_frames import (
    HR_MEASUREMENT,
    PMD_CONTROL,
    PMD_DATA,
    PMD_START_ECG,
    PMD_STOP_ECG,
    POLAR_ECG_FS,
    FrameError,
    parse_heart_rate,
    parse_pmd_ecg,
)
from .chunk import EcgChunk, RrIntervals
from .background import BackgroundSource
from .status import SourceStatus

__all__ = ["PolarH10Source", "HeartRateSource", "find_device", "parse_pmd_ecg", "parse_heart_rate", "PMD_START_ECG", "PMD_STOP_ECG"]

log = logging.getLogger(__name__)

Raw = tuple[float, bytes]  # (monotonic receive time, notification bytes)
ClientFactory = Callable[..., Any]  # BleakClient or a stand-in with the same methods


async def find_device(name_prefix: str = "Polar H10", timeout: float = 10.0, scanner: Any = BleakScanner) -> str | None:
    """Scan for the first device whose advertised name starts with `name_prefix`."""
    found = await scanner.find_device_by_filter(
        lambda dev, adv: (adv.local_name or dev.name or "").startswith(name_prefix), timeout=timeout
    )
    return None if found is None else str(found.address)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _BleSource(BackgroundSource):
    """Connection loop and queue shared by the BLE sources; subclasses say what to
    subscribe to and how to turn one notification into an item."""

    def __init__(
        self,
        address: str,
        client_factory: ClientFactory = BleakClient,
        *,
        device: str | None = None,
        queue_size: int = 1024,
        backoff: Backoff | None = None,
        connect_timeout: float = 20.0,
    ) -> None:
        super().__init__(queue_size, f"ble-{address}", device or address)
        self.address = address
        self.device = device or address
        self.client_factory = client_factory
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self._seq = 0

    def _convert(self, item: Union[Raw, SourceStatus]) -> Any:
        if isinstance(item, SourceStatus):
            return item
        received, data = item
        try:
            return self._parse(received, data)
        except FrameError as exc:
            self.counters[status.MALFORMED] += 1
            return SourceStatus(self.device, status.MALFORMED, str(exc))

    # -- connection loop -------------------------------------------------------------

    def _on_notify(self, _sender: Any, data: bytearray) -> None:
        # Runs for every notification: O(1), no parsing, no awaiting.
        self._queue.put_nowait((time.monotonic(), bytes(data)))

    def _emit(self, code: str, message: str) -> None:
        self.counters[code] += 1
        log.log(status.log_level(code), "%s %s: %s", self.device, code, message)
        self._queue.put_nowait(SourceStatus(self.device, code, message))

    async def _run(self) -> None:
        connected_before = False
        while True:
            lost = asyncio.Event()
            client = self.client_factory(self.address, disconnected_callback=lambda _c, ev=lost: ev.set())  # ev: this attempt's event
            live, since = False, 0.0
            try:
                await asyncio.wait_for(client.connect(), self.connect_timeout)
                await asyncio.wait_for(self._subscribe(client), self.connect_timeout)
                live, since = True, time.monotonic()
                connected_before, code = True, status.RECONNECTED if connected_before else status.CONNECTED
                self._emit(code, f"streaming from {self.address}")
                await lost.wait()
                self._emit(status.DISCONNECTED, f"{self.address} disconnected")
            except Exception as exc:  # bleak/OS/D-Bus errors vary by platform; retry them all
                self._emit(status.DISCONNECTED if live else status.CONNECT_FAILED, f"{self.address}: {_describe(exc)}")
            finally:
                await self._release(client)
            if live:
                self.backoff.connection_ended(time.monotonic() - since)
            await asyncio.sleep(self.backoff.next_delay())

    async def _release(self, client: Any) -> None:
        limit = min(5.0, self.connect_timeout)  # a hung sensor must not hold up the retry
        try:
            if getattr(client, "is_connected", False):
                try:
                    await asyncio.wait_for(self._unsubscribe(client), limit)
                finally:
                    await asyncio.wait_for(client.disconnect(), limit)
        except Exception as exc:  # already gone: nothing left to release
            log.debug("%s: release: %s", self.device, exc)

    async def _subscribe(self, client: Any) -> None:
        raise NotImplementedError

    async def _unsubscribe(self, client: Any) -> None:
        pass

    def _parse(self, received: float, data: bytes) -> Any:
        raise NotImplementedError


class PolarH10Source(_BleSource):
    """Polar H10 ECG over PMD: 1 lead at 130 Hz, in mV, timed by the strap's clock."""

    async def _subscribe(self, client: Any) -> None:
        await client.start_notify(PMD_CONTROL, self._on_control)  # responses come as indications
        await client.start_notify(PMD_DATA, self._on_notify)
        await client.write_gatt_char(PMD_CONTROL, PMD_START_ECG, response=True)

    async def _unsubscribe(self, client: Any) -> None:
        await client.write_gatt_char(PMD_CONTROL, PMD_STOP_ECG, response=True)

    def _on_control(self, _sender: Any, data: bytearray) -> None:
        # Control point response: F0, op code, measurement type, error code (0 = success).
        if len(data) >= 4 and data[0] == 0xF0 and data[3] != 0:
            self._emit(status.DEVICE_ERROR, f"PMD request {data[1]:#04x} refused with error {data[3]}")

    def _parse(self, received: float, data: bytes) -> EcgChunk:
        timestamp_ns, microvolts = parse_pmd_ecg(data)
        n = microvolts.size
        t_last = timestamp_ns * 1e-9
        chunk = EcgChunk(
            device=self.device,
            samples=(microvolts * 1e-3).astype(np.float32)[None, :],
            fs=POLAR_ECG_FS,
            t0=t_last - (n - 1) / POLAR_ECG_FS,
            seq=self._seq,
            unit="mV",
            received=received,
        )
        self._seq += 1
        self.counters["chunks"] += 1
        self.counters["samples"] += n
        return chunk


class HeartRateSource(_BleSource):
    """Any Heart Rate service sensor: RR intervals only, for rhythm (never as ECG)."""

    async def _subscribe(self, client: Any) -> None:
        await client.start_notify(HR_MEASUREMENT, self._on_notify)

    def _parse(self, received: float, data: bytes) -> RrIntervals:
        hr, rr = parse_heart_rate(data)
        item = RrIntervals(device=self.device, t=received, hr_bpm=hr, rr=tuple(rr), seq=self._seq)
        self._seq += 1
        self.counters["rr"] += len(rr)
        return item
