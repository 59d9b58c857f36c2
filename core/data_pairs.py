"""Paired ECG + echo training data from the simulator, as model-ready tensors.

One pair per subject seed (`core/simulate/paired.py: simulate_pair`): the beat-locked
clip (frame 0 = the previous beat's last frame, frames 1..F over [R_k, R_k+1)), that
beat's ECG window cut exactly as the streaming engine cuts it (`beat_window`, ending
where a live stream would have delivered up to: the next R plus a small detection
delay), the RR, the EF, and a reference loop: another beat of the same subject, which
is what `Generator.prime_loop` gives at run time.

Simulating and tokenizing costs far more than a training step on a 2-core CPU, so
`PairCache.build` does it once per run (cached in an .npz beside the checkpoints) and
training draws batches from the cache by step number (resumable).
"""
from __future__ import annotations

import logging
import multiprocessing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .beat_window import beat_window
from .config import Preset
from .tokenizer import CViViT, from_uint8
from .training import progress

log = logging.getLogger(__name__)

STREAM_DELAY_S = 0.1  # the window holds samples up to the next R plus this (QRS detection latency)


@dataclass
class PairSample:
    """One subject's training pair, before tokenization."""

    clip: np.ndarray              # (frames, H, W) uint8, beat-locked
    window: np.ndarray            # (leads, window_samples) float32
    valid: np.ndarray             # (window_samples,) bool
    rr: float
    ef: float
    reference: np.ndarray | None  # (frames, H, W) uint8: another beat of the same subject


class PairBatch(NamedTuple):
    tokens: Tensor       # (B, N) long
    window: Tensor       # (B, L, S) float
    valid: Tensor        # (B, 1, S) bool
    lead_ids: Tensor     # (L,) long
    rr: Tensor           # (B,)
    ref_tokens: Tensor   # (B, N) long
    ref_valid: Tensor    # (B,) bool
    ef: Tensor           # (B,)


REFERENCE_SECONDS = 16.0  # a longer recording of the same subject puts its clip on another beat


def simulated_pair(seed: int, preset: Preset, leads: int = 3) -> PairSample:
    """The simulator's pair for `seed`, plus another beat of the same subject as reference.

    simulate_pair picks the beat nearest 40 % into the recording; the same subject (same
    seed: EF, anatomy, view, image quality) recorded for longer gives a different beat
    with its own RR and ECG noise, as a separately acquired loop of the patient would be.
    """
    from .simulate.paired import simulate_pair

    tok = preset.tokenizer
    sample = simulate_pair(seed=seed, size=tok.image_size, frames=tok.frames, leads=leads)
    r = np.asarray(sample["r_peaks"], dtype=np.float64)
    k = int(sample["beat"])
    r_time, rr = float(r[k]), float(r[k + 1] - r[k])
    window, valid = beat_window(
        sample["ecg"], sample["ecg_fs"], r_time, preset.ecg, available_until=r_time + rr + STREAM_DELAY_S
    )
    other = simulate_pair(seed=seed, size=tok.image_size, frames=tok.frames, leads=leads, ecg_seconds=REFERENCE_SECONDS)
    reference = np.asarray(other["video"], dtype=np.uint8)
    return PairSample(np.asarray(sample["video"], dtype=np.uint8), window, valid, rr, float(sample["ef"]), reference)


@torch.inference_mode()
def _tokens(tokenizer: CViViT, clips: list[np.ndarray], device: torch.device | str) -> np.ndarray:
    video = from_uint8(np.stack(clips)).to(device)
    return tokenizer.encode(video).flatten(1).cpu().numpy().astype(np.int32)


