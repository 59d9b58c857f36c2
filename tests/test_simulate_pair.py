"""Paired samples: contract (keys, shapes, beat-locked timing), ground truth that holds up
(EF from the masks, ED at R, ES at T end), determinism, and the beat-driven renderer."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.core.simulate import BeatDrivenEcho, disc_volume, iter_pairs, simulate_pair



@pytest.fixture(scope="module")
def pair64() -> dict:
    return simulate_pair(7, size=64, frames=11)


def test_keys_dtypes_and_shapes(pair64: dict) -> None:
    p = pair64
    assert p["video"].shape == (11, 64, 64) and p["video"].dtype == np.uint8
    assert p["lv_mask"].shape == (11, 64, 64) and p["lv_mask"].dtype == np.bool_
    assert p["ecg"].dtype == np.float32 and p["ecg"].shape == (1, int(round(10.0 * p["ecg_fs"])))
    assert p["video_t"].shape == (11,) and p["lv_volume"].shape == (11,)
    assert 0 < p["ef"] < 100 and p["edv"] > p["esv"] > 0
    assert p["r_peaks"].min() >= 0 and p["r_peaks"].max() < p["ecg"].shape[1] / p["ecg_fs"]
    # The echo is an image, not blank: bright tissue, dark blood, black outside the sector.
    v = p["video"][1]
    assert v.max() > 200 and v[0, 0] == 0
    mask = p["lv_mask"][1]
    assert np.median(v[mask]) < np.median(v[~mask & (v > 0)])


def test_beat_locked_timing_contract(pair64: dict) -> None:
    p = pair64
    r, t = p["r_peaks"], p["video_t"]
    k = p["beat"]
    f = 10
    assert k >= 1
    np.testing.assert_allclose(t[1:], r[k] + np.arange(f) * (r[k + 1] - r[k]) / f)
    np.testing.assert_allclose(t[0], r[k - 1] + (f - 1) * (r[k] - r[k - 1]) / f)
    # ECG context on both sides of the clip.
    assert t[0] > 1.0 and t[-1] < p["ecg"].shape[1] / p["ecg_fs"] - 1.0
    assert list(p["ed"]) == [1]


@pytest.mark.parametrize(
    "seed,ef,size,view",
    [(1, 15.0, 64, "a4c"), (2, 30.0, 64, "a4c"), (3, 62.0, 64, "a4c"), (6, 40.0, 64, "a2c"), (4, 45.0, 128, "a4c"), (5, 75.0, 128, "a2c")],
)
def test_ef_from_masks_matches_subject_ef(seed: int, ef: float, size: int, view: str) -> None:
    # A fast clip over more than a beat catches the true ED and ES volumes.
    fps = 100.0 if size == 64 else 60.0
    p = simulate_pair(seed, size=size, fps=fps, frames=int(1.4 * fps), ef=ef, hr=70.0, view=view)
    vols = np.array([disc_volume(m, p["pixel_cm"]) for m in p["lv_mask"]])
    ef_masks = 100.0 * (vols.max() - vols.min()) / vols.max()
    assert abs(ef_masks - p["ef"]) <= 2.0, (ef_masks, p["ef"])
    # The masks' volumes are real millilitres too.
    assert abs(vols.max() / p["edv"] - 1.0) < 0.05


@pytest.mark.parametrize("hr", [55.0, 80.0, 120.0])
def test_ed_at_r_and_es_at_t_end_in_fixed_rate_clips(hr: float) -> None:
    p = simulate_pair(11, size=64, fps=30.0, frames=100, hr=hr, ef=50.0)
    t, vol = p["video_t"], p["lv_volume"]
    dt = t[1] - t[0]
    r = p["r_peaks"][(p["r_peaks"] > t[0] + 0.2) & (p["r_peaks"] < t[-1] - 0.5)]
    assert len(r) >= 2
    for rk in r:
        nxt = p["t_end"][np.searchsorted(p["t_end"], rk)]
        cycle = (t >= rk - 0.45 * 60 / hr) & (t <= rk + 0.55 * 60 / hr)
        ed = np.flatnonzero(cycle)[np.argmax(vol[cycle])]
        # End-diastole is the largest mask volume; ties across the isovolumic plateau are
        # broken towards R by taking the frame nearest R among the near-maximal ones.
        near_max = np.flatnonzero(cycle & (vol >= vol[ed] - 1.0))
        ed = near_max[np.argmin(np.abs(t[near_max] - rk))]
        assert abs(t[ed] - rk) <= dt + 1e-9
        sys_win = (t > rk) & (t < rk + 60 / hr)
        es = np.flatnonzero(sys_win)[np.argmin(vol[sys_win])]
        assert abs(t[es] - nxt) <= dt + 1e-9
    # The sample's own ED/ES indices agree with the ECG: each is one of the two frames
    # either side of an R / T end (the one showing the largest / smallest LV).
    assert all(np.min(np.abs(t[i] - p["r_peaks"])) <= dt + 1e-9 for i in p["ed"])
    assert all(np.min(np.abs(t[i] - p["t_end"])) <= dt + 1e-9 for i in p["es"])


@pytest.mark.parametrize("seed,hr", [(21, 50.0), (22, 75.0), (23, 110.0), (24, 150.0)])
def test_beat_locked_ed_at_r_and_es_at_t_end(seed: int, hr: float) -> None:
    p = simulate_pair(seed, size=64, frames=11, hr=hr)
    t, vol, k = p["video_t"], p["lv_volume"], p["beat"]
    dt = (p["r_peaks"][k + 1] - p["r_peaks"][k]) / 10
    # Largest and smallest LV by the masks, against the ECG's own R and T end.
    assert abs(t[int(np.argmax(vol))] - p["r_peaks"][k]) <= dt + 1e-9
    assert abs(t[int(np.argmin(vol))] - p["t_end"][k]) <= dt + 1e-9
    assert abs(t[int(p["es"][0])] - p["t_end"][k]) <= dt + 1e-9
    v = p["lv_volume_true"]
    assert v[int(p["es"][0])] <= v.min() + 0.01 * (p["edv"] - p["esv"]) + 1e-3  # the smallest LV, to 1 % of SV


def test_same_seed_same_sample_and_different_seeds_differ() -> None:
    a = simulate_pair(42, size=64)
    b = simulate_pair(42, size=64)
    c = simulate_pair(43, size=64)
    for key in ("video", "lv_mask", "ecg", "video_t", "r_peaks", "lv_volume"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["ef"] == b["ef"]
    assert not np.array_equal(a["video"], c["video"])
    assert not np.array_equal(a["ecg"], c["ecg"]) and a["ef"] != c["ef"]


def test_views_leads_and_rates() -> None:
    p = simulate_pair(3, size=128, view="a2c", leads=12, ecg_fs=500.0, ef=35.0, hr=95.0)
    assert p["video"].shape == (11, 128, 128) and p["ecg"].shape == (12, 5000)
    assert p["ef"] == 35.0 and p["hr"] == 95.0
    q = simulate_pair(3, size=64, fps=25.0, frames=40)
    assert q["video"].shape[0] == 40
    np.testing.assert_allclose(np.diff(q["video_t"]), 1 / 25.0)


@pytest.mark.parametrize("kwargs", [{"size": 96}, {"view": "plax"}, {"ef": 2.0}, {"hr": 250.0}, {"frames": 2}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        simulate_pair(0, **kwargs)


def test_iter_pairs_with_workers_matches_in_process() -> None:
    seq = list(iter_pairs(100, 3, workers=1, size=64))
    par = list(iter_pairs(100, 3, workers=2, size=64))
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a["video"], b["video"])


@pytest.mark.parametrize("seed", [3, 14])  # no sinus beat with sinus neighbours in their first 10 s of ECG
def test_frequent_ectopy_records_longer_until_a_sinus_beat_fits(seed: int) -> None:
    sample = simulate_pair(seed, pvc_rate=0.5)  # the CLI's upper limit: once RuntimeError after writing some files
    k = sample["beat"]
    assert sample["video"].shape == (11, 64, 64) and sample["ecg"].shape[1] > 10 * 250
    assert (sample["beat_kind"][k - 1 : k + 2] == 0).all()


@pytest.mark.parametrize("rr", [2.5, 0.25])  # 24 and 240 bpm: past the rates the heart model holds
def test_beat_driven_frames_tile_time_at_any_rate(rr: float) -> None:
    sim = BeatDrivenEcho(seed=5, size=64, frames_per_beat=10)
    beats = [sim.render_beat(10.0 + k * rr, rr) for k in range(3)]
    times = np.concatenate([t for _, t in beats])
    steps = np.diff(times)  # once a 0.7 s hole before each R at 24 bpm, time going back at 240 bpm
    np.testing.assert_allclose(steps, rr / 10)
    assert all(f.shape == (10, 64, 64) for f, _ in beats)


def test_beat_driven_renderer_is_continuous_across_beats() -> None:
    sim = BeatDrivenEcho(seed=5, size=64, frames_per_beat=10)
    f1, t1 = sim.render_beat(10.0, 0.8)
    f2, t2 = sim.render_beat(10.8, 0.82)
    assert f1.shape == (10, 64, 64) and f1.dtype == np.uint8
    np.testing.assert_allclose(t1, 10.0 + np.arange(10) * 0.08)
    np.testing.assert_allclose(t2[0], 10.8)
    # Same anatomy: the seam (last of beat 1 → first of beat 2) changes no more than a step
    # inside a beat does, and far less than another subject would. Compared on 4×4 block
    # means, so per-frame electronic noise does not drown the anatomy.
    def diff(a: np.ndarray, b: np.ndarray) -> float:
        blocks = lambda x: x.astype(float).reshape(16, 4, 16, 4).mean(axis=(1, 3))  # noqa: E731
        return float(np.mean(np.abs(blocks(a) - blocks(b))))

    seam = diff(f1[-1], f2[0])
    inside = max(diff(f1[i], f1[i + 1]) for i in range(9))
    other = diff(f2[0], BeatDrivenEcho(seed=6, size=64).render_beat(10.8, 0.82)[0][0])
    assert seam <= inside + 1.0
    assert seam < 0.5 * other
    again = BeatDrivenEcho(seed=5, size=64, frames_per_beat=10).render_beat(10.0, 0.8)[0]
    np.testing.assert_array_equal(again, f1)
