"""ST-MEM-style ECG encoder: per-lead patches, lead + time embeddings, a transformer,
and a masked-autoencoder pretraining head.

Written from the ST-MEM and ECHOPulse papers' descriptions. Differences from ST-MEM,
on purpose:
- the time embedding is a sinusoid of the patch's time in seconds relative to the
  beat's R peak (not a patch index), so the same embedding means the same cardiac
  moment whatever the window or patch size, and the transformer can line patches up
  with video frames;
- the output is one embedding per patch (never pooled to a single token);
- MAE masking replaces masked patches by a learned mask embedding instead of dropping
  them (SimMIM style), which keeps every shape static whatever the number of valid
  patches; no SEP tokens (the lead embedding already separates leads).

Any number of leads up to `max_leads` works: a watch ECG is one lead with lead id 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_preset, load_module, model_paths, save_model
from .config import EcgEncoderConfig, Preset
from .layers import Transformer, sinusoidal_embedding

TIME_UNIT_S = 0.01  # sinusoid positions are in 10 ms units: fastest channel resolves one patch


def patch_times(cfg: EcgEncoderConfig, device: torch.device | str = "cpu") -> Tensor:
    """Centre time (s, relative to R) of each patch of a lead: (patches_per_lead,)."""
    n = torch.arange(cfg.patches_per_lead, device=device, dtype=torch.float32)
    return -cfg.pre_r_s + (n + 0.5) * cfg.patch / cfg.fs


def time_embedding(seconds: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of times in seconds: (...,) -> (..., dim)."""
    return sinusoidal_embedding(seconds / TIME_UNIT_S, dim)


def normalize_leads(window: Tensor, valid: Tensor) -> Tensor:
    """Per lead, zero mean and unit variance over the valid samples; invalid samples are 0.

    Done here, inside the model, so every caller (streaming windows in mV, µV files,
    simulated data) feeds the encoder the same way; fixed shapes, no host sync. Invalid
    samples are zeroed first: NaN or inf padding times a zero weight would still be NaN.
    """
    window = window.masked_fill(~valid, 0.0)
    w = valid.to(window.dtype)
    count = w.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (window * w).sum(-1, keepdim=True) / count
    var = ((window - mean) ** 2 * w).sum(-1, keepdim=True) / count
    return (window - mean) * torch.rsqrt(var + 1e-6) * w


