"""Score a generator on held-out simulator subjects: image quality, EF, ED/ES timing, HR tracking.

Per subject (seed s): the simulator's beat-locked clip is the truth; the generator gets
that beat's ECG window (cut as the stream would: up to the next R + 0.1 s) and the true
frame 0 as prime, and generates frames 1..F. Two priming modes:
- image: the prime frame alone;
- loop: the prime frame plus a reference loop of the same subject (another beat,
  `data_pairs.REFERENCE_SECONDS`), as `Generator.prime_loop` gives at run time.

Measures (`lv_segmenter.LvSegmenter` segments generated and true frames alike):
- SSIM of the generated frames against the true ones;
- EF = (max − min) / max of the method-of-discs volumes over frames 1..F, against the
  same measure on the true clip and against the simulator's ground-truth EF: MAE, RMSE, R²,
  beside the MAE of the best constant guess (the true EFs' median: knowing nothing) and
  the EF of the true clip's tokenizer round trip (the ceiling in this token space), and
  the floor under one-frame priming: the exact posterior-median EF given what an ED frame
  and the ECG show (`simulate.ef_posterior`), scored alike, and as if rendered with the
  round trip's measurement errors;
- ED (largest volume) and ES (smallest) frame against the simulator's labels (of the two
  frames next to R / T end, the one with the largest / smallest LV: `simulate.paired`),
  counted across the beat's edge (`frame_distance`: frame F is one frame before the next R);
- HR tracking: beats generated in sequence while the ECG rate jumps from 60 to 120 bpm;
  per beat, the interval between consecutive generated ED frames against the ECG's RR;
- FVD: the Fréchet distance between generated and true clips in the feature space of
  the LV segmenter's encoder (`LvSegmenter.clip_features`: trained here on simulator
  masks, never on generated video; each dimension standardised by the true clips' spread,
  so appearance and motion features weigh alike), with three anchors measured the same
  way: another beat of the same subjects (what a perfect generator would score at this
  n), the tokenizer's round trip of the true clip (the best a generator working in its
  tokens can look) and the prime frame held still for the whole beat (one that never moves).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .beat_window import beat_window
from .data_pairs import REFERENCE_SECONDS, STREAM_DELAY_S
from .generator import Generator
from .frechet import frechet_distance
from .generator_figure import beat_figure
from .lv_segmenter import LvSegmenter
from .metrics import ssim
from .tokenizer import from_uint8, to_uint8
from .simulate.ef_posterior import one_frame_ef_floor
from .simulate.measure import disc_volumes
from .training import progress



def _ef(volumes: np.ndarray) -> float:
    top = float(volumes.max())
    return 100.0 * (top - float(volumes.min())) / top if top > 0 else float("nan")


def _regression(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(pred) & np.isfinite(truth)
    pred, truth = pred[ok], truth[ok]
    if len(pred) < 2:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "n": int(len(pred))}
    err = pred - truth
    r2 = 1.0 - float((err**2).sum()) / max(float(((truth - truth.mean()) ** 2).sum()), 1e-9)
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "r2": r2, "n": int(len(pred))}


def _ssim(generated: np.ndarray, truth: np.ndarray) -> float:
    x = torch.from_numpy(generated).float().div(255.0)[:, None]
    y = torch.from_numpy(truth).float().div(255.0)[:, None]
    return float(ssim(x, y))


def _window(sample: dict[str, Any], gen: Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    r = np.asarray(sample["r_peaks"], dtype=np.float64)
    k = int(sample["beat"])
    r_time, rr = float(r[k]), float(r[k + 1] - r[k])
    window, valid = beat_window(sample["ecg"], sample["ecg_fs"], r_time, gen.preset.ecg, available_until=r_time + rr + STREAM_DELAY_S)
    return window, valid, r_time, rr


def _subject(gen: Generator, seed: int, leads: int) -> tuple[dict[str, Any], np.ndarray, tuple[np.ndarray, np.ndarray, float, float]]:
    from .simulate.paired import simulate_pair

    tok = gen.preset.tokenizer
    sample = simulate_pair(seed=seed, size=tok.image_size, frames=tok.frames, leads=leads)
    reference = simulate_pair(seed=seed, size=tok.image_size, frames=tok.frames, leads=leads, ecg_seconds=REFERENCE_SECONDS)["video"]
    return sample, reference, _window(sample, gen)


def _generate(gen: Generator, sample: dict[str, Any], reference: np.ndarray, beat: tuple[np.ndarray, np.ndarray, float, float], mode: str, seed: int) -> np.ndarray:
    """Frames 1..F for the true frame 0 as prime; `mode` "loop" adds the reference loop."""
    if mode == "loop":
        gen.prime_loop(reference)
        gen.prime_image(sample["video"][0], keep_reference=True)
    else:
        gen.prime_image(sample["video"][0])
    window, valid, r_time, rr = beat
    frames, _ = gen.generate_beat(window, valid, r_time, rr, seed=seed)
    return frames


def _score_subject(gen: Generator, segmenter: LvSegmenter, seed: int, leads: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One subject's record and its clips' FVD features (truth, each mode, anchors)."""
    sample, reference, beat = _subject(gen, seed, leads)
    truth = sample["video"][1:]
    pixel_cm = float(sample["pixel_cm"])
    true_vol = disc_volumes(segmenter.masks(truth), pixel_cm)
    out: dict[str, Any] = {
        "seed": seed, "ef_sim": float(sample["ef"]), "ef_true_video": _ef(true_vol), "hr": float(sample["hr"]),
        "ed_true": int(sample["ed"][0]) if len(sample["ed"]) else -1,
        "es_true": int(sample["es"][0]) if len(sample["es"]) else -1,
    }
    features = {
        "truth": segmenter.clip_features(truth),
        "other_beat": segmenter.clip_features(reference[1:]),
        "static_prime": segmenter.clip_features(np.repeat(sample["video"][:1], len(truth), axis=0)),
    }
    roundtrip = _roundtrip(gen, sample["video"])[1:]
    features["tokenizer_roundtrip"] = segmenter.clip_features(roundtrip)
    out["ef_tokenizer_roundtrip"] = _ef(disc_volumes(segmenter.masks(roundtrip), pixel_cm))
    for mode in ("image", "loop"):
        frames = _generate(gen, sample, reference, beat, mode, seed)
        vol = disc_volumes(segmenter.masks(frames), pixel_cm)
        out[mode] = {
            "ssim": _ssim(frames, truth),
            "ef": _ef(vol),
            "ed": int(np.argmax(vol)) + 1,
            "es": int(np.argmin(vol)) + 1,
        }
        features[mode] = segmenter.clip_features(frames)
    return out, features


