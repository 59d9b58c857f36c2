"""A flat detection lead hands detection to a live lead seamlessly: the segmenter keeps its
ring and warms a detector on the new lead's history, so no beat is lost, none comes twice
and every R keeps its time."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.bridges.chunk import EcgChunk
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream.beats import BeatSegmenter
from echopulse.stream.session import EngineLimits, Session

FS = 250.0
TOL = 0.01  # s: R on another lead than the truth's reference is a few ms off


def lead_off(seconds: float, off_s: float, hr: float = 75.0, seed: int = 4, level: float | None = None,
             fs: float = FS):
    """3-lead ECG whose lead 0 comes off at `off_s`: it holds its last value (or steps to `level`)."""
    rec = simulate_ecg(seconds, fs=fs, hr=hr, seed=seed, leads=3, pvc_rate=0.0)
    x = rec.signal.copy()
    off = int(off_s * fs)
    x[0, off:] = x[0, off] if level is None else level
    return rec, x


def session_run(x: np.ndarray, chunk: int = 50, fs: float = FS) -> tuple[Session, list, list]:
    """(session, queued beats, events) after feeding `x` in chunks of `chunk` samples."""
    s = Session("dev", EngineLimits(beat_queue=100_000))
    events = []
    for k, i in enumerate(range(0, x.shape[1], chunk)):
        events += s.ingest(EcgChunk("dev", x[:, i:i + chunk].copy(), fs, i / fs, k))
    return s, s.take_all(), events


def missed(truth: np.ndarray, beats: list, end: float) -> np.ndarray:
    """True R times that begin no beat, among those whose next R the stream confirms."""
    due = truth[:-1][truth[1:] < end - 0.35]  # the detector needs ~0.3 s after an R
    r = np.array([b.r_time for b in beats])
    return np.array([t for t in due if np.abs(r - t).min() > TOL])


def assert_true_beats(beats: list, truth: np.ndarray) -> None:
    """Each beat begins at a true R (once), and ends at the next one."""
    r = np.array([b.r_time for b in beats])
    nearest = np.abs(r[:, None] - truth[None, :]).argmin(axis=1)
    assert np.abs(r - truth[nearest]).max() < TOL
    assert np.all(np.diff(nearest) >= 1), "a true R began two beats"
    for b, k in zip(beats, nearest):
        assert b.next_r_time == pytest.approx(truth[k + 1], abs=TOL)


# -- the session ------------------------------------------------------------------------

@pytest.mark.parametrize("hr, off_s", [(75.0, 12.0), (120.0, 17.3)])
def test_beats_go_on_across_a_switch_with_none_lost_or_repeated(hr, off_s):
    rec, x = lead_off(30.0, off_s, hr=hr)
    s, pending, events = session_run(x)
    beats = [p.beat for p in pending]
    # lead 0 is called flat 2 s after it came off; once the beats of those 2 s, the one
    # whose next R fell in them and those of the new detector's 2 s of learning were lost
    # (3 to 4 beats at 75 bpm)
    assert missed(rec.r_peaks, beats, 30.0).size == 0
    assert_true_beats(beats, rec.r_peaks)
    assert [p.index for p in pending] == list(range(len(pending)))
    assert all(a.detected_at <= b.detected_at for a, b in zip(beats, beats[1:]))
    # the beats after the switch come from lead 1
    assert s.detect_lead == 1 and s.segmenter.detect_lead == 1
    switches = [m for c, m in events if c == "bad_input" and m.startswith("detect_lead")]
    assert switches == ["detect_lead: lead 0 flat (lead off?); beats detected on lead 1 now"]
    assert s.counters["detect_lead_switches"] == 1
    assert s.counters["bad_input"] == sum(c == "bad_input" for c, _ in events)
    assert s.counters["detector_restarts"] == 0 and s.lost is None


def test_a_switch_right_after_the_stream_starts_keeps_every_beat():
    # lead 0 is off from the start: the switch comes after 2 s, with 2 s of lead 1's history
    rec, x = lead_off(20.0, 0.0, hr=90.0, seed=2)
    s, pending, events = session_run(x)
    beats = [p.beat for p in pending]
    assert s.counters["detect_lead_switches"] == 1 and s.detect_lead == 1
    assert missed(rec.r_peaks, beats, 20.0).size == 0  # once the first 2 beats were lost
    assert_true_beats(beats, rec.r_peaks)


def test_the_step_a_lead_leaves_as_it_comes_off_starts_no_beat_after_the_switch():
    # lead 0 jumps to a 1.5 mV offset: its detector takes the step for an R (that beat, emitted
    # 2 s before the flat line is known, keeps the step as its next R); after the switch the
    # new lead's history decides, so the true R beside the step is not lost, nor the step a beat
    rec, x = lead_off(30.0, 13.0, seed=2, level=1.5)
    s, pending, _ = session_run(x)
    beats = [p.beat for p in pending]
    switch_t = 15.0
    assert missed(rec.r_peaks, beats, 30.0).size == 0
    r = np.array([b.r_time for b in beats])
    assert np.abs(r[:, None] - rec.r_peaks[None, :]).min(axis=1).max() < TOL
    wrong_next = [b for b in beats if np.abs(rec.r_peaks - b.next_r_time).min() > TOL]
    assert len(wrong_next) == 1 and wrong_next[0].detected_at < switch_t


def test_beats_across_a_switch_do_not_depend_on_the_chunking():
    _, x = lead_off(26.0, 12.3)
    ref = [p.beat for p in session_run(x, 125)[1]]
    for chunk in (7, 4096):
        got = [p.beat for p in session_run(x, chunk)[1]]
        assert [b.r_time for b in got] == [b.r_time for b in ref]
        assert [b.detected_at for b in got] == [b.detected_at for b in ref]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.valid, b.valid)
            np.testing.assert_array_equal(a.window, b.window)


# -- the segmenter ------------------------------------------------------------------------

def segment(seg: BeatSegmenter, x: np.ndarray, i0: int, i1: int, chunk: int = 64) -> list:
    beats = []
    for i in range(i0, i1, chunk):
        beats += seg.push(x[:, i:min(i + chunk, i1)], i / seg.fs)
    return beats


@pytest.mark.parametrize("fs, switch_s", [(250.0, 9.1), (500.0, 1.3), (130.0, 6.0), (1000.0, 4.2)])
def test_switching_the_detector_is_detecting_on_the_new_lead_all_along(fs, switch_s):
    """With the whole stream in the ring, the warmed detector has seen what a detector on the
    new lead from the start saw, spike-blanker lag included: the same beats after the switch
    (those the history completes are emitted at the switch), the same windows for the rest."""
    _, x = lead_off(20.0, switch_s - 2.0 if switch_s > 2.0 else 0.0, fs=fs)
    n = int(switch_s * fs)
    seg = BeatSegmenter(fs, 3)
    before = segment(seg, x, 0, n)
    at_switch = seg.switch_lead(1)
    after = segment(seg, x, n, x.shape[1])
    ref = segment(BeatSegmenter(fs, 3, detect_lead=1), x, 0, x.shape[1])
    new = at_switch + after
    last = before[-1].r_time if before else -1.0
    expected = [b for b in ref if b.r_time > last + 0.2]
    assert after and bool(at_switch) == (switch_s > 2.5)  # under 2 s of history: still learning
    assert [b.r_time for b in new] == [b.r_time for b in expected]
    assert [b.next_r_time for b in new] == [b.next_r_time for b in expected]
    assert [b.index for b in before + new] == list(range(len(before) + len(new)))
    switched_at = (n - 1) / fs
    for b in at_switch:
        assert b.detected_at == pytest.approx(switched_at)  # emitted then, not back in the history
    for a, b in zip(after, expected[len(at_switch):]):
        assert a.detected_at == b.detected_at
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.window, b.window)


def test_switch_lead_checks_its_lead_and_a_switch_to_the_same_lead_is_nothing():
    seg = BeatSegmenter(FS, 2)
    with pytest.raises(ValueError):
        seg.switch_lead(2)
    assert seg.switch_lead(1) == [] and seg.detect_lead == 1  # nothing pushed yet: nothing to warm on
    rec = simulate_ecg(8.0, fs=FS, hr=75, seed=1, leads=2)
    beats = segment(seg, rec.signal, 0, rec.signal.shape[1])
    assert seg.switch_lead(1) == [] and len(beats) >= len(rec.r_peaks) - 2


@pytest.mark.parametrize("nan_from, nan_to", [(39.0, 40.0), (20.0, 39.9)])
def test_the_old_leads_last_r_stays_where_the_new_lead_has_no_samples_to_judge_it(nan_from, nan_to):
    # The new lead is NaN over the old lead's latest R (its own contact came back just now, or
    # a burst of bad samples): it cannot say what that R was, so the old lead's word stands.
    # Once the R was dropped all the same, and the beat it began was lost.
    rec = simulate_ecg(60.0, fs=FS, hr=75, seed=3, leads=3, pvc_rate=0.0)
    x = rec.signal.copy()
    x[1, int(nan_from * FS):int(nan_to * FS)] = np.nan
    n = int(40.0 * FS)
    seg = BeatSegmenter(FS, 3)
    beats = segment(seg, x, 0, n) + seg.switch_lead(1) + segment(seg, x, n, x.shape[1])
    assert missed(rec.r_peaks, beats, 60.0).size == 0
    assert_true_beats(beats, rec.r_peaks)
    assert [b.index for b in beats] == list(range(len(beats)))


def test_detection_moves_to_the_lead_that_shows_the_beats_not_merely_the_first_live_one():
    # Lead 1 is live (noise, no flat line) but shows no QRS: a lead reversed, a cable that
    # picks up only muscle. Once detection moved to it as the first lead not flat, and
    # beats stopped until it went flat in turn.
    rec, x = lead_off(30.0, 12.0, seed=4)
    x[1], x[2] = 0.05 * np.random.default_rng(0).standard_normal(x.shape[1]).astype(np.float32), x[1].copy()
    s, pending, events = session_run(x)
    beats = [p.beat for p in pending]
    assert s.detect_lead == 2
    assert missed(rec.r_peaks, beats, 30.0).size == 0
    assert_true_beats(beats, rec.r_peaks)
    switches = [m for c, m in events if c == "bad_input" and m.startswith("detect_lead")]
    assert switches == ["detect_lead: lead 0 flat (lead off?); beats detected on lead 2 now"]


def test_lead_agreement_counts_the_recent_beats_a_lead_finds_again():
    x = simulate_ecg(20.0, fs=FS, hr=75.0, seed=4, leads=3, pvc_rate=0.0).signal.copy()
    x[1], x[2] = 0.05 * np.random.default_rng(0).standard_normal(x.shape[1]).astype(np.float32), x[1].copy()
    seg = BeatSegmenter(FS, 3)
    seg.push(x, 0.0)
    scores = [seg.lead_agreement(lead) for lead in range(3)]
    assert scores[0] >= 10 and scores[2] >= scores[0] - 2 and scores[1] < scores[2] - 5
    with pytest.raises(ValueError, match="lead 3 out of range"):
        seg.lead_agreement(3)
    assert BeatSegmenter(FS, 3).lead_agreement(1) == 0  # no history yet


def test_a_lead_that_finds_beats_that_are_not_there_scores_lower():
    rec = simulate_ecg(20.0, fs=FS, hr=75.0, seed=4, leads=3, pvc_rate=0.0)
    good = rec.signal[1].copy()
    spiky = good.copy()
    for r in rec.r_peaks[:-1] + 0.4:  # a sharp deflection between every two beats
        i = int(r * FS)
        spiky[i:i + 3] += np.array([0.8, 2.0, 0.8], np.float32)
    seg = BeatSegmenter(FS, 2)
    seg.push(np.stack([good, spiky]), 0.0)
    assert seg.lead_agreement(1) < seg.lead_agreement(0)
