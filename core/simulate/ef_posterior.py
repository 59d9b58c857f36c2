"""What one end-diastolic frame and the ECG can tell of the EF: the exact posterior.

One-frame priming hands the generator an ED frame and the beat's ECG. In the simulator a
subject's EF reaches those only through remodelling (`subject.py`). A reduced EF:

- dilates the ventricle and enlarges the atrium;
- thins the walls and rounds the cavity;
- deepens the image;
- widens the QRS and quickens the heart.

Above EF 55 % none of these changes at all.

Read those seven quantities exactly, with no image noise, and the posterior over EF
follows from the sampler's own distributions. Its median is the EF guess with the
smallest mean absolute error that any method can make from one frame. Its error is the
floor under the one-frame EF figure of `evaluate generator`.

A generator does not guess the median: it samples a plausible heart. The best sampler
draws its EF from this posterior, and a draw strays from the truth more than the median
does (for a Gaussian posterior, √2 times as far on average). `one_frame_ef_floor`
reports that sampler's floor beside the median's.

Caveat: the prime `evaluate generator` gives is frame 0, one frame before R in late
diastole, not the ED frame. Its volume is affine in (EDV, ESV) with weights set by the
beat's timing, which the ECG shows, so V0/EDV (0.80-0.98) falls with EF (correlation
-0.83 over 150 test subjects), above 55 % too. The frame's geometry carries that ratio
(walls thickened to keep their cross-section, atria sized by the ED width), so these
figures are the floor of a reader of ED anatomy, not a proven bound on every one-frame
method.

The likelihoods mirror `sample_subject` through the constants that module names;
tests/test_ef_posterior.py checks that every simulated subject lies inside them and that
no fitted guess beats this one.
"""
from __future__ import annotations

from math import sqrt
from typing import Any, Sequence

import numpy as np
from scipy.special import ndtr

from . import subject as s
from .subject import Subject, sample_subject, sickness

ONE_FRAME_VISIBLE = ("edv", "hr", "qrs", "wall", "sphericity", "depth", "la_scale")
EF_GRID = np.arange(s.EF_CLASSES[2][1], s.EF_CLASSES[0][2], 0.05) + 0.025  # midpoints over the prior's support
_NODES = 48                                                                   # midpoint rule over the hidden draws
_SICK = sickness(EF_GRID)


def _midpoints(low: float, high: float) -> np.ndarray:
    return low + (np.arange(_NODES) + 0.5) * (high - low) / _NODES


def _prior() -> np.ndarray:
    density = np.zeros_like(EF_GRID)
    for weight, low, high in s.EF_CLASSES:
        density += np.where((EF_GRID >= low) & (EF_GRID < high), weight / (high - low), 0.0)
    return density


_PRIOR = _prior()


