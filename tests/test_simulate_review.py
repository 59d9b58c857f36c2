"""Simulator review: premature beats that respect refractoriness, wide complexes of a
physiological width, ED/ES labels that match the rendered volumes, clear errors for bad
arguments and an index.json that strict JSON readers accept."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from echopulse.core.simulate import BeatDrivenEcho, EcgRecord, HeartCycle, sample_subject, simulate_ecg, simulate_pair
from echopulse.core.simulate.ecg import EcgMorphology
from echopulse.core.simulate.timing import qrs_onset_offset


def _pvc_record(seed: int, hr: float, ef: float) -> tuple[HeartCycle, EcgRecord]:
    subject = sample_subject(seed, ef=ef, hr=hr)
    morph = dataclasses.replace(subject.ecg, pvc_rate=0.3)
    rec = simulate_ecg(20.0, 250.0, hr, seed=seed, morph=morph)
    return HeartCycle(rec.beats, subject.edv, subject.esv), rec


@pytest.mark.parametrize("hr,ef", [(200.0, 60.0), (150.0, 15.0)])
def test_a_premature_beat_starts_after_the_previous_beat_has_repolarised(hr: float, ef: float) -> None:
    """Once a PVC's QRS could start inside the previous QRS (at 150-200 bpm), and the previous
    beat's end-systole (T end) then fell after the PVC's R: the volume jumped by 40 % of SV."""
    for seed in range(8):
        heart, rec = _pvc_record(seed, hr, ef)
        b = rec.beats
        assert np.all(b.q_on[1:] >= b.t_end[:-1]), seed
        t = np.arange(b.r[1], b.r[-2], 0.0005)
        jump = np.max(np.abs(np.diff(heart.volume(t)))) / (heart.edv - heart.esv)
        assert jump < 0.1, (seed, jump)


def test_wide_complexes_stay_within_physiological_widths() -> None:
    """A QRS of 0.18 s (a sick subject's) once made 0.39 s PVCs and 0.31 s paced beats."""
    morph = dataclasses.replace(EcgMorphology(), qrs=0.18, pvc_rate=0.3)
    for pacing in ("none", "ventricular"):
        rec = simulate_ecg(30.0, 250.0, 60.0, seed=1, morph=morph, pacing=pacing)
        b = rec.beats
        wide = (b.kind == 1) | b.is_paced()
        assert wide.any()
        width = (b.r - b.q_on)[wide] / qrs_onset_offset(1.0)
        assert np.all(width <= 0.24 + 1e-9), width.max()
        assert np.all(width >= 0.18)


@pytest.mark.parametrize("fps,hr", [(7.3, None), (29.97, None), (12.0, 120.0), (None, None)])
def test_ed_and_es_labels_are_the_largest_and_smallest_frames_next_to_r_and_t_end(fps: float | None, hr: float | None) -> None:
    """ED/ES were the frames nearest R / T end, even where the frame on the other side sat on
    the isovolumic plateau and the nearest one was still filling or ejecting: at 7.3 fps an
    ED frame 5 ml under the EDV next to one at EDV; in 28 % of beat-locked clips the ES
    frame one before the smallest LV (1-6 % of the stroke volume larger)."""
    for seed in range(10):
        p = simulate_pair(seed, fps=fps, frames=40 if fps else 11, hr=hr)
        t, v = p["video_t"], p["lv_volume_true"].astype(np.float64)
        tie = 0.01 * (p["edv"] - p["esv"]) + 1e-3  # float32 volumes
        dt = np.median(np.diff(t))
        sinus = p["beat_kind"] == 0
        for key, events, largest in (("ed", p["r_peaks"][sinus], True), ("es", p["t_end"][sinus], False)):
            events = events[(events >= t[0] - dt / 2) & (events <= t[-1] + dt / 2)]
            labels = set(p[key].tolist())
            for e in events:
                j = int(np.searchsorted(t, e))
                near = sorted({min(max(i, 0), len(t) - 1) for i in (j - 1, j)})
                mine = labels.intersection(near)
                assert len(mine) == 1, (seed, key, e, near, p[key])
                f = mine.pop()
                best = v[near].max() if largest else v[near].min()
                assert abs(v[f] - best) <= tie, (seed, key, f, v[near])
                assert abs(t[f] - e) <= dt + 1e-9


@pytest.mark.parametrize("fps,hr", [(3.0, 120.0), (5.0, 200.0), (2.5, 100.0)])
def test_at_low_frame_rates_no_frame_is_both_ed_and_es(fps: float, hr: float) -> None:
    """Frame 0 was once nearest both the previous beat's T end and the next R: labelled ED
    and ES at once, and ef_mask (from ed[0], es[0]) came out 0 %."""
    for seed in range(4):
        p = simulate_pair(seed, fps=fps, frames=12, hr=hr)
        assert not set(p["ed"].tolist()) & set(p["es"].tolist()), (p["ed"], p["es"])
        assert 0.0 < p["ef_mask"] < 100.0, p["ef_mask"]


def test_beat_locked_ef_mask_uses_the_smallest_frame_of_the_beat() -> None:
    for seed in range(6):
        p = simulate_pair(seed)
        vol = p["lv_volume"]
        es = int(p["es"][0])
        assert list(p["ed"]) == [1]
        assert p["lv_volume_true"][es] == pytest.approx(p["lv_volume_true"].min(), abs=0.01 * (p["edv"] - p["esv"]))
        assert p["ef_mask"] == pytest.approx(100.0 * (vol[1] - vol[es]) / vol[1], rel=1e-5)


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "kwargs,name",
    [({"duration": NAN}, "duration"), ({"duration": INF}, "duration"), ({"fs": NAN}, "fs"), ({"fs": INF}, "fs"),
     ({"duration": 0.001}, "sample"), ({"leads": 2.5}, "leads"), ({"pvc_rate": -0.1}, "pvc_rate"),
     ({"pvc_rate": 1.5}, "pvc_rate"), ({"pvc_rate": NAN}, "pvc_rate"), ({"noise": -1.0}, "noise"), ({"noise": NAN}, "noise")],
)
def test_simulate_ecg_refuses_bad_numbers_with_a_value_error(kwargs: dict, name: str) -> None:
    """Once a NaN/inf crashed deep inside NumPy (or overflowed), and a negative noise, a
    NaN noise (a NaN signal) or a PVC rate outside 0..1 went through unnoticed."""
    with pytest.raises(ValueError, match=name):
        simulate_ecg(**{"duration": 5.0, **kwargs})


