"""Sources of echo clips for tokenizer training and evaluation, addressed by integer index.

Every source maps an index to one uint8 clip (T, H, W), deterministically, so a
training run derives its data from the step number (and resumes exactly), and
evaluation names its held-out clips by seed:

- `SimulatorClips`: the paired simulator, clip i = `simulate_pair(seed=i)`.
- `NpzClips`: a folder of `.npz` files (as written by `echopulse simulate`) holding a
  `video` array (T, H, W) uint8; clip i is file i mod n, at a window chosen from i.
- `SyntheticClips`: moving, pulsing ellipses with multiplicative noise; no simulator
  needed (smoke tests, quick checks).
- `CachedClips`: a fixed pool of another source's clips, kept in memory and cycled;
  `fill(workers)` makes the whole pool up front in parallel processes (a GPU trains
  faster than one core simulates).

`batch(source, indices, device)` stacks clips into a float video (B, 1, T, H, W) in [0, 1].
`contrast_augment` is the random contrast augmentation of the paper.
"""
from __future__ import annotations

import logging
import multiprocessing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .training import progress

log = logging.getLogger(__name__)


class ClipSource(Protocol):
    frames: int
    size: int

    def clip(self, index: int) -> np.ndarray: ...


class SimulatorClips:
    def __init__(self, frames: int, size: int) -> None:
        try:
            from .simulate.paired import simulate_pair
        except ImportError as err:
            raise RuntimeError("the paired simulator (echopulse.core.simulate.paired) is not available") from err
        self._simulate = simulate_pair
        self.frames, self.size = frames, size

    def clip(self, index: int) -> np.ndarray:
        return np.asarray(self._simulate(seed=index, size=self.size, frames=self.frames)["video"], dtype=np.uint8)


