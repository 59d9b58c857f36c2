"""BeatSegmenter: beats with RR, time-aligned model-rate windows, chunking invariance."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.core.config import EcgEncoderConfig, paper
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream.beat_score import score
from echopulse.stream.beats import Beat, BeatSegmenter

T0 = 1000.0  # a stream clock that does not start at zero


def run(seg: BeatSegmenter, x: np.ndarray, chunk: int) -> list[Beat]:
    beats = []
    for i in range(0, x.shape[1], chunk):
        beats += seg.push(x[:, i:i + chunk], T0 + i / seg.fs)
    return beats


@pytest.mark.parametrize("fs", [130.0, 250.0, 512.0])
def test_beats_have_rr_windows_and_truthful_times(fs):
    cfg = EcgEncoderConfig()
    rec = simulate_ecg(30.0, fs=fs, hr=72, leads=3, seed=int(fs), noise=0.5)
    seg = BeatSegmenter(fs, 3, cfg)
    beats = run(seg, rec.signal, int(fs))
    truth = rec.r_peaks[(rec.r_peaks > 0.3) & (rec.r_peaks < 29.0)]
    r = np.array([b.r_time for b in beats]) - T0
    assert score(truth, r[r > 0.3], 0.05).f1 >= 0.99
    for k, b in enumerate(beats):
        assert b.index == k
        assert b.window.shape == (3, cfg.window_samples) and b.window.dtype == np.float32
        assert b.valid.shape == (cfg.window_samples,) and b.valid.dtype == bool
        assert b.rr == pytest.approx(b.next_r_time - b.r_time)
        assert b.hr == pytest.approx(60.0 / b.rr)
        assert b.next_r_time < b.detected_at
        if b.next_r_time > T0 + 2.5:  # beats of the 2-s learning period are released late
            assert b.detected_at <= b.next_r_time + 0.25
        if k:
            assert b.r_time == beats[k - 1].next_r_time
    assert seg.heart_rate == pytest.approx(60.0 / np.median(np.diff(rec.r_peaks)), rel=0.05)


@pytest.mark.parametrize("fs", [250.0, 360.0])
def test_window_is_the_ecg_around_r(fs):
    cfg = EcgEncoderConfig()
    rec = simulate_ecg(20.0, fs=fs, hr=60, leads=2, seed=9, noise=0.0)
    beats = run(BeatSegmenter(fs, 2, cfg), rec.signal, 100)
    t_grid = np.arange(cfg.window_samples) / cfg.fs - cfg.pre_r_s
    t_in = np.arange(rec.signal.shape[1]) / fs
    for b in beats[2:]:
        i_r = int(round(cfg.pre_r_s * cfg.fs))
        assert b.valid[: i_r + 1].all()
        # the R sample sits at pre_r_s into the window, on every lead
        r_idx = int(round((b.r_time - T0) * fs))
        np.testing.assert_allclose(b.window[:, i_r], rec.signal[:, r_idx], atol=0.03)
        # and the valid part is the signal on the model grid
        t = b.r_time - T0 + t_grid[b.valid]
        for lead in range(2):
            ref = np.interp(t, t_in, rec.signal[lead])
            np.testing.assert_allclose(b.window[lead, b.valid], ref, atol=0.05)


def test_valid_ends_at_the_sample_that_emitted_the_beat():
    """The window holds what the spike blanker had released when the beat's confirming
    sample arrived (samples up to `spike_lag` before `detected_at`), less the outputs
    whose resampling kernel would reach past the last of them (8 samples at 250 Hz)."""
    cfg = EcgEncoderConfig()
    fs = 250.0
    rec = simulate_ecg(20.0, fs=fs, hr=75, seed=1, noise=0.5)
    seg = BeatSegmenter(fs, 1, cfg)
    beats = run(seg, rec.signal, 500)
    assert seg.spike_lag == 6
    for b in beats[1:]:
        t_grid = b.r_time - cfg.pre_r_s + np.arange(cfg.window_samples) / cfg.fs
        last = b.detected_at - seg.spike_lag / fs  # the last sample the ring held
        ahead = np.round((t_grid - last) * fs)  # whole samples at 250 Hz
        np.testing.assert_array_equal(b.valid, ahead <= 1 - 8)
        assert not b.window[:, ~b.valid].any()  # padding is zeros


def test_cut_window_sees_what_arrived_since():
    fs = 250.0
    rec = simulate_ecg(12.0, fs=fs, hr=75, seed=3, noise=0.5)
    seg = BeatSegmenter(fs, 1)
    beats = run(seg, rec.signal, 250)
    b = beats[-3]
    window, valid = seg.cut_window(b.r_time)
    assert valid.all() and valid.sum() > b.valid.sum()
    edge = int(np.flatnonzero(b.valid)[-1]) - 10  # the old cut's last samples saw its edge
    np.testing.assert_allclose(window[:, :edge], b.window[:, :edge], atol=1e-5)


def test_times_follow_the_device_clock_when_its_rate_is_off_nominal():
    true_fs, nominal = 130.26, 130.0  # a strap whose crystal runs 0.2 % fast, stamping chunks by its own clock
    rec = simulate_ecg(600.0, fs=true_fs, hr=70, seed=5, noise=0.3)
    seg = BeatSegmenter(nominal, 1)
    beats = []
    for i in range(0, rec.signal.shape[1], 73):  # Polar-sized frames
        beats += seg.push(rec.signal[:, i:i + 73], T0 + i / true_fs)
    late = [b for b in beats if b.r_time > T0 + 500]
    truth = rec.r_peaks + T0
    error = [min(abs(truth - b.r_time)) for b in late]
    assert late and max(error) < 0.05  # counting samples alone drifts 1.2 s by then
    assert np.median([b.rr for b in late]) == pytest.approx(np.median(np.diff(rec.r_peaks)) * true_fs / nominal, rel=0.01)
    assert seg.expected_t0 == pytest.approx(T0 + rec.signal.shape[1] / true_fs, abs=0.03)
    assert len(seg._anchors) < 10  # re-anchored now and then, the old anchors let go


def test_chunking_does_not_change_beats():
    fs = 360.0
    rec = simulate_ecg(15.0, fs=fs, hr=90, leads=2, seed=4, noise=1.0)
    ref = run(BeatSegmenter(fs, 2), rec.signal, rec.signal.shape[1])
    assert len(ref) >= 15
    for chunk in (1, 7, 130, 1000):
        got = run(BeatSegmenter(fs, 2), rec.signal, chunk)
        assert [b.r_time for b in got] == [b.r_time for b in ref]
        assert [b.detected_at for b in got] == [b.detected_at for b in ref]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.valid, b.valid)
            np.testing.assert_array_equal(a.window, b.window)


def test_detect_lead_and_paper_geometry():
    cfg = paper().ecg
    fs = 500.0
    rec = simulate_ecg(20.0, fs=fs, hr=65, leads=2, seed=6, noise=0.5)
    x = np.stack([np.zeros_like(rec.signal[0]), rec.signal[1]])  # lead 0 is off
    assert run(BeatSegmenter(fs, 2, cfg), x, 500) == []
    beats = run(BeatSegmenter(fs, 2, cfg, detect_lead=1), x, 500)
    assert len(beats) >= 15
    assert beats[0].window.shape == (2, cfg.window_samples)


def test_flat_and_nan_streams_make_no_beats():
    fs = 130.0
    seg = BeatSegmenter(fs, 2)
    n = int(30 * fs)
    assert run(seg, np.zeros((2, n), np.float32), 130) == []
    assert run(seg, np.full((2, n), np.nan, np.float32), 130) == []
    assert seg.heart_rate is None and seg.last_r_time is None


def test_nan_in_other_lead_marks_window_invalid_not_crash():
    fs = 250.0
    rec = simulate_ecg(20.0, fs=fs, hr=60, leads=2, seed=8, noise=0.5)
    x = rec.signal.copy()
    x[1, int(10 * fs):int(10.5 * fs)] = np.nan
    beats = run(BeatSegmenter(fs, 2), x, 250)
    hit = [b for b in beats if b.r_time - T0 - 0.5 < 10.2 < b.r_time - T0 + 2.0]
    assert hit and all(not b.valid.all() for b in hit)
    assert all(np.isfinite(b.window).all() for b in beats)


@pytest.mark.parametrize("baseline", [0.0, 5.0])
def test_samples_near_a_nan_gap_are_not_valid_unless_exact(baseline):
    fs = 360.0
    rec = simulate_ecg(20.0, fs=fs, hr=60, seed=8, noise=0.0)
    clean = rec.signal + baseline  # a DC offset: the zeros in a gap's place are then a step
    r = rec.r_peaks[np.argmin(abs(rec.r_peaks - 10.0))]
    holed = clean.copy()
    g = int((r - 0.3) * fs)
    holed[:, g:g + 3] = np.nan
    pairs = [(a, b) for a in run(BeatSegmenter(fs, 1), clean, 360) for b in run(BeatSegmenter(fs, 1), holed, 360)
             if a.r_time == b.r_time and a.detected_at == b.detected_at]
    hit = [(a, b) for a, b in pairs if (a.valid & ~b.valid).any()]
    assert hit  # the beat whose window holds the gap
    for a, b in hit:
        both = b.valid & a.valid
        # once up to 0.5 mV off on samples still marked valid, the sinc ringing off the filled zeros
        assert np.abs(a.window[:, both] - b.window[:, both]).max() < 1e-4
        assert (a.valid & ~b.valid).sum() < 30  # 3 lost samples cost the kernel's reach either side, no more


def test_bad_shapes_are_rejected():
    seg = BeatSegmenter(250.0, 2)
    with pytest.raises(ValueError):
        seg.push(np.zeros((3, 10), np.float32), 0.0)
    with pytest.raises(ValueError):
        BeatSegmenter(250.0, 2, detect_lead=2)
