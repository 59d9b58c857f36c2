"""`echopulse reference`: a loop's EF, its end-diastole and what looks wrong, before it primes a device."""
from __future__ import annotations

import json

import numpy as np
import pytest

from echopulse.core.generator import DEFAULT_WEIGHTS
from echopulse.core.lv_segmenter import load_segmenter
from echopulse.core.reference_check import check_loop
from echopulse.core.simulate.paired import simulate_pair
from echopulse.stream.cli import main


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter(DEFAULT_WEIGHTS)


def one_cycle(seed: int, ef: float, fps: float = 30.0) -> tuple[np.ndarray, float]:
    """One R-to-R cycle of a simulated patient's echo, end-diastole (R) first, and its EF."""
    sample = simulate_pair(seed=seed, size=64, frames=int(3 * fps), fps=fps, ef=ef)
    t, r = sample["video_t"], sample["r_peaks"]
    r0 = r[r >= t[0]][0]
    r1 = r[r > r0][0]
    return sample["video"][(t >= r0 - 1e-9) & (t < r1 - 1e-9)], float(sample["ef"])


@pytest.mark.parametrize("seed, ef", [(5, 30.0), (9, 65.0), (2, 45.0)])
def test_a_good_loop_passes_with_its_ef(segmenter, seed, ef):
    frames, true_ef = one_cycle(seed, ef)
    check = check_loop(frames, segmenter)
    assert check.warnings == [] and check.frames_without_lv == 0
    assert abs(check.ef - true_ef) < 8  # the shipped segmenter on simulated echo: within a few points
    assert min(check.ed_frame, len(frames) - check.ed_frame) <= 0.15 * len(frames)
    assert 0.2 * len(frames) < check.es_frame < 0.7 * len(frames)  # systole in the first part of the cycle


def test_a_cycle_that_starts_mid_beat_gets_the_shift_that_fixes_it(segmenter):
    frames, _ = one_cycle(9, 65.0)
    rolled = np.roll(frames, 8, axis=0)  # starts 8 frames before end-diastole
    check = check_loop(rolled, segmenter)
    assert len(check.warnings) == 1 and "not at the first" in check.warnings[0]
    assert check.ed_frame in range(6, 10)  # this heart's largest LV sits at R or a frame before it
    assert f"move A and B {check.ed_frame} frames later" in check.warnings[0]
    late = check_loop(np.roll(frames, -7, axis=0), segmenter)  # starts 7 frames after end-diastole
    assert f"move A and B {late.frames - late.ed_frame} frames earlier" in late.warnings[0]


@pytest.mark.parametrize("spoil, words", [
    (lambda v: np.repeat(v[:1], len(v), axis=0), "hardly changes"),
    (lambda v: v[np.random.default_rng(1).permutation(len(v))], "jumps from frame to frame"),
    (lambda v: np.ascontiguousarray(v[:, ::-1]), "no left ventricle found"),  # apex at the bottom
    (lambda v: np.random.default_rng(0).integers(0, 255, v.shape, dtype=np.uint8), "no left ventricle found"),
])
def test_loops_the_model_cannot_use_are_named(segmenter, spoil, words):
    frames, _ = one_cycle(9, 65.0)
    check = check_loop(spoil(frames), segmenter)
    assert len(check.warnings) == 1 and words in check.warnings[0]


def test_the_command_prints_writes_json_and_draws(tmp_path, capsys):
    sample = simulate_pair(seed=5, size=64, frames=90, fps=30.0, ef=30.0)
    np.savez(tmp_path / "echo.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    argv = ["reference", str(tmp_path / "echo.npz"), "--json", str(tmp_path / "c.json"), "--png", str(tmp_path / "c.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "R-to-R cycle" in out and "EF " in out and "warning" not in out
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["warnings"] == [] and report["size"] == 64 and report["fps"] == pytest.approx(30.0)
    assert len(report["lv_area"]) == report["frames"] and abs(report["ef"] - sample["ef"]) < 8
    from PIL import Image

    with Image.open(tmp_path / "c.png") as png:
        assert png.width == 960 and png.height > 96 * (report["frames"] // 10)


@pytest.mark.parametrize("argv, words", [
    (["reference", "{tmp}/none.dcm"], "none.dcm: no such file"),
    (["reference", "{tmp}/echo.npy?frames=3:1"], "outside the file's"),
    (["reference", "{tmp}/echo.npy", "--png", "{tmp}/no/dir/x.png"], "--png: folder"),
])
def test_unusable_input_is_one_line_and_status_2(tmp_path, capsys, argv, words):
    np.save(tmp_path / "echo.npy", one_cycle(9, 65.0)[0])
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