def _load_npz(path: Path, seeds: list[int], token_space: str | None = None) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if not (len(arrays["seeds"]) == len(seeds) and (arrays["seeds"] == np.asarray(seeds)).all()):
        log.warning("cached pairs in %s are for other seeds: rebuilding", path)
        return None
    made_by = str(arrays["token_space"]) if "token_space" in arrays else None
    if token_space is not None and made_by != token_space:  # tokens of another tokenizer would train silently
        log.warning("cached pairs in %s hold another tokenizer's tokens: re-tokenizing", path)
        return None
    log.info("using cached pairs %s (%d)", path, len(seeds))
    return arrays


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def clip_files(directory: str | Path) -> list[Path]:
    """The .npz clips of a dataset folder, in a stable order; FileNotFoundError if none."""
    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .npz clips there")
    return files


def npz_pair(path: Path, preset: Preset) -> PairSample:
    """A paired clip of your own, in the layout `echopulse simulate` writes.

    Keys: `video` (uint8 frames × H × W, beat-locked: frame 0 the previous beat's last
    frame, frames 1.. from the beat's R peak), `ecg` (leads × samples, mV), `ecg_fs`,
    `r_peaks` (s, on the ECG's time axis), and optionally `beat` (index in r_peaks of
    the clip's beat; default: the R nearest `video_t[1]`) and `ef` (metadata only).
    Raises ValueError naming the file when something does not fit the preset.
    """
    tok = preset.tokenizer
    try:
        with np.load(path) as data:
            d = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # truncated, or not an .npz
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    missing = {"video", "ecg", "ecg_fs", "r_peaks"} - set(d)
    if missing:
        raise ValueError(f"{path}: missing keys {', '.join(sorted(missing))}")
    video = np.asarray(d["video"])
    if video.dtype != np.uint8 or video.shape != (tok.frames, tok.image_size, tok.image_size):
        raise ValueError(f"{path}: video must be uint8 {tok.frames}×{tok.image_size}×{tok.image_size}, "
                         f"got {video.dtype} {video.shape}")
    r = np.asarray(d["r_peaks"], dtype=np.float64).ravel()
    if "beat" in d:
        k = int(d["beat"])
    elif "video_t" in d:
        k = int(np.argmin(np.abs(r - float(np.asarray(d["video_t"])[1]))))
    else:
        raise ValueError(f"{path}: give `beat` or `video_t` so the clip's beat can be found")
    if not 0 <= k < len(r) - 1:
        raise ValueError(f"{path}: the clip's beat needs the next R peak in r_peaks")
    ecg = np.atleast_2d(np.asarray(d["ecg"], dtype=np.float32))
    r_time, rr = float(r[k]), float(r[k + 1] - r[k])
    window, valid = beat_window(ecg, float(d["ecg_fs"]), r_time, preset.ecg, available_until=r_time + rr + STREAM_DELAY_S)
    ef = float(d["ef"]) if "ef" in d else float("nan")
    return PairSample(video, window, valid, rr, ef, None)


def _make_pairs(
    make: Callable[[int, Preset], PairSample], preset: Preset, seeds: list[int], workers: int
) -> list[PairSample]:
    """`make(seed, preset)` for every seed, in seed order, on `workers` processes."""
    if workers <= 1:
        return [make(s, preset) for s in progress(seeds, total=len(seeds), desc="pairs")]
    # every pair is a pure function of its seed, so a pool gives the same arrays
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = pool.map(make, seeds, [preset] * len(seeds), chunksize=8)
        return list(progress(made, total=len(seeds), desc="pairs"))


def simulate_pairs(
    path: Path,
    preset: Preset,
    seeds: Iterable[int],
    make: Callable[[int, Preset], PairSample] = simulated_pair,
    workers: int = 1,
) -> dict[str, np.ndarray]:
    """Raw pairs (clips as uint8, windows, RR, EF) for `seeds`, cached at `path`.

    Independent of the tokenizer, so one simulation serves every run of a preset.
    `workers` > 1 simulates in that many processes (`make` must then be picklable)."""
    seeds = list(seeds)
    cached = _load_npz(path, seeds)
    if cached is not None:
        return cached
    log.info("simulating %d pairs into %s on %d process(es)", len(seeds), path, max(1, workers))
    samples = _make_pairs(make, preset, seeds, workers)
    arrays = {
        "clip": np.stack([s.clip for s in samples]),
        "ref_clip": np.stack([s.reference if s.reference is not None else s.clip for s in samples]),
        "ref_valid": np.array([s.reference is not None for s in samples]),
        "window": np.stack([s.window for s in samples]).astype(np.float32),
        "valid": np.stack([s.valid for s in samples]),
        "rr": np.array([s.rr for s in samples], np.float32),
        "ef": np.array([s.ef for s in samples], np.float32),
        "seeds": np.asarray(seeds),
    }
    _save_npz(path, arrays)
    return arrays


