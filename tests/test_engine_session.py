"""Per-device session policy (no sockets): bad input → status events and counters, never invented beats."""
from __future__ import annotations

import time

import numpy as np
import pytest

from echopulse.bridges.chunk import EcgChunk
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream.session import EngineLimits, Session

FS = 250.0


def ecg(seconds: float, hr: float = 75.0, seed: int = 1, fs: float = FS):
    return simulate_ecg(seconds, fs=fs, hr=hr, seed=seed, pvc_rate=0.0)


def feed(session: Session, signal: np.ndarray, fs: float = FS, t0: float = 0.0, seq0: int = 0, step_s: float = 0.2):
    """Feed `signal` in chunks; return (events, seq after the last chunk)."""
    events, step = [], int(step_s * fs)
    seq = seq0
    for start in range(0, signal.shape[1], step):
        events += session.ingest(EcgChunk(session.device, signal[:, start:start + step], fs, t0 + start / fs, seq))
        seq += 1
    return events, seq


def codes(events) -> list[str]:
    return [f"{code}:{msg.split(':')[0]}" if code == "bad_input" else code for code, msg in events]


def fresh(device: str = "dev", **limits) -> Session:
    return Session(device, EngineLimits(**{"beat_queue": 10_000, **limits}))


def test_clean_ecg_gives_the_true_beats_and_no_events():
    rec = ecg(20)
    s = fresh()
    events, _ = feed(s, rec.signal)
    beats = [p.beat for p in s.take_all()]
    assert events == []
    truth = rec.r_peaks
    # Every beat but the last (it needs the next R) is found, within 20 ms.
    assert len(beats) == len(truth) - 1
    np.testing.assert_allclose([b.r_time for b in beats], truth[:-1], atol=0.02)
    assert s.counters["beats"] == len(beats) and s.counters["chunks"] == 100


def test_flat_line_reports_signal_lost_once_invents_no_beat_then_recovers():
    s = fresh()
    rec = ecg(8)
    events, seq = feed(s, rec.signal)
    n_before = len(s.take_all())
    flat = np.full((1, int(10 * FS)), 0.1, np.float32)
    flat_events, seq = feed(s, flat, t0=8.0, seq0=seq)
    assert codes(flat_events) == ["signal_lost"] and "flat line" in flat_events[0][1]
    assert s.take_all() == []  # no beat during, or spanning into, the flat line
    assert s.lost == "flat line"
    back = ecg(10, seed=2)
    back_events, _ = feed(s, back.signal, t0=18.0, seq0=seq)
    assert codes(back_events) == ["signal_restored"]
    beats = [p.beat for p in s.take_all()]
    assert len(beats) >= len(back.r_peaks) - 4  # the detector re-learns, then finds them
    assert all(b.r_time >= 18.0 for b in beats)
    assert n_before > 0 and s.counters["signal_lost"] == 1


def test_nan_and_inf_are_reported_repaired_and_beats_go_on():
    rec = ecg(12)
    sig = rec.signal.copy()
    sig[0, 1000:1010] = np.nan
    sig[0, 2000] = np.inf
    s = fresh()
    events, _ = feed(s, sig)
    assert codes(events) == ["bad_input:non_finite", "bad_input:non_finite"]
    assert s.counters["issue_non_finite"] == 2 and s.counters["bad_input"] == 2
    assert len(s.take_all()) >= len(rec.r_peaks) - 2


def test_gap_restarts_the_detector_and_no_rr_spans_it():
    rec = ecg(20)
    s = fresh()
    cut = int(8 * FS)
    events, seq = feed(s, rec.signal[:, :cut])
    gap_events, _ = feed(s, rec.signal[:, cut + int(3 * FS):], t0=(cut + 3 * FS) / FS, seq0=seq)
    assert codes(gap_events)[:1] == ["bad_input:gap"]
    assert s.counters["detector_restarts"] == 1
    beats = [p.beat for p in s.take_all()]
    assert beats and max(b.rr for b in beats) < 1.2  # 75 bpm: 0.8 s; a beat across the gap would be ~3.8 s
    assert not any(b.r_time < 8.0 < b.next_r_time for b in beats)


def test_device_clock_reset_restarts_the_detector_on_the_new_time_base():
    first, second = ecg(12, seed=1), ecg(12, seed=3)
    s = fresh()
    _, seq = feed(s, first.signal, t0=1000.0)
    before = len(s.take_all())
    events, _ = feed(s, second.signal, t0=0.0, seq0=0)  # the device rebooted: its clock and seq start again
    assert "bad_input:time_reset" in codes(events) and s.counters["detector_restarts"] == 1
    beats = [p.beat for p in s.take_all()]
    assert before > 0 and beats
    assert all(b.r_time < 12.0 for b in beats)  # on the new clock; none joins the two recordings
    rr = np.diff(second.r_peaks)
    assert rr.min() - 0.02 <= min(b.rr for b in beats) and max(b.rr for b in beats) <= rr.max() + 0.02


def test_samples_of_the_wrong_shape_are_bad_input_not_an_error():
    s = fresh()
    events = s.ingest(EcgChunk("dev", np.zeros(100, np.float32), FS, 0.0, 0))  # 1-D: once an IndexError
    assert codes(events) == ["bad_input:bad_shape"] and s.counters["chunks_dropped"] == 1


