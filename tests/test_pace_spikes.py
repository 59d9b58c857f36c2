"""Paced ECG: the simulator's pacing spikes, and the streaming spike remover that keeps
them out of beat detection without touching unpaced ECG."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from echopulse.core.simulate import simulate_ecg, simulate_pair
from echopulse.core.simulate.ecg import EcgMorphology
from echopulse.core.simulate.pacing import spike_train
from echopulse.kernels import qrs
from echopulse.kernels.pace_spikes import MIN_FS, SpikeBlanker
from echopulse.stream.beat_score import score
from echopulse.stream.beats import BeatSegmenter

TOL = 0.05


def paced(fs: float, seed: int, mode: str = "dual", spike_mv: float = 30.0, width_ms: float = 0.5,
          tail_ms: float = 12.0, leads: int = 2, seconds: float = 30.0, spikes: bool = True):
    """A paced subject's ECG; spikes=False: the same recording without the pacing artefacts."""
    morph = EcgMorphology.sample(np.random.default_rng(seed))
    morph = dataclasses.replace(morph, spike_mv=spike_mv if spikes else 0.0, spike_ms=width_ms, spike_tail_ms=tail_ms)
    return simulate_ecg(seconds, fs=fs, hr=70.0, leads=leads, seed=np.random.default_rng(1000 + seed), pacing=mode, morph=morph)


