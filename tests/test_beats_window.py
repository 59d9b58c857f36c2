"""The parts a beat's window is cut with: the sample ring and the fractional resampler."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.kernels import resample as rs
from echopulse.stream.ring import SampleRing


def test_ring_wraps_and_reads_by_absolute_index():
    ring = SampleRing(2, 10)
    data = np.stack([np.arange(25), -np.arange(25)]).astype(np.float32)
    for i in range(0, 25, 4):
        ring.append(data[:, i:i + 4])
    assert (ring.start, ring.end) == (15, 25)
    np.testing.assert_array_equal(ring.read(15, 25), data[:, 15:25])
    np.testing.assert_array_equal(ring.read(18, 21), data[:, 18:21])
    with pytest.raises(IndexError):
        ring.read(14, 20)
    with pytest.raises(IndexError):
        ring.read(20, 26)


def test_ring_chunk_larger_than_capacity_keeps_the_newest():
    ring = SampleRing(1, 8)
    ring.append(np.zeros((1, 3), np.float32))
    ring.append(np.arange(20, dtype=np.float32)[None, :])
    assert (ring.start, ring.end) == (15, 23)
    np.testing.assert_array_equal(ring.read(15, 23)[0], np.arange(12, 20))
    with pytest.raises(ValueError):
        ring.append(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("fs_in", [130.0, 360.0, 512.0])
def test_resample_matches_a_band_limited_signal(fs_in):
    fs_out = 250.0
    t_in = np.arange(int(3 * fs_in)) / fs_in
    sig = lambda t: np.sin(2 * np.pi * 7.0 * t) + 0.5 * np.cos(2 * np.pi * 23.0 * t + 0.3)  # noqa: E731
    x = np.stack([sig(t_in), 2 * sig(t_in)]).astype(np.float32)
    t_out = 0.5 + 0.0137 + np.arange(int(2 * fs_out)) / fs_out  # off both grids
    y = rs.resample(x, t_out * fs_in, fs_in, fs_out)
    assert y.shape == (2, len(t_out)) and y.dtype == np.float32
    np.testing.assert_allclose(y[0], sig(t_out), atol=0.02)
    np.testing.assert_allclose(y[1], 2 * sig(t_out), atol=0.04)


def test_resample_removes_what_the_output_rate_cannot_hold():
    fs_in, fs_out = 512.0, 250.0
    t = np.arange(int(3 * fs_in)) / fs_in
    x = np.sin(2 * np.pi * 180.0 * t)[None, :].astype(np.float32)  # above 125 Hz: would alias
    y = rs.resample(x, 1.0 * fs_in + np.arange(250) * fs_in / fs_out, fs_in, fs_out)
    assert np.max(np.abs(y)) < 0.05


def test_resample_on_grid_is_identity_and_constants_pass():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(rs.resample(x, np.arange(50.0), 250.0, 250.0), x, atol=1e-5)
    c = np.full((1, 40), 3.25, np.float32)
    np.testing.assert_allclose(rs.resample(c, np.linspace(-5, 45, 77), 512.0, 250.0), 3.25, rtol=1e-6)


def test_resample_numba_matches_reference():
    x = np.random.default_rng(1).standard_normal((2, 200)).astype(np.float32)
    pos = np.sort(np.random.default_rng(2).uniform(-3, 203, 150))
    for fs_in in (130.0, 512.0):
        a = rs.resample(x, pos, fs_in, 250.0, backend="numba")
        b = rs.resample(x, pos, fs_in, 250.0, backend="python")
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        rs.resample(x, pos, 130.0, 250.0, backend="nope")
