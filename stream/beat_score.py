"""Scoring beat detections against reference R peaks (tests and benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom

    def __add__(self, other: "Score") -> "Score":
        return Score(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def score(truth: np.ndarray, found: np.ndarray, tol: float, ignore: np.ndarray | None = None) -> Score:
    """Match detections to reference peaks one to one within `tol` (same units).

    Detections within `tol` of an `ignore` peak (one the references disagree on) count
    neither way. Assumes peaks are more than 2·tol apart, which a refractory period of
    200 ms and a tolerance of 50 ms guarantee.
    """
    truth = np.sort(np.asarray(truth, dtype=np.float64))
    found = np.sort(np.asarray(found, dtype=np.float64))
    if ignore is not None and len(ignore) and len(found):
        ignore = np.sort(np.asarray(ignore, dtype=np.float64))
        found = found[~_near(found, ignore, tol)]
    i = j = tp = 0
    while i < len(truth) and j < len(found):
        if abs(found[j] - truth[i]) <= tol:
            tp += 1
            i += 1
            j += 1
        elif found[j] < truth[i]:
            j += 1
        else:
            i += 1
    return Score(tp=tp, fp=len(found) - tp, fn=len(truth) - tp)


def consensus(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference from two detectors without ground truth: the peaks both found (taken
    from `a`), and the peaks only one found (to be ignored when scoring)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    in_b = _near(a, b, tol)
    in_a = _near(b, a, tol)
    return a[in_b], np.sort(np.concatenate([a[~in_b], b[~in_a]]))


def _near(x: np.ndarray, ref: np.ndarray, tol: float) -> np.ndarray:
    """For each x, whether a ref value lies within tol (ref sorted)."""
    if len(ref) == 0:
        return np.zeros(len(x), dtype=bool)
    i = np.clip(np.searchsorted(ref, x), 1, len(ref) - 1)
    d = np.minimum(np.abs(ref[i - 1] - x), np.abs(ref[i] - x))
    if len(ref) == 1:
        d = np.abs(ref[0] - x)
    return d <= tol