def _uniform(x: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.where((x >= low) & (x <= high), 1.0 / (high - low), 0.0)


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / sqrt(2.0 * np.pi)


def _clipped_normal(x: float, mean: np.ndarray, sd: float, clip: tuple[float, float]) -> np.ndarray:
    """Density of clip(N(mean, sd)) at x; at a clip edge, the probability mass piled there."""
    if x <= clip[0]:
        return ndtr((clip[0] - mean) / sd)
    if x >= clip[1]:
        return 1.0 - ndtr((clip[1] - mean) / sd)
    return _normal_pdf((x - mean) / sd) / sd


def _edv_likelihood(edv: float) -> np.ndarray:
    """EDV = body × base × (1 + sick^p × dilation), each factor uniform: the product of the
    first two has a closed-form density, the dilation is integrated numerically."""
    (b0, b1), (a0, a1) = s.BODY, s.EDV_BASE
    scale = 1.0 + _SICK[:, None] ** s.DILATION_POWER * _midpoints(*s.DILATION)[None, :]
    y = edv / scale                                  # body × base
    low, high = np.maximum(b0, y / a1), np.minimum(b1, y / a0)
    product = np.where(high > low, np.log(np.maximum(high, 1e-12) / np.maximum(low, 1e-12)), 0.0) / ((b1 - b0) * (a1 - a0))
    return (product / scale).mean(axis=1)


def _qrs_likelihood(qrs: float) -> np.ndarray:
    mean = s.QRS_BASE + s.QRS_PER_SICK * _SICK[:, None] * _midpoints(*s.QRS_SPREAD)[None, :]
    return _clipped_normal(qrs, mean, s.QRS_SD, s.QRS_CLIP).mean(axis=1)


def ef_posterior(subject: Subject) -> np.ndarray:
    """Posterior weights over `EF_GRID` (summing to 1) given what one ED frame and the ECG show."""
    sick = _SICK
    wall_scale, la_scale = 1.0 - s.WALL_THINNING * sick, 1.0 + s.LA_PER_SICK * sick
    likelihood = (
        _PRIOR
        * _edv_likelihood(subject.edv)
        * _clipped_normal(subject.hr, s.HR_MEAN + s.HR_PER_SICK * sick, s.HR_SD, s.HR_CLIP)
        * _qrs_likelihood(subject.qrs)
        * _uniform(subject.wall, s.WALL[0] * wall_scale, s.WALL[1] * wall_scale)
        * _uniform(subject.sphericity, s.SPHERICITY[0] + s.SPHERICITY_PER_SICK * sick, s.SPHERICITY[1] + s.SPHERICITY_PER_SICK * sick)
        * _uniform(subject.depth, s.DEPTH[0] + s.DEPTH_PER_SICK * sick, s.DEPTH[1] + s.DEPTH_PER_SICK * sick)
        * _uniform(subject.la_scale, s.LA[0] * la_scale, s.LA[1] * la_scale)
    )
    total = likelihood.sum()
    if not total > 0:
        raise ValueError(f"subject {subject.seed} lies outside the simulator's distributions")
    return likelihood / total


def best_one_frame_guess(subject: Subject) -> float:
    """The posterior median: the EF guess with the least expected absolute error."""
    return float(_medians(ef_posterior(subject)[None])[0])


def _medians(posteriors: np.ndarray) -> np.ndarray:
    """(n, grid) posterior weights -> (n,) their medians on `EF_GRID`."""
    return EF_GRID[np.argmax(np.cumsum(posteriors, axis=1) >= 0.5, axis=1)]


def one_frame_ef_floor(
    seeds: Sequence[int], reference: Sequence[float] | None = None, measurement_errors: Sequence[float] | None = None
) -> dict[str, Any]:
    """The best one-frame guess's MAE for these subjects.

    Always against the simulator's EF. With `reference` (the EF measured on each true
    video, as the evaluation scores), against that too. With `measurement_errors` (how
    far a measurement of a rendered video strays, e.g. the tokenizer round trip's EF
    minus the true video's, one per subject), also the MAE if each guess were rendered
    and measured with those errors: every guess meets every error, assumed independent.

    The `draw_` keys score the best sampler instead of the best guess: each subject's EF
    drawn from its posterior, the expected absolute error computed exactly."""
    subjects = [sample_subject(int(seed)) for seed in seeds]
    posteriors = np.stack([ef_posterior(subj) for subj in subjects]) if subjects else np.zeros((0, len(EF_GRID)))
    guesses = _medians(posteriors)
    truth = np.array([subj.ef for subj in subjects])
    result: dict[str, Any] = {
        "subjects": len(subjects),
        "mae_vs_simulator": float(np.abs(guesses - truth).mean()),
        "draw_mae_vs_simulator": float(_draw_errors(posteriors, truth).mean()),
        "share_without_remodelling": float(np.mean(truth >= s.SICK_EF_NORMAL)),
        "visible": list(ONE_FRAME_VISIBLE),
    }
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        known = np.isfinite(ref)
        if not known.any():  # no measured reference (e.g. an untrained segmenter): nothing to score
            return result
        result["mae_vs_reference"] = float(np.abs(guesses[known] - ref[known]).mean())
        result["draw_mae_vs_reference"] = float(_draw_errors(posteriors[known], ref[known]).mean())
        if measurement_errors is not None:
            errors = np.asarray(measurement_errors, dtype=float)
            errors = errors[np.isfinite(errors)]
            if len(errors):
                spread = guesses[known][:, None] + errors[None, :] - ref[known][:, None]
                result["mae_vs_reference_measured"] = float(np.abs(spread).mean())
                result["draw_mae_vs_reference_measured"] = float(
                    np.mean([_draw_errors(posteriors[known], ref[known] - e).mean() for e in errors])
                )
    return result


def _draw_errors(posteriors: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per subject, E|X − target| for X drawn from its posterior over `EF_GRID`."""
    return (posteriors * np.abs(EF_GRID[None, :] - targets[:, None])).sum(axis=1)
