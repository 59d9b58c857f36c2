"""Review of `core/evaluate_generator.py`'s summary: ED/ES timing across the beat's edge,
and held-out seeds only."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from echopulse.core import evaluate_generator as ev


def _record(seed: int, ed: int, es: int) -> dict[str, Any]:
    scores = {"ssim": 0.5, "ef": 50.0, "ed": ed, "es": es}
    return {"seed": seed, "ef_sim": 50.0, "ef_true_video": 50.0 + seed % 3, "hr": 70.0, "ed_true": 1, "es_true": 5,
            "ef_tokenizer_roundtrip": 50.0, "image": dict(scores), "loop": dict(scores)}


@pytest.fixture
def scored(monkeypatch):
    """`evaluate_generator` over canned subject records (ED frames by seed), nothing simulated."""
    def run(ed_by_seed: dict[int, int], es_by_seed: dict[int, int] | None = None) -> dict[str, Any]:
        es_by_seed = es_by_seed or {}
        monkeypatch.setattr(ev, "_score_subject", lambda gen, seg, seed, leads: (_record(seed, ed_by_seed[seed], es_by_seed.get(seed, 5)), {}))
        monkeypatch.setattr(ev, "fvd_summary", lambda features: {})
        monkeypatch.setattr(ev, "one_frame_ef_floor", lambda *a, **k: {})
        monkeypatch.setattr(ev, "hr_tracking_summary", lambda *a, **k: {})
        return ev.evaluate_generator(SimpleNamespace(frames_per_beat=10), None, list(ed_by_seed))["summary"]
    return run


def test_ed_one_frame_before_the_next_r_is_within_one_frame(scored) -> None:
    """Frames 1..10 of a beat sit at R + (i-1)·RR/10: frame 10 is one frame before the next
    R, as far from an R peak as frame 2 is. An ED dated one frame early must count like one
    dated one frame late; frame 9 (two frames early) and frame 3 (two late) must not."""
    summary = scored({0: 10, 1: 9, 2: 2, 3: 1, 4: 3})
    assert summary["image"]["ed_within_1_frame"] == pytest.approx(3 / 5)
    assert summary["loop"]["ed_within_1_frame"] == pytest.approx(3 / 5)


def test_es_timing_is_unchanged_inside_the_beat(scored) -> None:
    summary = scored({0: 1, 1: 1, 2: 1, 3: 1}, {0: 4, 1: 6, 2: 7, 3: 3})
    assert summary["image"]["es_within_1_frame"] == pytest.approx(2 / 4)


def test_no_seeds_is_an_error_not_a_training_subject() -> None:
    """With no seeds, HR tracking used to fall back to seed 0, a training subject."""
    with pytest.raises(ValueError, match="seed"):
        ev.evaluate_generator(SimpleNamespace(frames_per_beat=10), None, [])


def test_frame_distance_wraps_around_the_beat() -> None:
    assert ev.frame_distance(10, 1, 10) == 1 and ev.frame_distance(1, 10, 10) == 1
    assert ev.frame_distance(9, 1, 10) == 2 and ev.frame_distance(3, 1, 10) == 2
    assert ev.frame_distance(5, 5, 10) == 0 and ev.frame_distance(6, 1, 10) == 5
    assert np.isnan(ev.frame_distance(3, -1, 10))