@pytest.mark.parametrize(
    "kwargs,name",
    [({"fps": NAN}, "fps"), ({"fps": INF}, "fps"), ({"ecg_seconds": NAN}, "ecg_seconds"), ({"ecg_seconds": INF}, "ecg_seconds"),
     ({"noise": -1.0}, "noise"), ({"pvc_rate": 2.0}, "pvc_rate"), ({"pvc_rate": -0.5}, "pvc_rate"),
     ({"frames": 2.5, "fps": 30.0}, "frames"), ({"ecg_fs": NAN}, "fs")],
)
def test_simulate_pair_refuses_bad_numbers_with_a_value_error(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        simulate_pair(0, **kwargs)


@pytest.mark.parametrize("r_time,rr", [(10.0, 0.0), (10.0, -0.8), (10.0, NAN), (NAN, 0.8), (10.0, INF)])
def test_beat_driven_renderer_refuses_impossible_beats(r_time: float, rr: float) -> None:
    """A zero or negative RR once rendered frames running backwards in time, without a word."""
    with pytest.raises(ValueError, match="r_time|rr"):
        BeatDrivenEcho(seed=1).render_beat(r_time, rr)


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_index_json_is_strict_json_when_a_clip_has_no_ef(tmp_path: Path) -> None:
    """A short fixed-rate clip has no ED/ES pair: its ef_mask (NaN) was written as NaN,
    which JSON does not have (JavaScript, jq and most readers refuse the file)."""
    from echopulse.stream.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", "--n", "1", "--fps", "30", "--frames", "3", "--out", str(out)]) == 0
    index = _strict_json((out / "index.json").read_text())
    assert index["samples"][0]["ef_mask"] is None
