"""The simulated ECG: shapes, ground-truth events, and R peaks that an independent detector finds."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.core.simulate import simulate_ecg
from echopulse.core.simulate.timing import qt_seconds

sleepecg = pytest.importorskip("sleepecg")


def match_f1(truth: np.ndarray, found: np.ndarray, tol: float = 0.05, lo: float = -np.inf, hi: float = np.inf) -> float:
    """F1 of one-to-one matches within `tol` seconds, counting only events in [lo, hi]
    (matching itself uses all events, so nothing is miscounted at the window's edges)."""
    used = np.zeros(len(found), dtype=bool)
    matched = np.zeros(len(truth), dtype=bool)
    for i, t in enumerate(truth):
        if len(found) == 0:
            break
        d = np.abs(found - t)
        d[used] = np.inf
        j = int(np.argmin(d))
        if d[j] <= tol:
            used[j] = matched[i] = True
    t_in = (truth >= lo) & (truth <= hi)
    f_in = (found >= lo) & (found <= hi)
    tp = int(np.sum(matched & t_in))
    fn = int(np.sum(~matched & t_in))
    fp = int(np.sum(~used & f_in))
    return 2 * tp / (2 * tp + fn + fp) if tp else 0.0


@pytest.mark.parametrize("hr", [40.0, 60.0, 90.0, 130.0, 180.0])
def test_independent_detector_finds_the_simulated_r_peaks(hr: float) -> None:
    f1s = []
    for seed in range(3):
        rec = simulate_ecg(40.0, fs=250.0, hr=hr, leads=1, seed=seed)
        found = sleepecg.detect_heartbeats(rec.signal[0].astype(np.float64), rec.fs) / rec.fs
        # The detector learns its thresholds over the first beats: score from 3 s on.
        f1s.append(match_f1(rec.r_peaks, found, lo=3.0, hi=rec.duration - 0.5))
    assert min(f1s) >= 0.99, f1s


def test_shapes_units_leads_and_rates() -> None:
    for fs in (130.0, 250.0, 512.0):
        rec = simulate_ecg(8.0, fs=fs, hr=75.0, leads=12, seed=1)
        assert rec.signal.shape == (12, int(round(8.0 * fs)))
        assert rec.signal.dtype == np.float32
        assert rec.lead_names[:3] == ("I", "II", "III")
        # Lead II of a normal axis has an upright R of roughly a millivolt.
        i_r = np.round(rec.r_peaks * fs).astype(int)
        assert 0.3 < np.median(rec.signal[1, i_r]) < 3.0
        # aVR looks at the heart from the other side: its QRS points down.
        assert np.median(rec.signal[3, i_r]) < 0


def test_mean_rate_and_rr_variability() -> None:
    rec = simulate_ecg(120.0, fs=250.0, hr=72.0, seed=3)
    rr = np.diff(rec.r_peaks)
    assert abs(60.0 / rr.mean() - 72.0) < 3.0
    assert rr.std() > 0.003               # heart rate variability is there ...
    assert rr.std() < 0.15 * rr.mean()    # ... and physiological in size


def test_qt_shortens_with_heart_rate() -> None:
    qts = []
    for hr in (50.0, 100.0, 150.0):
        rec = simulate_ecg(20.0, fs=250.0, hr=hr, seed=0)
        b = rec.beats
        qt = (b.t_end - b.q_on)[:-1]
        np.testing.assert_allclose(qt, qt_seconds(np.diff(b.r)), atol=1e-9)
        qts.append(np.median(qt))
    assert qts[0] > qts[1] > qts[2]
    assert abs(qts[0] - (0.521 - 0.002 * 50)) < 0.02


def test_event_order_in_every_beat() -> None:
    rec = simulate_ecg(30.0, fs=250.0, hr=110.0, seed=5)
    b = rec.beats
    assert np.all(b.p_on < b.q_on) and np.all(b.q_on < b.r) and np.all(b.r < b.t_end)
    assert np.all(b.t_end[:-1] < b.p_on[1:])   # T ends before the next P starts


def test_premature_ventricular_beats() -> None:
    rec = simulate_ecg(60.0, fs=250.0, hr=70.0, seed=2, pvc_rate=0.15)
    b = rec.beats
    pvc = np.flatnonzero(b.kind == 1)
    assert len(pvc) >= 3
    assert np.all(np.isnan(b.p_on[pvc]))                  # no P wave
    rr = np.diff(b.r)
    assert np.all(rr[pvc - 1] < 0.8 * np.median(rr))      # premature ...
    assert np.all(rr[pvc] > 1.2 * np.median(rr))          # ... then a compensatory pause
    clean = simulate_ecg(60.0, fs=250.0, hr=70.0, seed=2)
    assert np.all(clean.beats.kind == 0)


def test_same_seed_same_signal_and_different_seeds_differ() -> None:
    a = simulate_ecg(10.0, seed=11, leads=3)
    b = simulate_ecg(10.0, seed=11, leads=3)
    c = simulate_ecg(10.0, seed=12, leads=3)
    np.testing.assert_array_equal(a.signal, b.signal)
    assert not np.array_equal(a.signal, c.signal)


@pytest.mark.parametrize("kwargs", [{"hr": 20.0}, {"hr": 250.0}, {"leads": 0}, {"leads": 13}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        simulate_ecg(5.0, **kwargs)


def test_t_end_marks_the_end_of_the_drawn_t_wave() -> None:
    rec = simulate_ecg(20.0, fs=500.0, hr=70.0, leads=2, seed=4, noise=0.0)
    x = rec.signal[1].astype(np.float64)   # lead II: upright T
    b = rec.beats
    fs = rec.fs
    for i in np.flatnonzero(rec.inside)[1:-1]:
        base = x[int(b.p_on[i] * fs) - 5]                       # isoelectric, before the P wave
        seg = x[int((b.r[i] + 0.12) * fs): int(b.t_end[i] * fs)]
        peak = seg.max() - base
        assert peak > 0.05
        assert x[int(b.t_end[i] * fs)] - base < 0.2 * peak      # T has come back down by T end
        assert x[int((b.t_end[i] - 0.08) * fs)] - base > 0.3 * peak  # ... and not long before


@pytest.mark.parametrize("rate, share", [(0.05, 0.05), (0.15, 0.15), (0.3, 0.3), (0.5, 0.8 / 1.8)])
def test_pvc_rate_is_the_share_of_premature_beats_without_couplets(rate, share):
    """Once candidates in a run after the first were all dropped: 0.3 gave 0.20, 0.5 gave
    0.25. Every other candidate of a run is kept now, drawn at the rate that delivers
    (up to 4 in 9: strict bigeminy would leave no sinus beat between sinus neighbours)."""
    kinds = np.concatenate([simulate_ecg(300.0, fs=250.0, hr=60.0, seed=s, pvc_rate=rate).beats.kind for s in range(4)])
    assert abs(kinds.mean() - share) < 0.03
    assert not np.any((kinds[1:] == 1) & (kinds[:-1] == 1))  # no couplets
