"""`evaluate_generator` runs end to end on an untrained generator (numbers meaningless,
structure checked): both priming modes, EF regression, ED/ES, HR tracking."""
from __future__ import annotations

import math

import numpy as np
import pytest

from echopulse.core.config import EcgEncoderConfig, Preset, TokenizerConfig, TransformerConfig
from echopulse.core.evaluate_generator import (_ef, _regression, cycle_ed_time, ed_periods_within_one_frame, evaluate_generator,
                                              subject_figure)
from echopulse.core.generator import Generator
from echopulse.core.lv_segmenter import LvSegmenter, dice


@pytest.mark.slow
def test_evaluation_runs_on_simulated_subjects(tmp_path) -> None:
    preset = Preset(
        name="eval-test",
        tokenizer=TokenizerConfig(dim=32, spatial_depth=1, temporal_depth=1, heads=2, dim_head=16, lfq_bits=6),
        ecg=EcgEncoderConfig(dim=32, depth=1, heads=2, dim_head=16),
        transformer=TransformerConfig(dim=32, depth=1, heads=2, dim_head=16, steps=2),
    )
    gen = Generator.untrained(preset, device="cpu")
    result = evaluate_generator(gen, LvSegmenter().eval(), [1_000_000, 1_000_001])
    summary = result["summary"]
    assert summary["n"] == 2 and len(result["subjects"]) == 2
    for mode in ("image", "loop"):
        assert -1.0 <= summary[mode]["ssim"] <= 1.0
        assert set(summary[mode]["ef_vs_true_video"]) == {"mae", "rmse", "r2", "n"}
    assert summary["ef_best_constant_mae"] >= 0
    assert set(summary["tokenizer_roundtrip_ef_vs_true_video"]) == {"mae", "rmse", "r2", "n"}
    floor = summary["one_frame_ef_floor"]
    assert floor["these_subjects"]["subjects"] == 2 and floor["population"]["subjects"] > 100
    assert {"mae_vs_simulator", "mae_vs_reference"} <= set(floor["these_subjects"])
    fvd = summary["fvd"]
    assert all(np.isfinite(fvd[k]) and fvd[k] >= -1e-6 for k in ("image", "loop", "other_beat", "tokenizer_roundtrip", "static_prime"))
    tracking = summary["hr_tracking"]
    assert len(tracking["subjects"]) == 2 and 0.0 <= tracking["follows_within_one_beat"] <= 1.0
    hr = tracking["subjects"][0]
    assert hr["seed"] == 1_000_000 and len(hr["rr"]) == 8 and np.mean(hr["rr"][:4]) > 1.5 * np.mean(hr["rr"][4:])  # 60 -> 120 bpm
    assert len(hr["periods"]) == 7
    subject_figure(gen, LvSegmenter().eval(), 1_000_000, tmp_path / "beat.png")
    assert (tmp_path / "beat.png").stat().st_size > 1000


def test_metric_helpers() -> None:
    assert _ef(np.array([100.0, 40.0, 70.0])) == pytest.approx(60.0)
    reg = _regression(np.array([50.0, 60.0, 70.0]), np.array([52.0, 58.0, 70.0]))
    assert reg["mae"] == pytest.approx(4 / 3) and reg["r2"] > 0.9
    assert math.isnan(_regression(np.array([1.0]), np.array([1.0]))["mae"])
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0


def test_ed_periods_allow_one_frame_of_either_beat() -> None:
    frames = 10
    rrs = np.array([1.0, 1.0, 0.5, 0.5, 0.48])
    starts = np.concatenate([[0.0], np.cumsum(rrs[:-1])])
    ed_frame = np.array([0, 1, 1, 1, 0])  # ED one frame late in beats 1-3, on time in beat 4
    periods, ok = ed_periods_within_one_frame(starts + ed_frame * rrs / frames, rrs, frames)
    assert np.allclose(periods, [1.1, 0.95, 0.5, 0.45])
    # beat 3 -> 4: ED moves back one frame of beat 3 (0.05 s), longer than a frame of beat 4 (0.048 s)
    assert ok.tolist() == [True, True, True, True]
    late = starts + np.array([0, 2, 1, 1, 0]) * rrs / frames  # two frames late in beat 1: a missed step
    assert ed_periods_within_one_frame(late, rrs, frames)[1].tolist() == [False, False, True, True]


def test_an_ed_on_the_last_frame_is_the_next_cycle_come_a_frame_early() -> None:
    """A heart that follows the ECG but shows its largest LV on a 120-bpm beat's last frame,
    one frame before the next R: once two periods a whole beat off, a missed cycle."""
    frames, rrs = 10, np.array([1.0, 1.0, 0.5, 0.5, 0.5])
    starts = np.concatenate([[0.0], np.cumsum(rrs[:-1])])
    ed_frame = [1, 1, 1, 10, 1]  # frames 1..10 at R + (i - 1) rr / 10
    curves = [np.eye(frames)[f - 1] for f in ed_frame]
    eds = [cycle_ed_time(r + np.arange(frames) * rr / frames, v, r, rr) for r, rr, v in zip(starts, rrs, curves)]
    assert eds[3] == pytest.approx(starts[3] - 0.05)  # a frame before its own R, not nine after
    assert ed_periods_within_one_frame(np.array(eds), rrs, frames)[1].all()
    # a largest LV mid-beat is still a missed step
    mid = cycle_ed_time(starts[3] + np.arange(frames) * 0.05, np.eye(frames)[4], starts[3], 0.5)
    assert not ed_periods_within_one_frame(np.array([*eds[:3], mid, eds[4]]), rrs, frames)[1].all()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_evaluate_cli_refuses_a_device_it_does_not_have(capsys) -> None:
    from echopulse.stream.cli import main

    try:
        rc = main(["evaluate", "generator", "--n", "1", "--device", "cuda"])
    except SystemExit as exit_:
        rc = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "CUDA" in err[0]
