"""The Fréchet distance behind FVD: exact on Gaussians we can work out by hand, equal to
the textbook sqrtm formula, and clear about inputs it cannot score."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from echopulse.core.frechet import frechet_distance
from echopulse.core.lv_segmenter import LvSegmenter


def test_same_set_is_zero_and_a_shift_costs_its_square() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([3.0, 0.0, -1.0, 0.0, 2.0])
    assert frechet_distance(a, a + shift) == pytest.approx(14.0, rel=1e-9)


def test_scaled_isotropic_gaussians() -> None:
    # N(0, I) against N(0, 4 I) in d dims: d·(1 + 4 − 2·2) = d
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = 2.0 * rng.normal(size=(20000, 3))
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.05)


def test_matches_the_sqrtm_formula() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(textbook, rel=1e-6)


def test_fewer_samples_than_dimensions_still_scores() -> None:
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(10, 64)), rng.normal(size=(10, 64)))
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize("a, b", [(np.zeros((5, 3)), np.zeros((5, 4))), (np.zeros(5), np.zeros(5)), (np.zeros((1, 3)), np.zeros((4, 3)))])
def test_bad_inputs_raise(a: np.ndarray, b: np.ndarray) -> None:
    with pytest.raises(ValueError):
        frechet_distance(a, b)


def test_segmenter_clip_features_see_motion() -> None:
    seg = LvSegmenter().eval()
    rng = np.random.default_rng(4)
    still = np.repeat(rng.integers(0, 255, (1, 64, 64), dtype=np.uint8), 10, axis=0)
    moving = rng.integers(0, 255, (10, 64, 64), dtype=np.uint8)
    f_still, f_moving = seg.clip_features(still), seg.clip_features(moving)
    assert f_still.shape == f_moving.shape == (2 * 4 * seg.width,)
    half = 4 * seg.width
    assert np.allclose(f_still[half:], 0.0, atol=1e-6) and f_moving[half:].max() > 0  # std over time
