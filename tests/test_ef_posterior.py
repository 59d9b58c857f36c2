"""The one-frame EF floor: the exact posterior mirrors the simulator, and no fitted guess beats it."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.core.simulate.ef_posterior import EF_GRID, ONE_FRAME_VISIBLE, best_one_frame_guess, ef_posterior, one_frame_ef_floor
from echopulse.core.simulate.subject import sample_subject


def test_every_simulated_subject_lies_inside_the_posterior_s_model() -> None:
    """If `sample_subject` changed a range the posterior does not know, some subject would
    get zero likelihood (a ValueError) or a posterior that misses its own EF."""
    for seed in range(400):
        subject = sample_subject(seed)
        weights = ef_posterior(subject)
        assert weights.sum() == pytest.approx(1.0)
        near = np.abs(EF_GRID - subject.ef) < 2.0
        assert weights[near].sum() > 0, (seed, subject.ef)
    for ef in (15.0, 39.9, 52.0, 74.9):
        ef_posterior(sample_subject(7, ef=ef))  # the prior's edges


def test_above_the_remodelling_threshold_the_frame_says_nothing_of_the_ef() -> None:
    """Same seed, EF 60 or 72: every other draw is the same and nothing remodels, so the
    one-frame guess is the same; below 55 % the EF shows."""
    assert best_one_frame_guess(sample_subject(11, ef=60.0)) == best_one_frame_guess(sample_subject(11, ef=72.0))
    assert best_one_frame_guess(sample_subject(11, ef=20.0)) < best_one_frame_guess(sample_subject(11, ef=45.0))


def _features(subjects) -> np.ndarray:
    return np.array([[getattr(x, f) for f in ONE_FRAME_VISIBLE] for x in subjects])


@pytest.mark.slow
def test_no_fitted_guess_beats_the_posterior_median() -> None:
    """A k-nearest-neighbour median fitted on 20,000 simulated subjects, on the same
    features, errs more on held-out subjects than the exact posterior median."""
    train = [sample_subject(seed) for seed in range(50_000, 70_000)]
    test = [sample_subject(seed) for seed in range(90_000, 90_600)]
    a, q = _features(train), _features(test)
    mu, sd = a.mean(0), a.std(0)
    a, q = (a - mu) / sd, (q - mu) / sd
    ef = np.array([x.ef for x in train])
    nearest = np.argpartition(((q[:, None] - a[None]) ** 2).sum(-1), 50, axis=1)[:, :50]
    knn = np.median(ef[nearest], axis=1)
    truth = np.array([x.ef for x in test])
    exact = np.array([best_one_frame_guess(x) for x in test])
    assert np.abs(exact - truth).mean() < np.abs(knn - truth).mean()
    assert np.abs(exact - truth).mean() < np.abs(np.median(ef) - truth).mean() / 2


def test_floor_report_scores_a_reference_and_measurement_errors() -> None:
    seeds = range(200, 230)
    plain = one_frame_ef_floor(seeds)
    truth = [sample_subject(s).ef for s in seeds]
    same = one_frame_ef_floor(seeds, truth, measurement_errors=[0.0])
    assert same["mae_vs_reference"] == pytest.approx(plain["mae_vs_simulator"])
    assert same["mae_vs_reference_measured"] == pytest.approx(plain["mae_vs_simulator"])
    noisy = one_frame_ef_floor(seeds, truth, measurement_errors=[-6.0, 6.0, float("nan")])
    assert noisy["mae_vs_reference_measured"] > plain["mae_vs_simulator"]
    assert 0.0 < plain["share_without_remodelling"] < 1.0 and plain["subjects"] == 30


def test_floor_report_without_any_measured_reference_scores_the_simulator_only() -> None:
    result = one_frame_ef_floor(range(3), [float("nan")] * 3, measurement_errors=[1.0])
    assert "mae_vs_reference" not in result and result["subjects"] == 3


def test_sampler_floor_is_the_expected_error_of_a_posterior_draw() -> None:
    seeds = range(300, 340)
    report = one_frame_ef_floor(seeds)
    rng = np.random.default_rng(0)
    drawn = []
    for seed in seeds:
        subject = sample_subject(seed)
        draws = rng.choice(EF_GRID, size=4000, p=ef_posterior(subject))
        drawn.append(np.abs(draws - subject.ef).mean())
    assert report["draw_mae_vs_simulator"] == pytest.approx(np.mean(drawn), rel=0.03)
    # a draw strays further than the median, which minimises the expected absolute error
    assert report["draw_mae_vs_simulator"] > 1.15 * report["mae_vs_simulator"]


def test_sampler_floor_scores_a_reference_and_measurement_errors() -> None:
    seeds = range(200, 230)
    truth = [sample_subject(s).ef for s in seeds]
    plain = one_frame_ef_floor(seeds)
    same = one_frame_ef_floor(seeds, truth, measurement_errors=[0.0])
    assert same["draw_mae_vs_reference"] == pytest.approx(plain["draw_mae_vs_simulator"])
    assert same["draw_mae_vs_reference_measured"] == pytest.approx(plain["draw_mae_vs_simulator"])
    noisy = one_frame_ef_floor(seeds, truth, measurement_errors=[-6.0, 6.0])
    assert noisy["draw_mae_vs_reference_measured"] > plain["draw_mae_vs_simulator"]
