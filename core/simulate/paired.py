"""Paired samples: one subject's ECG recording and an echo clip of one of its beats, with ground truth.

Default timing is beat-locked, the contract the generator relies on: with F = frames − 1
frames per beat, frame i (1..F) is at R_k + (i−1)·RR_k/F, so frame 1 is end-diastole at R_k,
and frame 0 is the previous beat's last frame, R_k−1 + (F−1)·RR_k−1/F. Consecutive beats
thus chain without a duplicated frame. With `fps` the frames are at a fixed rate instead.
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator

import numpy as np

from .echo import SIZES, EchoRenderer
from .ecg import simulate_ecg
from .heart import HeartCycle
from .measure import disc_volumes, ejection_fraction
from .subject import VIEWS, sample_subject

log = logging.getLogger(__name__)


def beat_locked_times(r: np.ndarray, k: int, frames: int) -> np.ndarray:
    """Frame times for beat k of R times `r` (k >= 1): the previous beat's last frame, then
    F = frames − 1 frames spread evenly over [R_k, R_k+1)."""
    f = frames - 1
    rr_prev, rr = r[k] - r[k - 1], r[k + 1] - r[k]
    first = r[k - 1] + (f - 1) * rr_prev / f
    return np.concatenate([[first], r[k] + np.arange(f) * rr / f])


def _sinus_beats(r: np.ndarray, kind: np.ndarray, duration: float) -> np.ndarray:
    """Indices of sinus beats with sinus neighbours, all three inside the recording."""
    idx = np.arange(1, len(r) - 1)
    ok = (r[idx - 1] >= 0) & (r[idx + 1] < duration) & (kind[idx - 1] == 0) & (kind[idx] == 0) & (kind[idx + 1] == 0)
    return idx[ok]


def _pick_beat(r: np.ndarray, kind: np.ndarray, duration: float) -> int:
    """A sinus beat with sinus neighbours, nearest 40 % into the recording (context both sides)."""
    idx = _sinus_beats(r, kind, duration)
    if len(idx) == 0:
        raise RuntimeError("recording too short for a beat-locked clip")
    return int(idx[np.argmin(np.abs(r[idx] - 0.4 * duration))])


def _nearest_frames(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Index of the frame nearest to each event that falls within the clip (± half a frame)."""
    if len(times) < 2:
        return np.zeros(0, dtype=np.int64)
    dt = np.median(np.diff(times))
    ev = events[(events >= times[0] - dt / 2) & (events <= times[-1] + dt / 2)]
    return np.unique(np.argmin(np.abs(times[None, :] - ev[:, None]), axis=1)).astype(np.int64)


