"""The error a tokenizer cannot go below on simulator clips, and the error set by speckle.

Every frame of a simulated clip carries electronic noise drawn anew for that frame. A
token (10 bits per 128-pixel tubelet) cannot carry it, so a reconstruction can at best
return the clip's mean over that noise. `noise_floor` renders each clip `draws` times,
differing in that noise alone (`simulate_pair(fresh_noise_seed=k)`), and reports
- `mse`: the per-pixel noise variance (unbiased over the draws), the least MSE any
  decoder blind to the noise can reach;
- `oracle`: MSE, MAE, PSNR and SSIM of each draw against the mean of the other draws,
  i.e. of a reconstruction that knows everything but the noise (its mean still holds
  1/(draws − 1) of the noise variance, so it errs slightly on the pessimistic side).

Speckle moves with the tissue and is the same in every such draw, so it counts as content
there. `speckle=True` redraws the tissue scatterers as well
(`simulate_pair(fresh_speckle_seed=k)`): the same heart, moving the same way, under
another speckle pattern and other noise. The same figures then give the floor of a
reconstruction that knows the anatomy, the tissue and the motion exactly but not the
speckle pattern: the best such clip is the mean over patterns, and its MSE is their
variance. The static clutter haze and the valve leaflets stay fixed, so this floor errs
low. A tokenizer goes below it only as far as its bits carry the pattern itself: random
texture with a correlation area of about 2 pixels, which the moving tissue deforms from
frame to frame, so some 30 to 60 independent grains per 8×8×2 tubelet against its 10 bits.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .metrics import reconstruction_metrics
from .simulate.paired import simulate_pair
from .training import progress


def noise_draws(seed: int, frames: int, size: int, draws: int, speckle: bool = False) -> np.ndarray:
    """(draws, T, H, W) float32 in [0, 1]: one simulator clip under `draws` noise draws
    (and speckle patterns, with `speckle`)."""
    clips = [simulate_pair(seed, size=size, frames=frames, fresh_noise_seed=k, fresh_speckle_seed=k if speckle else None)["video"]
             for k in range(draws)]
    return np.stack(clips).astype(np.float32) / 255.0


def noise_floor(seeds: Sequence[int], frames: int, size: int, draws: int = 8, speckle: bool = False) -> dict[str, Any]:
    """The floor figures of the module docstring, averaged over the clips `seeds`."""
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    variance = 0.0
    oracle: dict[str, float] = {}
    for seed in progress(seeds, total=len(seeds), desc="speckle floor" if speckle else "noise floor"):
        clips = noise_draws(seed, frames, size, draws, speckle)
        variance += float(clips.var(axis=0, ddof=1).mean())
        others = (clips.sum(axis=0, keepdims=True) - clips) / (draws - 1)
        metrics = reconstruction_metrics(torch.from_numpy(others)[:, None], torch.from_numpy(clips)[:, None])
        for name, values in metrics.items():
            oracle[name] = oracle.get(name, 0.0) + float(values.mean())
    n = len(seeds)
    return {"clips": n, "draws": draws, "redrawn": "noise and speckle" if speckle else "noise", "mse": variance / n, "oracle": {k: v / n for k, v in oracle.items()}}
