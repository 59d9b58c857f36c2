"""The ECG → beat path under bad input, as a reviewer reproduced it: a flat detection lead,
leading NaN on a DC offset, units other than mV, a flat line at the end of a long chunk,
NaN gaps through the session, long pauses and the resampler's reach at the window edges."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.bridges.chunk import EcgChunk
from echopulse.bridges.validate import ChunkChecker
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.kernels import qrs
from echopulse.kernels.resample import resample
from echopulse.stream.beats import BeatSegmenter
from echopulse.stream.session import EngineLimits, Session

FS = 250.0


def session_run(signal: np.ndarray, chunk: int, fs: float = FS, unit: str = "mV") -> tuple[Session, list, list]:
    """(session, beats, events) after feeding `signal` in chunks of `chunk` samples."""
    s = Session("dev", EngineLimits(beat_queue=100_000))
    events = []
    for k, i in enumerate(range(0, signal.shape[1], chunk)):
        events += s.ingest(EcgChunk("dev", signal[:, i:i + chunk].copy(), fs, i / fs, k, unit=unit))
    return s, [p.beat for p in s.take_all()], events


def segmenter_run(signal: np.ndarray, chunk: int, fs: float = FS, **kw) -> tuple[BeatSegmenter, list]:
    seg = BeatSegmenter(fs, signal.shape[0], **kw)
    beats = []
    for i in range(0, signal.shape[1], chunk):
        beats += seg.push(signal[:, i:i + chunk], i / fs)
    return seg, beats


def assert_same_beats(got: list, ref: list) -> None:
    assert len(got) == len(ref)
    # times to the float rounding of the chunks' t0 (i / fs) that the detector restarted at
    np.testing.assert_allclose([b.r_time for b in got], [b.r_time for b in ref], rtol=0, atol=1e-9)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.window, b.window)


# -- 1: the detection lead goes flat, another does not ---------------------------------

def test_a_flat_detection_lead_hands_detection_to_a_live_lead_once():
    rec = simulate_ecg(24.0, fs=FS, hr=75, seed=4, leads=3)
    x = rec.signal.copy()
    off = int(12 * FS)
    x[0, :off] = 0.001 * np.random.default_rng(0).standard_normal(off)  # lead I off (1 µV noise), then back
    s, beats, events = session_run(x, 125)
    switches = [m for c, m in events if m.startswith("detect_lead")]
    assert len(switches) == 1 and "lead 0" in switches[0] and "lead 1" in switches[0]
    assert s.counters["detect_lead_switches"] == 1 and s.detect_lead == 1  # lead 0 back: no flip back
    assert s.lost is None and "signal_lost" not in [c for c, _ in events]
    # lead 0 is called flat after 2 s; the detector moved to lead 1 learns on its 2 s of
    # history, so every beat is kept (once the first 2 s and 2 s of learning were lost)
    assert len(beats) == len(rec.r_peaks) - 1
    np.testing.assert_allclose([b.r_time for b in beats], rec.r_peaks[:-1], atol=0.02)


# -- 2: NaN before the first finite sample ---------------------------------------------

@pytest.mark.parametrize("offset", [5.0, 300.0])
def test_leading_nan_on_a_dc_offset_is_no_step(offset):
    fs = FS
    rec = simulate_ecg(30.0, fs=fs, hr=75, seed=4)
    x = (rec.signal[0] + offset).astype(np.float32)
    y = x.copy()
    y[:3] = np.nan
    clean, _ = qrs.detect(x, fs)
    holed, _ = qrs.detect(y, fs)
    assert len(clean) >= 35
    # learning starts 3 samples later; the beats are the same (once ~13 s were lost and one invented)
    assert len(holed) == len(clean) and np.abs(holed - clean).max() <= 1
    for chunk in (1, 2, 5):
        np.testing.assert_array_equal(qrs.detect(y, fs, chunk=chunk)[0], holed)
    # the Python reference agrees with the jitted kernel
    np.testing.assert_array_equal(qrs.detect(y[:2500], fs, backend="python")[0], qrs.detect(y[:2500], fs)[0])


def test_leading_nan_through_the_session_keeps_every_beat():
    rec = simulate_ecg(30.0, fs=FS, hr=75, seed=4)
    x = (rec.signal + 300.0).astype(np.float32)
    _, ref, _ = session_run(x, 125)
    x[:, :3] = np.nan
    s, beats, events = session_run(x, 125)
    assert [c for c, m in events] == ["bad_input"] and "non_finite" in events[0][1]
    assert len(beats) == len(ref) >= 34
    assert abs(beats[0].r_time - ref[0].r_time) < 0.01


def test_checker_holds_the_first_finite_value_back_not_zero():
    c = ChunkChecker()
    x = (np.linspace(300.0, 301.0, 50)[None]).astype(np.float32).repeat(2, axis=0)
    x[:, :3] = np.nan
    x[1, :] = np.nan  # a lead with no finite value yet
    r = c.check(EcgChunk("d", x, FS, 0.0, 0))
    out = r.chunk.samples
    assert (out[0, :3] == x[0, 3]).all()  # once 0: a 300 mV step
    assert (out[1] == 0).all()
    y = np.full((2, 50), 7.0, np.float32)
    y[1, :5] = np.nan
    out = c.check(EcgChunk("d", y, FS, 0.2, 1)).chunk.samples
    assert (out[1, :5] == 7.0).all()  # nothing to carry from the all-NaN chunk: held back


# -- 3: units ----------------------------------------------------------------------------

def test_volts_and_microvolts_are_checked_in_millivolts():
    rec = simulate_ecg(12.0, fs=FS, hr=70, seed=1)
    s, beats, events = session_run(rec.signal * 1e-3, 125, unit="V")
    assert events == [] and s.lost is None and len(beats) >= len(rec.r_peaks) - 2  # once: all "flat"
    off = (0.002 * np.random.default_rng(0).standard_normal((1, 2500))).astype(np.float32)  # lead off, 2 µV
    s, _, events = session_run(off * 1e3, 125, unit="uV")
    assert [c for c, _ in events] == ["signal_lost"] and s.lost == "flat line"  # once: nothing


# -- 4: a flat line at the end of a long chunk ------------------------------------------

def test_a_flat_line_stops_detection_where_it_began_whatever_the_chunking():
    rec = simulate_ecg(26.0, fs=FS, hr=75, seed=4)
    x = rec.signal.copy()
    a, z = int(13.5 * FS), int(16.4 * FS)
    x[:, a:z] = x[:, a]  # lead off for 2.9 s
    results = {c: session_run(x, c) for c in (7, 250, 4096)}
    _, ref, ref_events = results[250]
    assert sum(b.r_time < 13.5 for b in ref) >= 15
    assert [c for c, _ in ref_events] == ["signal_lost", "signal_restored"]
    for c, (s, beats, events) in results.items():
        assert events == ref_events, c
        assert_same_beats(beats, ref)  # with 4096: once the 16 beats before the flat line were lost


def test_checker_flat_mask_says_where_the_flat_line_began():
    c = ChunkChecker(flat_s=1.0)
    rec = simulate_ecg(6.0, fs=FS, hr=70, seed=2)
    x = rec.signal.copy()
    x[:, 1000:] = 5.0  # far from the ECG: every window holding an ECG sample varies
    r = c.check(EcgChunk("d", x, FS, 0.0, 0))
    first = int(np.flatnonzero(r.flat[0])[0])
    assert first == 1000 + int(FS) - 1 and r.flat[0, first:].all()  # 1 s of flat samples up to it
    assert "flat_line" in r.codes


# -- 5: NaN gaps reach the beat windows as gaps ------------------------------------------

def test_a_nan_gap_is_invalid_in_the_session_windows_too():
    rec = simulate_ecg(20.0, fs=FS, hr=70, seed=1)
    x = rec.signal.copy()
    x[:, int(10 * FS):int(11 * FS)] = np.nan  # a 1 s dropout sent as NaN
    _, beats, _ = session_run(x, 125)
    _, direct = segmenter_run(x, 125)
    hit = 0
    for b in beats:
        t = b.r_time - 0.5 + np.arange(b.valid.size) / 250.0
        gap = (t >= 10.0) & (t < 11.0)
        hit += gap.any()
        assert not b.valid[gap].any()  # once 250/250 "valid" samples the checker made up
    assert hit >= 2
    assert_same_beats(beats, direct)


# -- 6: the ring and the window edges ----------------------------------------------------

def test_window_after_a_long_pause_does_not_depend_on_the_chunking():
    rec = simulate_ecg(30.0, fs=FS, hr=70, seed=6)
    x, r = rec.signal[0], rec.r_peaks
    cut = int((r[np.searchsorted(r, 10.0)] + 0.45) * FS)
    pause = (x[cut] + 0.01 * np.random.default_rng(0).standard_normal(int(10.2 * FS))).astype(np.float32)
    y = np.concatenate([x[:cut], pause, x[cut:]])[None]
    _, small = segmenter_run(y, 7)
    _, large = segmenter_run(y, 4096)
    assert max(b.rr for b in small) > 10.5
    assert_same_beats(large, small)  # with 4096: the long beat's first 80 samples were lost


@pytest.mark.parametrize("fs", [130.0, 500.0])
def test_valid_outputs_never_read_past_the_delivered_samples(fs):
    rec = simulate_ecg(16.0, fs=fs, hr=70, seed=2, leads=1)
    seg, beats = segmenter_run(rec.signal, 64, fs=fs, remove_spikes=False)
    assert len(beats) >= 12
    for b in beats[2:-2]:
        full = resample(rec.signal, b.r_time * fs + seg._grid, fs, 250.0)  # the window with all the data
        assert b.valid.sum() > 300
        # once up to 0.035 mV off in the last valid outputs, whose kernel reached past the delivered data
        np.testing.assert_allclose(b.window[:, b.valid], full[:, b.valid], atol=1e-5)