class PairCache:
    """Tokenized pairs in memory (and in an .npz so a resumed run does not rebuild them)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @classmethod
    def build(
        cls,
        path: Path,
        preset: Preset,
        tokenizer: CViViT,
        seeds: Iterable[int],
        device: torch.device | str = "cpu",
        make: Callable[[int, Preset], PairSample] = simulated_pair,
        chunk: int = 32,
        raw_path: Path | None = None,
        workers: int = 1,
        token_space: str | None = None,
    ) -> "PairCache":
        """Tokenized pairs at `path`; the raw simulation is cached at `raw_path`
        (default: beside `path`) and reused by later runs with other tokenizers.
        `token_space` (the tokenizer's `token_space_sha256`) is stored with the tokens, and
        a cache made by another tokenizer is re-tokenized instead of reused."""
        seeds = list(seeds)
        cached = _load_npz(path, seeds, token_space)
        if cached is not None:
            return cls(cached)
        raw = simulate_pairs(raw_path or path.with_name(f"{path.stem}_raw.npz"), preset, seeds, make, workers)
        log.info("tokenizing %d pairs into %s", len(seeds), path)
        tokens, ref_tokens = [], []
        for start in range(0, len(seeds), chunk):
            tokens.append(_tokens(tokenizer, list(raw["clip"][start : start + chunk]), device))
            ref_tokens.append(_tokens(tokenizer, list(raw["ref_clip"][start : start + chunk]), device))
        arrays = {k: v for k, v in raw.items() if k not in ("clip", "ref_clip")}
        arrays["tokens"] = np.concatenate(tokens)
        arrays["ref_tokens"] = np.where(raw["ref_valid"][:, None], np.concatenate(ref_tokens), 0)
        if token_space is not None:
            arrays["token_space"] = np.array(token_space)
        _save_npz(path, arrays)
        return cls(arrays)

    @classmethod
    def cached(cls, path: Path, seeds: Iterable[int], token_space: str | None = None) -> "PairCache | None":
        """The pairs at `path` when they hold exactly `seeds` in `token_space`, else None (nothing written)."""
        arrays = _load_npz(path, list(seeds), token_space)
        return None if arrays is None else cls(arrays)

    def indices(self, step: int, batch: int, seed: int = 0) -> np.ndarray:
        """The pairs of training step `step` (a function of the step alone: resumable)."""
        return np.random.default_rng([seed, step]).integers(0, len(self), batch)

    def batch(self, indices: np.ndarray, device: torch.device | str = "cpu", leads: int | None = None) -> PairBatch:
        """Pairs at `indices`; `leads` keeps the first leads (None: every third step all, else lead 0)."""
        a = self.arrays
        window = a["window"][indices]
        if leads is not None:
            window = window[:, :leads]

        def t(x: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)

        return PairBatch(
            tokens=t(a["tokens"][indices], torch.long),
            window=t(window, torch.float32),
            valid=t(a["valid"][indices][:, None], torch.bool),
            lead_ids=torch.arange(window.shape[1], device=device),
            rr=t(a["rr"][indices], torch.float32),
            ref_tokens=t(a["ref_tokens"][indices], torch.long),
            ref_valid=t(a["ref_valid"][indices], torch.bool),
            ef=t(a["ef"][indices], torch.float32),
        )
