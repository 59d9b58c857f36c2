"""SyntheticSource: the simulator's ECG for N devices, chunked, paced, seamless."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from echopulse.bridges.synthetic import SyntheticSource


async def collect(src: SyntheticSource, timeout: float = 10.0) -> list:
    async with asyncio.timeout(timeout):
        return [c async for c in src]


async def test_devices_round_robin_contiguous() -> None:
    src = SyntheticSource(devices=3, hr=[60, 75, 110], seed=1, chunk_s=0.2, realtime=False, duration_s=5.0)
    chunks = await collect(src)
    assert len(chunks) == 3 * 25
    assert [c.device for c in chunks[:6]] == ["sim-0", "sim-1", "sim-2"] * 2
    for d in src.devices:
        mine = [c for c in chunks if c.device == d]
        assert [c.seq for c in mine] == list(range(25))
        assert all(c.samples.shape == (1, 50) and c.samples.dtype == np.float32 and c.fs == 250 for c in mine)
        assert all(b.t0 == pytest.approx(a.t_end) for a, b in zip(mine, mine[1:]))
    # different subjects and rates: the devices' signals differ, and so do their beat counts
    beats = [len(src.r_peaks(d)) for d in src.devices]
    assert beats[0] < beats[1] < beats[2]
    assert beats[2] == pytest.approx(110 / 60 * 5, abs=2)


async def test_same_seed_same_signal() -> None:
    a = await collect(SyntheticSource(devices=2, seed=7, realtime=False, duration_s=2.0))
    b = await collect(SyntheticSource(devices=2, seed=7, realtime=False, duration_s=2.0))
    c = await collect(SyntheticSource(devices=2, seed=8, realtime=False, duration_s=2.0))
    assert all(np.array_equal(x.samples, y.samples) for x, y in zip(a, b))
    assert not all(np.array_equal(x.samples, z.samples) for x, z in zip(a, c))


async def test_block_seams_keep_rhythm_and_level() -> None:
    hr = 75.0
    src = SyntheticSource(devices=1, hr=hr, seed=3, chunk_s=1.0, realtime=False, duration_s=60.0, block_s=8.0, noise=0.0)
    chunks = await collect(src)
    x = np.concatenate([c.samples for c in chunks], axis=1)[0]
    rr = np.diff(src.r_peaks("sim-0"))
    assert len(rr) >= 70
    # no beat lost or doubled at the ~7 seams: every RR stays near 60/75 s
    assert rr.min() > 0.8 * 60 / hr and rr.max() < 1.2 * 60 / hr
    # no steps either: around each seam the (noise-free) signal moves as smoothly as a TP
    # segment does (without the baseline match the joins jump by 2-6 µV here)
    seams = src._streams[0].seams
    assert len(seams) >= 4
    for i in seams:
        assert np.abs(np.diff(x[i - 5 : i + 5])).max() < 0.002


async def test_real_time_pacing() -> None:
    src = SyntheticSource(devices=2, chunk_s=0.1, realtime=5.0, duration_s=1.0)
    start = time.monotonic()
    chunks = await collect(src)
    elapsed = time.monotonic() - start
    assert len(chunks) == 20
    assert 0.17 <= elapsed < 0.5  # 1 s of ECG at 5× real time


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SyntheticSource(devices=0)
    with pytest.raises(ValueError):
        SyntheticSource(devices=2, hr=[70.0])
