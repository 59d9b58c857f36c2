"""Reconstruction quality and speed of a trained tokenizer on held-out clips.

Reported (pixels in [0, 1], means over clips): MSE, MAE, PSNR, SSIM; codebook usage
(fraction of the 2^K codes seen) and perplexity; encode and decode milliseconds per
clip (batched, after a warm-up). Beside them, low-pass references, the same metrics for
- Gaussian-blurred copies of the clips at several widths σ (pixels), and
- the token-grid copy: each frame averaged over the p×p patches and bilinearly
  upsampled (one 8-bit value per patch per frame: 16 bits per 2-frame tubelet, more
  than a 10-bit token holds);
- a transform code at the tokenizer's rate, given every advantage: the clip's K largest
  3D-DCT coefficients, kept exactly, their positions free, with K = the bits of the
  clip's tokens / 8 (as many 8-bit numbers as the tokens' bits would buy).
Speckle is random texture at the 1–2 pixel scale that a few bits per 128-pixel tubelet
cannot carry; these copies show how much error remains for a reconstruction that keeps
everything except that detail, or that spends the same bits on the best linear basis.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.fft import dctn, idctn

from .metrics import codebook_stats, gaussian_blur, reconstruction_metrics, video_frames
from .tokenizer import CViViT, to_uint8
from .video_clips import ClipSource, batch

LOWPASS_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_frame(video: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    b, c, t, h, w = video.shape
    return fn(video_frames(video)).view(b, t, c, h, w).transpose(1, 2)


def lowpass_copies(video: torch.Tensor, patch: int, dct_terms: int | None = None) -> dict[str, torch.Tensor]:
    """The references of the module docstring, by name (the DCT one when `dct_terms` is given)."""
    copies = {f"sigma_{s:g}": _per_frame(video, lambda f, s=s: gaussian_blur(f, s)) for s in LOWPASS_SIGMAS}
    copies["token_grid"] = _per_frame(
        video, lambda f: F.interpolate(F.avg_pool2d(f, patch), scale_factor=patch, mode="bilinear", align_corners=False)
    )
    if dct_terms:
        copies[f"dct_best_{dct_terms}"] = best_dct_terms(video, dct_terms)
    return copies


def best_dct_terms(video: torch.Tensor, terms: int) -> torch.Tensor:
    """Each clip (B, C, T, H, W) rebuilt from its `terms` largest orthonormal 3D-DCT
    coefficients: the best `terms`-term approximation in that basis (least squared error)."""
    clips = video.detach().cpu().double().numpy()
    out = np.empty_like(clips)
    for i, clip in enumerate(clips):
        coeffs = dctn(clip, axes=(-3, -2, -1), norm="ortho")
        keep = np.argsort(np.abs(coeffs), axis=None)[-terms:]
        kept = np.zeros_like(coeffs)
        kept.flat[keep] = coeffs.flat[keep]
        out[i] = idctn(kept, axes=(-3, -2, -1), norm="ortho")
    return torch.from_numpy(out).to(video.device, video.dtype)


@torch.inference_mode()
def evaluate_tokenizer(model: CViViT, source: ClipSource, seeds: Sequence[int], batch_size: int = 8) -> dict[str, Any]:
    """Metrics over the clips `seeds` of `source` (model in eval mode on its device)."""
    device = next(model.parameters()).device
    model.eval()
    sums: dict[str, float] = {}
    lowpass: dict[str, dict[str, float]] = {}
    all_indices = []
    encode_s = decode_s = 0.0
    model.decode_indices(model.encode(batch(source, seeds[:1], device)))  # warm-up
    dct_terms = model.config.num_tokens * model.config.lfq_bits // 8  # the clip's token bits as 8-bit numbers
    for start in range(0, len(seeds), batch_size):
        video = batch(source, seeds[start:start + batch_size], device)
        _sync(device)
        t0 = time.perf_counter()
        indices = model.encode(video)
        _sync(device)
        t1 = time.perf_counter()
        recon = model.decode_indices(indices)
        _sync(device)
        encode_s += t1 - t0
        decode_s += time.perf_counter() - t1
        all_indices.append(indices.cpu())
        for name, values in reconstruction_metrics(recon, video).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        for copy_name, copy in lowpass_copies(video, model.config.patch, dct_terms).items():
            totals = lowpass.setdefault(copy_name, {})
            for name, values in reconstruction_metrics(copy, video).items():
                totals[name] = totals.get(name, 0.0) + float(values.sum())
    n = len(seeds)
    codebook = codebook_stats(torch.cat(all_indices), model.config.codebook_size)
    return {
        "clips": n,
        **{name: total / n for name, total in sums.items()},
        "codebook_usage": codebook["usage"],
        "codebook_perplexity": codebook["perplexity"],
        "codebook_size": model.config.codebook_size,
        "encode_ms_per_clip": 1000 * encode_s / n,
        "decode_ms_per_clip": 1000 * decode_s / n,
        "batch_size": batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "lowpass_reference": {name: {k: v / n for k, v in m.items()} for name, m in lowpass.items()},
    }


@torch.inference_mode()
def comparison_png(model: CViViT, source: ClipSource, seeds: Sequence[int], path: str | Path, frames: Sequence[int] = (0, 2, 4, 6, 8, 10), scale: int = 2) -> None:
    """Rows: original and reconstruction of each clip (and |error|×4), columns: frames. Grey PNG."""
    device = next(model.parameters()).device
    video = batch(source, seeds, device)
    recon = model.decode_indices(model.encode(video)).clamp(0, 1)
    rows = []
    for i in range(len(seeds)):
        for v in (video[i, 0], recon[i, 0], ((recon[i, 0] - video[i, 0]).abs() * 4).clamp(0, 1)):
            tiles = [to_uint8(v[f]).cpu().numpy() for f in frames]
            gap = np.full((v.shape[-2], 2), 255, np.uint8)
            rows.append(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
        rows.append(np.full((4, rows[-1].shape[1]), 255, np.uint8))
    image = Image.fromarray(np.concatenate(rows[:-1], axis=0))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