def simulate_pair(
    seed: int,
    size: int = 64,
    frames: int = 11,
    fps: float | None = None,
    ef: float | None = None,
    hr: float | None = None,
    leads: int = 1,
    ecg_fs: float = 250.0,
    view: str = "a4c",
    ecg_seconds: float = 10.0,
    noise: float = 1.0,
    pvc_rate: float = 0.0,
    pacing: str = "none",
    fresh_noise_seed: int | None = None,
    fresh_speckle_seed: int | None = None,
) -> dict[str, Any]:
    """One paired ECG + echo sample, deterministic for `seed`.

    `fresh_noise_seed` redraws only the per-frame electronic noise: calls that differ in it
    alone return the same clip under different noise (the tokenizer's noise floor).
    `fresh_speckle_seed` redraws only the tissue scatterers: the same heart, moving the
    same way, under another speckle pattern (the tokenizer's speckle floor).

    Keys: video (uint8 T×H×W), video_t (s), ecg (float32 leads×n, mV), ecg_fs, r_peaks (s),
    p_on, t_end (s, per beat inside the recording), beat_kind (0 sinus, 1 PVC), lv_mask
    (bool T×H×W), lv_volume (ml per frame, method of discs from the mask), lv_volume_true
    (ml, heart model), lv_area (cm²), ef (subject EF, %), ef_mask (EF from the clip's ED and
    ES masks), ed, es (int arrays: frames nearest each R / T end inside the clip), hr,
    edv, esv, pixel_cm, beat (index into r_peaks of the clip's beat; −1 with fps), subject.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if frames < 2:
        raise ValueError("frames must be at least 2")
    if fps is None and frames < 3:
        raise ValueError("beat-locked clips need frames >= 3")
    if fps is not None and fps <= 0:
        raise ValueError("fps must be positive")
    subject = sample_subject(seed, ef=ef, hr=hr, view=view, noise=noise)
    rng = np.random.default_rng([int(seed), 0xDA7A])
    rr = 60.0 / subject.hr
    if fps is None:
        duration = max(ecg_seconds, 6.0 * rr)
    else:
        duration = max(ecg_seconds, (frames - 1) / fps + 2.0 + 2.0 * rr)
    morph = dataclasses.replace(subject.ecg, pvc_rate=float(pvc_rate), pacing=pacing)
    subject = dataclasses.replace(subject, ecg=morph)  # the sample's `subject` says what was drawn
    rec = simulate_ecg(duration, ecg_fs, subject.hr, leads=leads, seed=rng, morph=morph)
    # Ectopy can leave no sinus beat with sinus neighbours in the recording (a PVC every
    # other beat): record longer until one turns up. Seeds that never lacked one are unchanged.
    while fps is None and not len(_sinus_beats(rec.beats.r, rec.beats.kind, duration)) and duration < 64 * max(ecg_seconds, rr):
        duration *= 2
        rec = simulate_ecg(duration, ecg_fs, subject.hr, leads=leads, seed=rng, morph=morph)
    beats = rec.beats
    if fps is None:
        k = _pick_beat(beats.r, beats.kind, duration)
        times = beat_locked_times(beats.r, k, frames)
    else:
        first = beats.r[(beats.r >= 1.0)][0]
        t0 = first - 0.25 * (60.0 / subject.hr)
        times = t0 + np.arange(frames) / fps
        k = -1
    log.debug("seed %d: EF %.1f %%, HR %.0f bpm, beat %d, frames at %.3f..%.3f s", seed, subject.ef, subject.hr, k, times[0], times[-1])
    heart = HeartCycle(beats, subject.edv, subject.esv)
    volume_true = heart.volume(times)
    speckle_rng = None if fresh_speckle_seed is None else np.random.default_rng([int(seed), 0x5BEC, int(fresh_speckle_seed)])
    renderer = EchoRenderer(subject, size, rng=np.random.default_rng([int(seed), 0xEC40]), speckle_rng=speckle_rng)
    noise_rng = rng if fresh_noise_seed is None else np.random.default_rng([int(seed), 0xF4E5, int(fresh_noise_seed)])
    video, masks = renderer.render(volume_true, heart.mitral_open(times), rng=noise_rng)
    lv_volume = disc_volumes(masks, renderer.pixel_cm)
    inside = rec.inside
    ed = _nearest_frames(times, beats.r[beats.kind == 0])
    es = _nearest_frames(times, beats.t_end[beats.kind == 0])
    ef_mask = ejection_fraction(lv_volume[ed[0]], lv_volume[es[0]]) if len(ed) and len(es) else float("nan")
    return {
        "video": video,
        "video_t": times,
        "ecg": rec.signal,
        "ecg_fs": float(ecg_fs),
        "r_peaks": beats.r[inside],
        "p_on": beats.p_on[inside],
        "t_end": beats.t_end[inside],
        "beat_kind": beats.kind[inside].astype(np.int8),
        "lv_mask": masks,
        "lv_volume": lv_volume.astype(np.float32),
        "lv_volume_true": volume_true.astype(np.float32),
        "lv_area": (masks.sum(axis=(1, 2)) * renderer.pixel_cm ** 2).astype(np.float32),
        "ef": float(subject.ef),
        "ef_mask": float(ef_mask),
        "ed": ed,
        "es": es,
        "hr": float(subject.hr),
        "edv": float(subject.edv),
        "esv": float(subject.esv),
        "pixel_cm": float(renderer.pixel_cm),
        "beat": int(np.searchsorted(beats.r[inside], beats.r[k])) if k >= 0 else -1,
        "subject": _subject_dict(subject),
    }


def _subject_dict(subject: Any) -> dict[str, Any]:
    d = dataclasses.asdict(subject)
    d["ecg"] = {k: v if isinstance(v, str) else float(v) for k, v in d["ecg"].items()}
    return d


def _pair_job(args: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    seed, kw = args
    return simulate_pair(seed, **kw)


def iter_pairs(first_seed: int, n: int, workers: int = 2, **kw: Any) -> Iterator[dict[str, Any]]:
    """Yield `simulate_pair(first_seed + i, **kw)` for i in 0..n−1, in order, computed by
    `workers` processes (1: in this process). For training loops that simulate on the fly."""
    seeds = range(first_seed, first_seed + n)
    if workers <= 1:
        for s in seeds:
            yield simulate_pair(s, **kw)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_pair_job, ((s, kw) for s in seeds), chunksize=4)