def run(blanker: SpikeBlanker, x: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([blanker.push(x[:, i:i + chunk]) for i in range(0, x.shape[1], chunk)], axis=1)


# -- the simulator ----------------------------------------------------------------------

def test_pacing_spikes_are_where_the_record_says_and_carry_no_net_charge():
    rec = paced(500.0, 1)
    clean = paced(500.0, 1, spikes=False)
    artefact = rec.signal - clean.signal
    for kind in ("atrial", "ventricular"):
        times = rec.extras["pacing_spikes"][kind]
        assert len(times) >= 30
        idx = (times * rec.fs).astype(int)
        assert np.all(np.abs(artefact[1, idx]) + np.abs(artefact[1, idx + 1]) > 1.0)  # mV, lead II
    # the ventricular spike starts the QRS; a paced QRS is wide
    assert np.allclose(rec.extras["pacing_spikes"]["ventricular"], rec.beats.q_on[rec.beats.is_paced() & (rec.beats.q_on >= 0) & (rec.beats.q_on < 30.0)])
    assert np.all(rec.beats.r - rec.beats.q_on > 0.06)
    # the afterpotential returns the pulse's charge
    train = spike_train(2000, 1000.0, np.array([0.5]), 0.0005, 0.012)
    assert train.max() > 0.4 and train.min() < 0 and abs(train.sum()) < 0.005 * train.max()


def test_pacing_leaves_unpaced_subjects_and_their_beats_alone():
    a = simulate_ecg(10.0, fs=250.0, hr=70.0, seed=3)
    b = simulate_ecg(10.0, fs=250.0, hr=70.0, seed=3, pacing="none")
    assert np.array_equal(a.signal, b.signal) and a.beats.paced is None and "pacing_spikes" not in a.extras
    with pytest.raises(ValueError, match="pacing must be one of"):
        simulate_ecg(10.0, pacing="biventricular")
    pair = simulate_pair(5, pacing="ventricular")
    assert pair["subject"]["ecg"]["pacing"] == "ventricular"


# -- the remover ------------------------------------------------------------------------

@pytest.mark.parametrize("fs", [250.0, 360.0, 500.0, 1000.0])
def test_remover_takes_out_spikes_and_their_afterpotentials(fs):
    x = paced(fs, 2).signal
    clean = paced(fs, 2, spikes=False).signal
    spikes = paced(fs, 2).extras["pacing_spikes"]
    blanker = SpikeBlanker(fs, 2)
    y = run(blanker, x, 97)
    assert blanker.blanked >= 2 * 0.9 * (len(spikes["atrial"]) + len(spikes["ventricular"]))
    n = y.shape[1]
    before, after = [], []
    for t in np.concatenate(list(spikes.values())):
        i = int(t * fs)
        span = slice(max(i - 1, 0), min(i + int(0.04 * fs), n))
        before.append(np.abs(x[:, span] - clean[:, span]).max())
        after.append(np.abs(y[:, span] - clean[:, span]).max())
    assert np.median(before) > 1.0
    assert np.percentile(after, 90) < 0.15, np.percentile(after, 90)  # noise-sized, tail included


@pytest.mark.parametrize("fs", [250.0, 256.0, 360.0, 500.0, 1000.0, 2000.0])
def test_remover_changes_no_sample_of_unpaced_ecg(fs):
    """Narrow QRS, tall R, deep S and Q, premature beats, every lead: nothing is a spike."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        morph = EcgMorphology.sample(rng, qrs=0.06 if seed % 2 else None)
        morph = dataclasses.replace(morph, amp_r=3.0, amp_s=1.0 if seed % 2 else morph.amp_s, amp_q=0.5)
        rec = simulate_ecg(20.0, fs=fs, hr=50.0 + 30 * seed, leads=12, seed=rng, morph=morph, pvc_rate=0.1)
        blanker = SpikeBlanker(fs, 12)
        y = run(blanker, rec.signal, 250)
        assert blanker.blanked == 0
        np.testing.assert_array_equal(y, rec.signal[:, :y.shape[1]])


@pytest.mark.parametrize("fs", [250.0, 500.0])
def test_remover_leaves_very_noisy_unpaced_ecg_alone(fs):
    """Heavy EMG noise (noise=3) makes isolated one- or two-sample outliers of 0.3-0.4 mV;
    none may pass for a spike, and none may start an invented afterpotential."""
    for seed in range(6):
        rec = simulate_ecg(60.0, fs=fs, hr=60.0 + 15 * seed, leads=3, seed=100 + seed, noise=3.0)
        blanker = SpikeBlanker(fs, 3)
        y = blanker.push(rec.signal)
        assert blanker.blanked == 0, seed
        np.testing.assert_array_equal(y, rec.signal[:, :y.shape[1]])


def test_remover_output_does_not_depend_on_chunking_or_backend():
    x = paced(500.0, 4, spike_mv=40.0, tail_ms=50.0).signal
    whole = SpikeBlanker(500.0, 2)
    ref = whole.push(x)
    assert whole.pending == whole.lag == x.shape[1] - ref.shape[1]
    for chunk in (1, 7, 1000):
        np.testing.assert_array_equal(run(SpikeBlanker(500.0, 2), x, chunk), ref)
    np.testing.assert_array_equal(run(SpikeBlanker(500.0, 2, backend="python"), x[:, :4000], 333), ref[:, :4000 - whole.lag])


def test_overlapping_afterpotentials_are_all_followed_in_any_chunking():
    """Six spikes 12 ms apart with 30 ms afterpotentials: six tails pending at once. Fed a
    sample at a time or whole, every tail is subtracted to its end, the same way."""
    fs, n = 1000.0, 3000
    x = sum(30 * spike_train(n, fs, np.array([0.1 + 0.012 * i + 0.0003]), 0.0005, 0.03) for i in range(6))
    x = x[None].astype(np.float32)
    whole = SpikeBlanker(fs, 1)
    ref = whole.push(x)
    assert whole.blanked == 6 and np.abs(ref[0, 60:]).max() < 0.01  # the signal was only spikes and tails
    np.testing.assert_array_equal(run(SpikeBlanker(fs, 1), x, 1), ref)
    np.testing.assert_array_equal(run(SpikeBlanker(fs, 1, backend="python"), x, 1), ref)


@pytest.mark.parametrize("fs", [250.0, 500.0, 1000.0, 2000.0, 4000.0])
def test_remover_catches_pulses_of_every_width_and_phase(fs):
    """Pulses of 0.5-2 ms at every phase against the sample grid (from 1 kHz a pulse spans
    several samples and both its edges may be split in two): each one is removed."""
    missed = []
    for width_ms in (0.5, 1.0, 2.0):
        for phase in np.linspace(0.0, 1.0, 8, endpoint=False):
            x = 20 * spike_train(int(0.4 * fs), fs, np.array([0.1 + phase / fs]), width_ms / 1000, 0.012)
            blanker = SpikeBlanker(fs, 1)
            y = blanker.push(x[None])
            if blanker.blanked != 1 or np.abs(y).max() > 0.05 * np.abs(x).max():
                missed.append((width_ms, phase))
    assert missed == []


def test_remover_is_off_below_its_rate_and_refuses_other_shapes():
    x = paced(200.0, 5).signal
    assert 200.0 < MIN_FS
    blanker = SpikeBlanker(200.0, 2)
    assert blanker.lag == 0
    np.testing.assert_array_equal(blanker.push(x), x)
    with pytest.raises(ValueError, match=r"expected \(2, n\)"):
        SpikeBlanker(250.0, 2).push(x[0])


def test_remover_passes_non_finite_samples_through():
    x = paced(250.0, 6).signal
    x[:, 1000:1010] = np.nan
    x[0, 2000] = np.inf
    y = SpikeBlanker(250.0, 2).push(x)
    assert np.isnan(y[:, 1000:1010]).all() and np.isinf(y[0, 2000])
    assert np.isfinite(y[:, :1000]).all()


# -- detection --------------------------------------------------------------------------

@pytest.mark.parametrize("fs, width_ms, tail_ms", [(250.0, 0.5, 12.0), (250.0, 1.0, 100.0), (500.0, 0.5, 4.0), (500.0, 2.0, 12.0)])
def test_paced_beats_are_found_at_their_r_with_the_remover_and_not_without(fs, width_ms, tail_ms):
    rec = paced(fs, 7, width_ms=width_ms, tail_ms=tail_ms, seconds=40.0)
    lo, hi = 2.5, rec.duration - 0.5
    truth = rec.r_peaks[(rec.r_peaks > lo) & (rec.r_peaks < hi)]
    r, _ = qrs.detect(rec.signal[1], fs)
    r = r / fs
    cleaned = score(truth, r[(r > lo) & (r < hi)], TOL)
    assert cleaned.f1 >= 0.98, cleaned
    matched = np.array([np.min(np.abs(truth - t)) for t in r[(r > lo) & (r < hi)]])
    assert np.percentile(matched, 95) < 0.012
    raw, _ = qrs.detect(rec.signal[1], fs, blank_spikes=False)
    raw = raw / fs
    assert score(truth, raw[(raw > lo) & (raw < hi)], TOL).f1 < 0.9  # what the remover is for


def test_segmenter_counts_the_spikes_it_removes_and_cuts_beats_at_r():
    rec = paced(250.0, 8, seconds=20.0)
    seg = BeatSegmenter(250.0, 2, detect_lead=1)
    beats = []
    for i in range(0, rec.signal.shape[1], 64):
        beats += seg.push(rec.signal[:, i:i + 64], i / 250.0)
    spikes = sum(len(v) for v in rec.extras["pacing_spikes"].values())
    assert seg.spikes_removed >= 2 * 0.9 * spikes
    r = np.array([b.r_time for b in beats])
    # a beat leaves with the next R, so the last R of the recording has no beat yet
    truth = rec.r_peaks[(rec.r_peaks > 2.5) & (rec.r_peaks < rec.r_peaks[-1] - 0.1)]
    assert score(truth, r[r > 2.5], TOL).f1 >= 0.98
    # the windows the generator reads hold no spike: nothing jumps by more than a QRS would
    for b in beats[2:]:
        assert np.abs(np.diff(b.window[1, b.valid])).max() < 0.6


# -- where users meet it ------------------------------------------------------------------

async def test_synthetic_paced_devices_reach_the_session_as_counted_spikes():
    from echopulse.bridges.synthetic import SyntheticSource
    from echopulse.stream.session import EngineLimits, Session

    # bipolar-sized spikes (the default 4 mV) sampled at 1 kHz: 0.6-1 mV on leads I and II
    src = SyntheticSource(devices=1, seed=2, chunk_s=0.2, realtime=False, duration_s=20.0, fs=1000.0, leads=2, pacing="dual")
    session = Session("sim-0", EngineLimits(beat_queue=10_000))
    async for chunk in src:
        session.ingest(chunk)
    truth = np.asarray(src.r_peaks("sim-0"))
    beats = np.array([p.beat.r_time for p in session.take_all()])
    assert session.counters["pacing_spikes_removed"] >= 0.9 * 2 * 2 * len(truth)  # 2 spikes a beat, 2 leads
    assert score(truth[(truth > 2.5) & (truth < truth[-1] - 0.1)], beats[beats > 2.5], TOL).f1 >= 0.98
    with pytest.raises(ValueError, match="pacing must be one of"):
        SyntheticSource(pacing="yes")


def test_simulate_cli_writes_paced_samples(tmp_path):
    import json

    from echopulse.stream.cli import main

    ecg = {}
    for mode in ("none", "dual"):
        out = tmp_path / mode
        assert main(["simulate", "--n", "1", "--seed", "4", "--pacing", mode, "--ecg-fs", "500", "--out", str(out)]) == 0
        index = json.loads((out / "index.json").read_text())
        assert index["args"]["pacing"] == mode
        with np.load(out / index["samples"][0]["file"]) as sample:
            ecg[mode] = sample["ecg"][0]
    # the same subject and rhythm: the paced recording differs by its spikes (and wide QRSs)
    step = np.abs(np.diff(ecg["dual"] - ecg["none"]))
    assert step.max() > 0.3 and np.sum(step > 0.3) >= 2 * 5  # two spikes a beat, 5 s at least


def test_serve_synthetic_url_takes_pacing():
    from echopulse.stream.cli.args import CliError
    from echopulse.stream.cli.serve import make_source

    src = make_source("synthetic://?devices=2&pacing=ventricular")
    assert all(stream.morph.pacing == "ventricular" for stream in src._streams)
    with pytest.raises(CliError, match="pacing must be one of"):
        make_source("synthetic://?pacing=sometimes")


def test_the_remover_can_be_switched_off_per_engine(tmp_path):
    """`remove_pacing_spikes = false` ([limits] of the config file): the raw samples reach
    the detector at once, and the paced beats are then as the raw detector finds them."""
    from echopulse.bridges.chunk import EcgChunk
    from echopulse.stream.config_file import load_config
    from echopulse.stream.session import EngineLimits, Session

    path = tmp_path / "echopulse.toml"
    path.write_text('sources = ["synthetic://?pacing=dual"]\ndata_dir = "data"\n[limits]\nremove_pacing_spikes = false\n')
    limits = EngineLimits(beat_queue=10_000, **load_config(path).limits)
    assert limits.remove_pacing_spikes is False
    rec = paced(250.0, 9, seconds=20.0)
    lead_ii = np.ascontiguousarray(rec.signal[1:2])  # the session detects on its first lead
    counts = {}
    for remove in (True, False):
        session = Session("dev", EngineLimits(beat_queue=10_000, remove_pacing_spikes=remove))
        for i, start in enumerate(range(0, lead_ii.shape[1], 50)):
            session.ingest(EcgChunk("dev", lead_ii[:, start:start + 50], 250.0, start / 250.0, i))
        assert session.segmenter.spike_lag == (6 if remove else 0)
        r = np.array([p.beat.r_time for p in session.take_all()])
        truth = rec.r_peaks[(rec.r_peaks > 2.5) & (rec.r_peaks < rec.r_peaks[-1] - 0.1)]
        counts[remove] = (session.counters["pacing_spikes_removed"], score(truth, r[r > 2.5], TOL).f1)
    assert counts[True][0] > 0 and counts[True][1] >= 0.98
    assert counts[False][0] == 0 and counts[False][1] < 0.9  # R on the spikes, or spikes counted as beats
