"""Image and video reconstruction metrics: MSE, MAE, PSNR, SSIM, codebook usage.

Pixels are in [0, 1]. SSIM follows Wang et al. 2004: 11×11 Gaussian window (σ = 1.5),
C1 = (0.01)², C2 = (0.03)², computed per 2-D frame over the valid region and averaged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, radius: int | None = None, device: torch.device | None = None) -> Tensor:
    radius = radius if radius is not None else max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable(images: Tensor, kernel: Tensor, padding: str) -> Tensor:
    """Filter (N, C, H, W) with a separable kernel, channel by channel."""
    c = images.shape[1]
    k = kernel.to(images.dtype)
    kh = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    if padding == "reflect":
        r = k.numel() // 2
        images = F.pad(images, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(images, kh, groups=c), kw, groups=c)


def ssim(x: Tensor, y: Tensor, reduce: bool = True) -> Tensor:
    """SSIM of images (N, C, H, W) in [0, 1]; mean over everything, or per image when reduce=False."""
    kernel = gaussian_kernel1d(1.5, radius=5, device=x.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _separable(x, kernel, "valid"), _separable(y, kernel, "valid")
    xx = _separable(x * x, kernel, "valid") - mu_x**2
    yy = _separable(y * y, kernel, "valid") - mu_y**2
    xy = _separable(x * y, kernel, "valid") - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (xx + yy + c2))
    return s.mean() if reduce else s.flatten(1).mean(1)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Spatial Gaussian blur of (N, C, H, W), reflect padding."""
    return _separable(images, gaussian_kernel1d(sigma, device=images.device), "reflect")


def video_frames(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B·T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def reconstruction_metrics(recon: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-clip MSE, MAE, PSNR (dB) and SSIM of videos (B, C, T, H, W) in [0, 1]; recon is clamped."""
    recon = recon.clamp(0, 1)
    b = target.shape[0]
    mse = (recon - target).pow(2).flatten(1).mean(1)
    mae = (recon - target).abs().flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-12))
    s = ssim(video_frames(recon), video_frames(target), reduce=False).view(b, -1).mean(1)
    return {"mse": mse, "mae": mae, "psnr": psnr, "ssim": s}


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and perplexity (exp of the entropy of the code histogram)."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}