class NpzClips:
    """Clips from a folder of .npz files, each a uint8 `video` (T >= frames, H, W).

    Every file is checked when the folder is opened, from its array header alone (no
    pixels read), so a bad file stops a run before its first step, named: a float video
    would otherwise become black clips through the uint8 cast, silently."""

    def __init__(self, directory: str | Path, frames: int, size: int) -> None:
        self.files = sorted(Path(directory).rglob("*.npz"))
        if not self.files:
            raise FileNotFoundError(f"no .npz files under {directory}")
        self.frames, self.size = frames, size
        for path in self.files:
            shape, dtype = _video_header(path)
            if dtype != np.uint8:
                raise ValueError(f"{path}: video is {dtype}; clips are uint8 0..255 "
                                 "(from [0, 1] floats: (video * 255).round().astype(np.uint8))")
            if len(shape) != 3 or shape[0] < frames:
                raise ValueError(f"{path}: video of shape {shape}; expected (T >= {frames}, H, W)")

    def clip(self, index: int) -> np.ndarray:
        with np.load(self.files[index % len(self.files)]) as data:
            video = np.asarray(data["video"])
        start = (index // len(self.files) * 7919) % (video.shape[0] - self.frames + 1)  # varied windows
        video = video[start:start + self.frames]
        if video.shape[1:] != (self.size, self.size):
            resized = F.interpolate(torch.from_numpy(video).float()[None], size=(self.size, self.size), mode="area")
            video = resized[0].round().clamp(0, 255).byte().numpy()
        return video.astype(np.uint8)


def _video_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the `video` array of an .npz, from its header; ValueError naming the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "video.npy" not in archive.namelist():
                names = ", ".join(n.removesuffix(".npy") for n in archive.namelist())
                raise ValueError(f"{path}: no 'video' array (it has: {names})")
            with archive.open("video.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # truncated by an interrupted write
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    return tuple(shape), np.dtype(dtype)


class SyntheticClips:
    """Bright rings on a dark background that move and pulse, with speckle-like noise."""

    def __init__(self, frames: int, size: int) -> None:
        self.frames, self.size = frames, size

    def clip(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        yy, xx = np.mgrid[0:self.size, 0:self.size] / self.size
        video = np.zeros((self.frames, self.size, self.size), np.float32)
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
            vx, vy, pulse, phase = rng.normal(0, 0.01), rng.normal(0, 0.01), rng.uniform(0, 0.3), rng.uniform(0, 6.3)
            for t in range(self.frames):
                radius = r * (1 + pulse * np.sin(phase + t * 0.6))
                d = np.hypot(xx - cx - vx * t, yy - cy - vy * t)
                video[t] += np.exp(-(((d - radius) / 0.04) ** 2))
        video *= rng.gamma(4.0, 0.25, size=video.shape).astype(np.float32)
        return (np.clip(video, 0, 1) * 255).astype(np.uint8)


class CachedClips:
    """Reuse `capacity` clips of another source: index i -> clip first + (i − first) mod capacity,
    kept in memory after its first use (simulating every training clip afresh costs as much
    as training)."""

    def __init__(self, source: ClipSource, capacity: int, first: int = 0) -> None:
        self.source, self.capacity, self.first = source, capacity, first
        self.frames, self.size = source.frames, source.size
        self._clips: dict[int, np.ndarray] = {}

    def clip(self, index: int) -> np.ndarray:
        key = self.first + (index - self.first) % self.capacity
        if key not in self._clips:
            self._clips[key] = self.source.clip(key)
        return self._clips[key]

    def fill(self, workers: int, desc: str = "clips") -> None:
        """Make every clip of the pool now, in `workers` processes (1: here). Clip i is the
        source's clip i wherever it is made, so a filled pool equals one filled on demand."""
        missing = [k for k in range(self.first, self.first + self.capacity) if k not in self._clips]
        if not missing:
            return
        if workers <= 1:
            for key in progress(missing, total=len(missing), desc=desc):
                self._clips[key] = self.source.clip(key)
            return
        # spawn: the workers need numpy and the simulator only, never a copy of a parent
        # that may hold CUDA state or torch's thread pools
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            made = pool.map(self.source.clip, missing, chunksize=max(1, min(64, len(missing) // (4 * workers))))
            for key, clip in zip(missing, progress(made, total=len(missing), desc=desc)):
                self._clips[key] = clip


def clip_source(data: str | None, frames: int, size: int) -> ClipSource:
    """None -> the simulator; 'synthetic' -> SyntheticClips; anything else is a folder of .npz."""
    if data is None:
        return SimulatorClips(frames, size)
    if data == "synthetic":
        return SyntheticClips(frames, size)
    return NpzClips(data, frames, size)


def batch(source: ClipSource, indices: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Clips at `indices` -> float video (B, 1, T, H, W) in [0, 1], on `device` (the uint8
    clips travel there, a quarter of the float bytes)."""
    clips = torch.from_numpy(np.stack([source.clip(int(i)) for i in indices]))
    if device is not None:
        clips = clips.to(device)
    return clips.float().div_(255.0)[:, None]


def contrast_augment(video: Tensor, generator: torch.Generator, prob: float = 0.5) -> Tensor:
    """Per clip, with probability `prob`: random gamma in [0.7, 1.4], gain in [0.8, 1.25], offset ±0.05."""
    b = video.shape[0]
    shape = (b,) + (1,) * (video.ndim - 1)
    u = torch.rand(4, b, generator=generator).to(video.device)  # drawn on the CPU: the same draws on any device
    apply = (u[0] < prob).view(shape)
    gamma = (0.7 * (2.0 ** (u[1] * 1.0))).view(shape)   # log-uniform 0.7 .. 1.4
    gain = (0.8 * (1.5625 ** u[2])).view(shape)          # log-uniform 0.8 .. 1.25
    offset = ((u[3] - 0.5) * 0.1).view(shape)
    changed = (video.clamp_min(0).pow(gamma) * gain + offset).clamp(0, 1)
    return torch.where(apply, changed, video)