def attendable(key_mask: Tensor) -> Tensor:
    """A key mask with every row able to attend somewhere: an all-hidden row would give NaN,
    so such a row (a window with nothing valid) sees all its keys (zeros) instead."""
    return key_mask | ~key_mask.any(-1, keepdim=True)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` expands to `target` (trailing axes matched, 1 stretches)."""
    if len(shape) > len(target):
        return False
    for size, want in zip(shape[::-1], target[::-1]):  # a plain loop: torch.compile traces it as is
        if size != 1 and size != want:
            return False
    return True


class EcgEncoder(nn.Module):
    """(B, leads, samples) ECG window -> one embedding per (lead, patch)."""

    def __init__(self, cfg: EcgEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.to_patch = nn.Linear(cfg.patch, cfg.dim)
        self.lead_emb = nn.Embedding(cfg.max_leads, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, cfg.dim)
        self.mask_emb = nn.Parameter(torch.zeros(cfg.dim))
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult)
        # MAE head: a light decoder so the encoder's last layers need not specialise in pixels
        self.decoder = Transformer(cfg.dim, 1, cfg.heads, cfg.dim_head, cfg.ff_mult)
        self.to_samples = nn.Linear(cfg.dim, cfg.patch)
        nn.init.normal_(self.mask_emb, std=0.02)

    # shapes

    def patchify(self, window: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, S) samples and validity -> (B, L, N, patch) normalised patches, (B, L, N) patch validity.

        A patch is valid only when all its samples are: a half-delivered patch is hidden.
        """
        if window.ndim != 3:
            raise ValueError(f"ECG window must be (batch, leads, samples), got shape {tuple(window.shape)}")
        b, leads, s = window.shape
        n = self.cfg.patches_per_lead
        if s != n * self.cfg.patch:
            raise ValueError(f"ECG window has {s} samples, the encoder expects {n * self.cfg.patch}")
        if not _broadcasts(tuple(valid.shape), (b, leads, s)):
            raise ValueError(f"valid must broadcast to the window's {tuple(window.shape)}, got shape {tuple(valid.shape)}")
        valid = valid.expand(b, leads, s)
        window = normalize_leads(window, valid)
        patches = window.reshape(b, leads, n, self.cfg.patch)
        patch_valid = valid.reshape(b, leads, n, self.cfg.patch).all(-1)
        return patches, patch_valid

    def embed(self, patches: Tensor, lead_ids: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Patch embeddings with lead and time embeddings: (B, L, N, patch) -> (B, L·N, D).

        `hidden` (B, L, N) marks patches whose content is replaced by the mask embedding.
        """
        b, leads, n, _ = patches.shape
        # one id per lead: a single id would otherwise be broadcast over every lead unnoticed
        if lead_ids.ndim not in (1, 2) or not _broadcasts(tuple(lead_ids.shape), (b, leads)) or lead_ids.shape[-1] != leads:
            raise ValueError(f"lead_ids must be ({leads},) or ({b}, {leads}): one id per lead, got shape {tuple(lead_ids.shape)}")
        x = self.to_patch(patches)  # (B, L, N, D)
        if hidden is not None:
            x = torch.where(hidden[..., None], self.mask_emb.to(x.dtype), x)
        times = patch_times(self.cfg, patches.device)
        x = x + self.time_proj(time_embedding(times, self.cfg.dim))[None, None]
        x = x + self.lead_emb(lead_ids.expand(b, leads))[:, :, None, :]
        return x.reshape(b, leads * n, -1)

    # entry points

    def encode(self, window: Tensor, valid: Tensor, lead_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode an ECG window.

        window: (B, L, S) float, S = window_samples at `cfg.fs`, starting pre_r_s before R.
        valid: bool, broadcastable to (B, L, S); False where no sample was delivered.
        lead_ids: long (B, L) or (L,), which lead each row is (0 = lead I / a watch).
        Returns emb (B, L·N, D), patch_time (B, L·N) in seconds relative to R, and
        patch_valid (B, L·N). Invalid patches are still embedded (from zeros); the
        consumer hides them with the validity mask.
        """
        patches, patch_valid = self.patchify(window, valid)
        x = self.embed(patches, lead_ids)
        emb = self.transformer(x, key_mask=attendable(patch_valid.flatten(1)))
        b, leads, n = patch_valid.shape
        times = patch_times(self.cfg, window.device).repeat(leads).expand(b, leads * n)
        return emb, times, patch_valid.flatten(1)

    def mae_loss(self, window: Tensor, valid: Tensor, lead_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Masked-autoencoder loss: hide `mask_ratio` of the valid patches, reconstruct them (MSE)."""
        patches, patch_valid = self.patchify(window, valid)
        b, leads, n, _ = patches.shape
        noise = torch.rand(b, leads * n, generator=generator, device=window.device)
        noise = torch.where(patch_valid.flatten(1), noise, torch.full_like(noise, 2.0))  # invalid never chosen
        ranks = noise.argsort(-1).argsort(-1)
        n_hide = (patch_valid.flatten(1).sum(-1, keepdim=True) * self.cfg.mask_ratio).round().clamp(min=1)
        hidden = (ranks < n_hide) & patch_valid.flatten(1)
        x = self.embed(patches, lead_ids, hidden.reshape(b, leads, n))
        key_mask = attendable(patch_valid.flatten(1))
        h = self.decoder(self.transformer(x, key_mask=key_mask), key_mask=key_mask)
        recon = self.to_samples(h)  # (B, L·N, patch)
        err = F.mse_loss(recon, patches.flatten(1, 2), reduction="none").mean(-1)
        weight = hidden.float()
        return (err * weight).sum() / weight.sum().clamp(min=1.0)


# checkpoints


def save_ecg_encoder(model: EcgEncoder, preset: Preset, directory: str | Path, name: str = "ecg", **meta: Any) -> None:
    """DIR/NAME.safetensors + DIR/NAME.json with the full preset."""
    save_model(directory, name, model, {"kind": "ecg_encoder", "preset": preset.to_dict(), **meta})


def load_ecg_encoder(directory: str | Path, name: str = "ecg", device: str | torch.device = "cpu") -> tuple[EcgEncoder, Preset]:
    weights, config_path = model_paths(directory, name)
    preset = load_preset(config_path, "ecg_encoder")
    model = EcgEncoder(preset.ecg)
    load_module(model, weights)
    return model.to(device).eval(), preset
