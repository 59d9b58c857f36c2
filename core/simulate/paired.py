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
from .ecg import BeatEvents, simulate_ecg
from .heart import HeartCycle
from .measure import disc_volumes, ejection_fraction
from .subject import VIEWS, sample_subject

log = logging.getLogger(__name__)

TIE_SV = 0.01  # volume differences under 1 % of the stroke volume: below what a 64² mask shows


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


def _event_frames(times: np.ndarray, events: np.ndarray, volume: np.ndarray, largest: bool, tie: float) -> np.ndarray:
    """Per event (R for ED, T end for ES): of the two frames either side of it, the one showing
    the largest (ED) or smallest (ES) LV; the nearer one where their volumes differ by `tie`
    ml or less (both on the isovolumic plateau, or too alike for a mask to tell). −1 for
    events outside the clip (± half a frame). The nearest frame alone can still be filling
    or ejecting while the frame on the other side already shows EDV or ESV."""
    out = np.full(len(events), -1, dtype=np.int64)
    if len(times) < 2:
        return out
    half = np.median(np.diff(times)) / 2
    sign = 1.0 if largest else -1.0
    for i, e in enumerate(events):
        if not times[0] - half <= e <= times[-1] + half:
            continue
        j = int(np.searchsorted(times, e))
        pair = np.unique(np.clip([j - 1, j], 0, len(times) - 1))
        v = sign * volume[pair]
        best = pair[v >= v.max() - tie]
        out[i] = best[np.argmin(np.abs(times[best] - e))]
    return out


def _ed_es(times: np.ndarray, beats: BeatEvents, volume: np.ndarray, edv: float, esv: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """ED and ES frames of the clip's sinus beats, and the (ED, ES) pair of the first beat
    that has both, for the clip's EF. Judged on the heart model's volume: the mask's area
    follows it, without the mask's pixel steps."""
    sinus = beats.kind == 0
    tie = TIE_SV * (edv - esv)
    ed = _event_frames(times, beats.r[sinus], volume, True, tie)
    es = _event_frames(times, beats.t_end[sinus], volume, False, tie)
    # Below ~2 frames per beat one frame can be next to one beat's T end and the next
    # beat's R: it is ED or ES by what it shows, never both.
    both = np.intersect1d(ed[ed >= 0], es[es >= 0])
    full = volume >= 0.5 * (edv + esv)
    ed[np.isin(ed, both) & ~full[ed]] = -1
    es[np.isin(es, both) & full[es]] = -1
    paired = np.flatnonzero((ed >= 0) & (es > ed))
    pair = (int(ed[paired[0]]), int(es[paired[0]])) if len(paired) else None
    return np.unique(ed[ed >= 0]), np.unique(es[es >= 0]), pair


def _check_clip(frames: int, fps: float | None, ecg_seconds: float, pvc_rate: float) -> None:
    """Clear errors for arguments that would otherwise fail deep in NumPy or pass silently."""
    if int(frames) != frames or frames < 2:
        raise ValueError(f"frames must be a whole number, at least 2, got {frames}")
    if fps is None and frames < 3:
        raise ValueError("beat-locked clips need frames >= 3")
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if not np.isfinite(ecg_seconds):
        raise ValueError(f"ecg_seconds must be finite, got {ecg_seconds}")
    if not 0.0 <= pvc_rate <= 1.0:
        raise ValueError(f"pvc_rate must be within 0..1, got {pvc_rate}")


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
    (ml, heart model), lv_area (cm²), ef (subject EF, %), ef_mask (EF from the ED and ES
    masks of the clip's first sinus beat that has both; NaN if none), ed, es (int arrays:
    for each sinus R / T end inside the clip, the frame next to it with the largest /
    smallest LV, the nearer one on a tie: `_event_frames`), hr, edv, esv, pixel_cm, beat
    (index into r_peaks of the clip's beat; −1 with fps), subject.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    _check_clip(frames, fps, ecg_seconds, pvc_rate)
    frames = int(frames)
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
    ed, es, pair = _ed_es(times, beats, volume_true, subject.edv, subject.esv)
    ef_mask = ejection_fraction(lv_volume[pair[0]], lv_volume[pair[1]]) if pair else float("nan")
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