@torch.inference_mode()
def _roundtrip(gen: Generator, clip: np.ndarray) -> np.ndarray:
    """The clip through the generator's tokenizer: encode, decode, back to uint8."""
    video = from_uint8(clip).to(gen.device)
    return to_uint8(gen.tokenizer.decode_indices(gen.tokenizer.encode(video)))[0, 0].cpu().numpy()


def evaluate_subject(gen: Generator, segmenter: LvSegmenter, seed: int, leads: int = 1) -> dict[str, Any]:
    """Both priming modes for one held-out subject."""
    return _score_subject(gen, segmenter, seed, leads)[0]


def fvd_summary(features: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Fréchet distances to the true clips' features, per priming mode and for the anchors."""
    result: dict[str, Any] = {
        "features": "LV segmenter encoder (lv_segmenter.clip_features), 64 dims per clip, standardised by the true clips",
    }
    names = ("image", "loop", "other_beat", "tokenizer_roundtrip", "static_prime")
    if len(features) < 2:
        return result | {name: float("nan") for name in names}
    truth = np.stack([f["truth"] for f in features])
    centre, spread = truth.mean(0), truth.std(0) + 1e-6
    for name in names:
        result[name] = frechet_distance((np.stack([f[name] for f in features]) - centre) / spread, (truth - centre) / spread)
    return result


def subject_figure(gen: Generator, segmenter: LvSegmenter, seed: int, path: str | Path, leads: int = 1) -> None:
    """PNG: the beat's ECG, true frames, frames generated with each priming, LV areas."""
    sample, reference, beat = _subject(gen, seed, leads)
    window, valid, r_time, rr = beat
    rows = [("truth", sample["video"][1:])]
    rows += [(f"generated, {mode} prime", _generate(gen, sample, reference, beat, mode, seed)) for mode in ("image", "loop")]
    areas = [segmenter.masks(frames).sum(axis=(1, 2)).astype(np.float64) for _, frames in rows]
    cfg = gen.preset.ecg
    f = len(rows[0][1])
    phase = (cfg.pre_r_s + np.arange(f) * rr / f) / cfg.window_s
    beat_figure(path, window[0], valid, phase, rows, areas)


def hr_tracking(gen: Generator, segmenter: LvSegmenter, seed: int, beats_each: int = 4, leads: int = 1) -> dict[str, Any]:
    """Generate beats in sequence while the ECG goes from 60 to 120 bpm; compare the
    intervals between generated ED frames with the ECG's RR, beat by beat.

    The frames' times come from the ECG (beat-locked: frame i at R + (i-1)·RR/F), so this
    tests that ED keeps its frame across the jump; a generator repeating one cycle with
    ED on frame 1 whatever the ECG would pass."""
    from .simulate.paired import simulate_pair

    tok = gen.preset.tokenizer
    f = tok.frames - 1
    eds: list[float] = []
    rrs: list[float] = []
    t_offset = 0.0
    first = True
    for hr in (60.0, 120.0):
        sample = simulate_pair(seed=seed, size=tok.image_size, frames=tok.frames, leads=leads, hr=hr, ecg_seconds=20.0)
        if first:
            gen.prime_image(sample["video"][0])
            first = False
        r = np.asarray(sample["r_peaks"], dtype=np.float64)
        k0 = int(sample["beat"])
        for k in range(k0, min(k0 + beats_each, len(r) - 1)):
            rr = float(r[k + 1] - r[k])
            window, valid = beat_window(sample["ecg"], sample["ecg_fs"], float(r[k]), gen.preset.ecg, available_until=float(r[k + 1]) + STREAM_DELAY_S)
            frames, times = gen.generate_beat(window, valid, t_offset, rr, seed=seed + k)
            vol = disc_volumes(segmenter.masks(frames), float(sample["pixel_cm"]))
            eds.append(cycle_ed_time(times, vol, t_offset, rr))
            rrs.append(rr)
            t_offset += rr
    periods, ok = ed_periods_within_one_frame(np.asarray(eds), np.asarray(rrs), f)
    switch = beats_each - 1  # period index spanning the first 120 bpm beat
    following = ok[switch:]
    beats_to_follow = int(np.argmax(following)) if following.any() else -1
    return {
        "rr": rrs, "ed_times": eds, "periods": periods.tolist(), "period_within_1_frame": ok.tolist(),
        "beats_to_follow_after_switch": beats_to_follow,
        "follows_within_one_beat": bool(following.any() and beats_to_follow <= 1 and following[beats_to_follow:].all()),
    }


def cycle_ed_time(times: np.ndarray, volumes: np.ndarray, r: float, rr: float) -> float:
    """When a generated beat (R at `r`) shows its largest LV, dated across the beat's edge
    as `frame_distance` counts frames: a largest LV in the beat's second half is the next
    cycle's ED come early (the last frame sits one frame before the next R), dated that far
    before this beat's R. Read as this beat's ED, it made two periods a frame off by a
    whole beat each, and a heart that follows the ECG a missed cycle."""
    t = float(times[int(np.argmax(volumes))])
    return t - rr if t - r > rr / 2 else t


def ed_periods_within_one_frame(ed_times: np.ndarray, rrs: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Intervals between consecutive beats' ED times, and whether each equals its beat's RR
    within one frame. Beat k's frames are rr_k / frames apart, so ED moving by one frame
    between beats k and k + 1 changes the interval by one frame of either beat: the
    tolerance is the longer of the two (the shorter would fail a one-frame move whenever
    the rhythm slows or speeds up)."""
    periods = np.diff(ed_times)
    frame = np.maximum(rrs[:-1], rrs[1:]) / frames
    return periods, np.abs(periods - rrs[:-1]) <= frame + 1e-9


HR_SUBJECTS = 20  # subjects taken through the 60 -> 120 bpm jump (each 8 beats)
FLOOR_FIRST_SEED, FLOOR_SUBJECTS = 3_000_000, 2000  # a population for the one-frame EF floor (nothing trains on it)


def hr_tracking_summary(gen: Generator, segmenter: LvSegmenter, seeds: Sequence[int], leads: int = 1) -> dict[str, Any]:
    """`hr_tracking` for each seed, and the share of subjects whose chamber cycle follows."""
    runs = [{"seed": int(seed), **hr_tracking(gen, segmenter, int(seed), leads=leads)} for seed in seeds]
    periods_ok = [ok for run in runs for ok in run["period_within_1_frame"]]
    return {
        "subjects": runs,
        "follows_within_one_beat": float(np.mean([run["follows_within_one_beat"] for run in runs])),
        "periods_within_1_frame": float(np.mean(periods_ok)) if periods_ok else float("nan"),
    }


def frame_distance(frame: int, reference: int, frames: int) -> float:
    """Frames between a generated event and its ECG reference in a beat of `frames` frames,
    across the beat's edge: frame F sits one frame before the next R, as frame 2 sits one
    after this one, so an event dated a frame early is as close as one dated a frame late.
    NaN without a reference (-1)."""
    if reference < 0:
        return float("nan")
    d = abs(frame - reference) % frames
    return float(min(d, frames - d))


def _within_one_frame(subjects: list[dict[str, Any]], mode: str, event: str, frames: int) -> float:
    """Share of subjects whose generated `event` ("ed"/"es") is within one frame of the ECG's."""
    ok = [frame_distance(s[mode][event], s[f"{event}_true"], frames) <= 1 for s in subjects if s[f"{event}_true"] >= 0]
    return float(np.mean(ok)) if ok else float("nan")


def evaluate_generator(gen: Generator, segmenter: LvSegmenter, seeds: Sequence[int], leads: int = 1) -> dict[str, Any]:
    """Every figure of the module docstring over the held-out subjects `seeds`."""
    if not len(seeds):
        # nothing to score, and HR tracking must not fall back on a training subject
        raise ValueError("evaluate_generator needs at least one held-out subject seed")
    subjects, features = [], []
    for seed in progress(seeds, total=len(seeds), desc="subjects"):
        record, clip_features = _score_subject(gen, segmenter, seed, leads)
        subjects.append(record)
        features.append(clip_features)
    summary: dict[str, Any] = {"n": len(subjects)}
    ef_true_video = np.array([s["ef_true_video"] for s in subjects])
    ef_sim = np.array([s["ef_sim"] for s in subjects])
    for mode in ("image", "loop"):
        ef = np.array([s[mode]["ef"] for s in subjects])
        summary[mode] = {
            "ssim": float(np.mean([s[mode]["ssim"] for s in subjects])),
            "ef_vs_true_video": _regression(ef, ef_true_video),
            "ef_vs_simulator": _regression(ef, ef_sim),
            "ed_within_1_frame": _within_one_frame(subjects, mode, "ed", gen.frames_per_beat),
            "es_within_1_frame": _within_one_frame(subjects, mode, "es", gen.frames_per_beat),
        }
    summary["fvd"] = fvd_summary(features)
    summary["segmenter_ef_vs_simulator"] = _regression(ef_true_video, ef_sim)
    # the ceiling of a generator in this token space: the true clip through the tokenizer
    summary["tokenizer_roundtrip_ef_vs_true_video"] = _regression(np.array([s["ef_tokenizer_roundtrip"] for s in subjects]), ef_true_video)
    # what knowing nothing of the subject scores: the best single EF for all of them (their median)
    known = ef_true_video[np.isfinite(ef_true_video)]
    summary["ef_best_constant_mae"] = float(np.abs(known - np.median(known)).mean()) if len(known) else float("nan")
    # what one ED frame and the ECG can tell of the EF at best (core/simulate/ef_posterior.py):
    # the floor under the one-frame figure, exactly and as rendered through the tokenizer
    roundtrip_error = np.array([s["ef_tokenizer_roundtrip"] for s in subjects]) - ef_true_video
    summary["one_frame_ef_floor"] = {
        "these_subjects": one_frame_ef_floor(seeds, ef_true_video, roundtrip_error),
        "population": one_frame_ef_floor(range(FLOOR_FIRST_SEED, FLOOR_FIRST_SEED + FLOOR_SUBJECTS)),
    }
    summary["hr_tracking"] = hr_tracking_summary(gen, segmenter, list(seeds)[:HR_SUBJECTS], leads=leads)
    return {"summary": summary, "subjects": subjects}