@pytest.mark.parametrize("fs", [0.1, 40.0, 1e12])
def test_sample_rate_outside_the_detectors_range_is_bad_input_not_an_error(fs):
    s = fresh()
    events = s.ingest(EcgChunk("dev", ecg(2).signal[:, :100], fs, 0.0, 0))  # once a ValueError per chunk, or 125 TiB
    assert codes(events) == ["bad_input:bad_shape"] and "outside 50..20000 Hz" in events[0][1]
    assert s.counters["chunks_dropped"] == 1 and s.segmenter is None
    good, _ = feed(s, ecg(6).signal, t0=10.0, seq0=1)  # the device's next, sane chunks still work
    assert s.take_all()


@pytest.mark.parametrize("kind", ["duplicate", "out_of_order"])
def test_duplicate_and_out_of_order_chunks_are_dropped(kind):
    rec = ecg(4)
    s = fresh()
    chunks = [EcgChunk("dev", rec.signal[:, i:i + 50], FS, i / FS, i // 50) for i in range(0, 1000, 50)]
    for c in chunks[:10]:
        s.ingest(c)
    again = chunks[9] if kind == "duplicate" else chunks[3]
    if kind == "out_of_order":
        s.ingest(chunks[10])
        s.ingest(chunks[12])  # 11 comes late
        again = chunks[11]
        events = s.ingest(again)
    else:
        events = s.ingest(again)
    assert codes(events)[-1] == f"bad_input:{kind}"
    assert s.counters["chunks_dropped"] == 1


def test_fs_change_mid_stream_restarts_the_detector_and_beats_continue():
    a, b = ecg(10, fs=250.0), ecg(10, fs=500.0, seed=3)
    s = fresh()
    _, seq = feed(s, a.signal, fs=250.0)
    events, _ = feed(s, b.signal, fs=500.0, t0=10.0, seq0=seq)
    assert codes(events) == ["bad_input:fs_change"]
    beats = [p.beat for p in s.take_all()]
    late = [x for x in beats if x.r_time > 10.0]
    np.testing.assert_allclose([x.r_time for x in late][:5], 10.0 + b.r_peaks[:5], atol=0.02)


def test_saturation_is_reported():
    rec = ecg(10)
    sig = rec.signal.copy()
    top = float(sig.max())
    sig[0, 1500:1540] = top  # pinned at the running maximum for 160 ms
    s = fresh()
    events, _ = feed(s, sig)
    assert "bad_input:saturation" in codes(events)
    assert s.counters["issue_saturation"] >= 1


def test_unknown_unit_is_dropped_and_reported():
    s = fresh()
    rec = ecg(2)
    events = s.ingest(EcgChunk("dev", rec.signal[:, :100], FS, 0.0, 0, unit="furlongs"))
    assert codes(events) == ["bad_input:unknown_unit"] and s.counters["chunks_dropped"] == 1


def test_microvolts_are_converted_before_detection():
    rec = ecg(10)
    s = fresh()
    for i, start in enumerate(range(0, rec.signal.shape[1], 50)):
        s.ingest(EcgChunk("dev", rec.signal[:, start:start + 50] * 1000.0, FS, start / FS, i, unit="uV"))
    assert len(s.take_all()) >= len(rec.r_peaks) - 2


def test_full_beat_queue_drops_the_oldest_and_reports_overload():
    rec = ecg(12)
    s = fresh(beat_queue=2)
    events, _ = feed(s, rec.signal)
    kept = s.take_all()
    found = s.counters["beats"]
    assert found >= 10
    assert [p.index for p in kept] == [found - 2, found - 1]  # the newest survive
    assert s.counters["beats_dropped"] == found - 2
    assert codes(events).count("overload") == found - 2


def test_watchdog_reports_silence_once_and_data_restores():
    s = fresh(signal_timeout_s=1.0)
    now = time.monotonic()
    assert s.check_idle(now + 0.5) is None
    lost = s.check_idle(now + 2.0)
    assert lost is not None and lost[0] == "signal_lost" and "no data" in lost[1]
    assert s.check_idle(now + 3.0) is None  # reported once
    events = s.ingest(EcgChunk("dev", ecg(1).signal, FS, 0.0, 0))
    assert codes(events) == ["signal_restored"]


def test_status_rate_limit_per_kind():
    s = fresh(status_interval_s=1.0)
    assert s.should_report("bad_input", "gap: x", 10.0)
    assert not s.should_report("bad_input", "gap: y", 10.5)
    assert s.should_report("bad_input", "non_finite: z", 10.5)  # another kind
    assert s.should_report("signal_lost", "flat", 10.5) and s.should_report("signal_lost", "flat", 10.6)
    assert s.should_report("bad_input", "gap: y", 11.1)
    assert s.counters["statuses_suppressed"] == 1


def test_bad_device_id_is_refused():
    with pytest.raises(ValueError, match="device"):
        Session("a/b")


def test_silence_then_flat_data_stays_lost_until_real_ecg():
    s = fresh(signal_timeout_s=1.0)
    rec = ecg(6)
    _, seq = feed(s, rec.signal)
    assert s.check_idle(time.monotonic() + 2.0)[0] == "signal_lost"
    flat_events, seq = feed(s, np.zeros((1, int(3 * FS)), np.float32), t0=6.0, seq0=seq)
    # before the checker has 2 s of flat signal the chunks still count as data: restored,
    # then lost again for the flat line
    assert codes(flat_events) == ["signal_restored", "signal_lost"]
    assert "flat line" in flat_events[-1][1] and s.lost == "flat line"
    back, _ = feed(s, ecg(8, seed=5).signal, t0=9.0, seq0=seq)
    assert codes(back) == ["signal_restored"] and s.lost is None
