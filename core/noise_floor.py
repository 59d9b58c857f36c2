"""The error no tokenizer can go below on simulator clips: the fresh electronic noise.

Every frame of a simulated clip carries electronic noise drawn anew for that frame. A
token (10 bits per 128-pixel tubelet) cannot carry it, so a reconstruction can at best
return the clip's mean over that noise. `noise_floor` renders each clip `draws` times,
differing in that noise alone (`simulate_pair(fresh_noise_seed=k)`), and reports
- `mse`: the per-pixel noise variance (unbiased over the draws), the least MSE any
  decoder blind to the noise can reach;
- `oracle`: MSE, MAE, PSNR and SSIM of each draw against the mean of the other draws,
  i.e. of a reconstruction that knows everything but the noise (its mean still holds
  1/(draws − 1) of the noise variance, so it errs slightly on the pessimistic side).
Speckle moves with the tissue and is the same in every draw, so it counts as content
here: a tokenizer that cannot carry speckle either sits above these figures.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .metrics import reconstruction_metrics
from .simulate.paired import simulate_pair
from .training import progress


def noise_draws(seed: int, frames: int, size: int, draws: int) -> np.ndarray:
    """(draws, T, H, W) float32 in [0, 1]: one simulator clip under `draws` noise draws."""
    clips = [simulate_pair(seed, size=size, frames=frames, fresh_noise_seed=k)["video"] for k in range(draws)]
    return np.stack(clips).astype(np.float32) / 255.0


def noise_floor(seeds: Sequence[int], frames: int, size: int, draws: int = 8) -> dict[str, Any]:
    """The floor figures of the module docstring, averaged over the clips `seeds`."""
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    variance = 0.0
    oracle: dict[str, float] = {}
    for seed in progress(seeds, total=len(seeds), desc="noise floor"):
        clips = noise_draws(seed, frames, size, draws)
        variance += float(clips.var(axis=0, ddof=1).mean())
        others = (clips.sum(axis=0, keepdims=True) - clips) / (draws - 1)
        metrics = reconstruction_metrics(torch.from_numpy(others)[:, None], torch.from_numpy(clips)[:, None])
        for name, values in metrics.items():
            oracle[name] = oracle.get(name, 0.0) + float(values.mean())
    n = len(seeds)
    return {"clips": n, "draws": draws, "mse": variance / n, "oracle": {k: v / n for k, v in oracle.items()}}
