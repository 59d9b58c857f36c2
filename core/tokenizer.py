"""C-ViViT video tokenizer: causal spatio-temporal transformer encoder/decoder around LFQ.

Video convention: float tensors of shape (B, C, T, H, W) with pixels in [0, 1]
(`from_uint8` / `to_uint8` convert from and to uint8 frames). The model works in
[-1, 1] inside. T must be 1 + k·temporal_patch: frame 0 is patched alone (p×p), the
following frames as tubelets of temporal_patch×p×p. Token grid (t, h, w) with
t = 1 + k: token step 0 is frame 0, step j ≥ 1 is frames (j−1)·tp + 1 … j·tp.

Encoder: patch embeddings → spatial transformer (per token step, all positions) →
temporal transformer (per patch position, causal over steps) → linear to K bits →
RMS normalisation → LFQ. The decoder mirrors it: bits → linear → causal temporal →
spatial → linear back to pixels. Spatial positions are learned, temporal positions are
the fixed sinusoid of the step index; neither mixes content across steps, so tokens (and
decoded frames) of step j depend only on steps ≤ j. A clip shorter than the preset's
(e.g. the first frame alone) encodes to the same tokens as the same frames at the start
of a full clip.

With `refine_width` > 0 the linear head also emits a few feature channels per pixel and
a small per-frame conv stack adds a correction: the linear head alone paints each 8×8
patch on its own and leaves seams at patch edges; the convs see across them. It works
frame by frame, so causality holds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_preset, load_module, load_tensors, model_paths, save_model
from .config import Preset, TokenizerConfig
from .layers import LayerNorm, Transformer, sinusoidal_embedding
from .quantize import LFQ, LFQOutput

# The modules after the quantizer. The encoder side (everything else) alone decides the
# tokens: decoder-only training leaves it frozen, and a transformer is tied to its digest.
DECODER_PARTS = ("from_bits", "decoder", "unembed", "refiner")

# helpers


def from_uint8(frames: Tensor | np.ndarray) -> Tensor:
    """uint8 frames (T, H, W), (B, T, H, W) or (B, C, T, H, W) -> float video (B, C, T, H, W) in [0, 1]."""
    video = torch.as_tensor(frames)
    if video.ndim == 3:
        video = video[None, None]
    elif video.ndim == 4:
        video = video[:, None]
    elif video.ndim != 5:
        raise ValueError(f"expected 3, 4 or 5 dims, got shape {tuple(video.shape)}")
    return video.float() / 255.0


def to_uint8(video: Tensor) -> Tensor:
    """Float video in [0, 1] (any shape) -> uint8, clamped and rounded."""
    return (video.detach().clamp(0, 1) * 255).round().to(torch.uint8)


# patching


class PatchEmbed(nn.Module):
    """Frame 0 as p×p patches, later frames as tp×p×p tubelets, each projected to `dim`."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        c, p, tp = config.channels, config.patch, config.temporal_patch
        self.p, self.tp = p, tp
        self.first = nn.Sequential(nn.Linear(c * p * p, config.dim), LayerNorm(config.dim))
        self.rest = nn.Sequential(nn.Linear(c * tp * p * p, config.dim), LayerNorm(config.dim))

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, t, h, w, dim)."""
        b, c, frames, height, width = video.shape
        p, tp = self.p, self.tp
        h, w = height // p, width // p
        first = video[:, :, :1].reshape(b, c, 1, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, 1, h, w, -1)
        tokens = [self.first(first)]
        if frames > 1:
            k = (frames - 1) // tp
            rest = video[:, :, 1:].reshape(b, c, k, tp, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, k, h, w, -1)
            tokens.append(self.rest(rest))
        return torch.cat(tokens, dim=1)


class PatchUnembed(nn.Module):
    """Inverse of PatchEmbed: (B, t, h, w, dim) -> (B, C', T, H, W), C' = C (+ refiner features)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        p, tp = config.patch, config.temporal_patch
        c = config.channels + (config.refine_features if config.refine_width else 0)
        self.c, self.p, self.tp = c, p, tp
        self.first = nn.Linear(config.dim, c * p * p)
        self.rest = nn.Linear(config.dim, c * tp * p * p)

    def forward(self, x: Tensor) -> Tensor:
        b, t, h, w, _ = x.shape
        c, p, tp = self.c, self.p, self.tp
        first = self.first(x[:, :1]).reshape(b, 1, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        frames = [first.reshape(b, c, 1, h * p, w * p)]
        if t > 1:
            rest = self.rest(x[:, 1:]).reshape(b, t - 1, h, w, c, tp, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
            frames.append(rest.reshape(b, c, (t - 1) * tp, h * p, w * p))
        return torch.cat(frames, dim=2)

    def last_layer_weights(self) -> list[Tensor]:
        return [self.first.weight, self.rest.weight]


class FrameRefiner(nn.Module):
    """Per-frame conv stack: (B, C + F, T, H, W) -> correction (B, C, T, H, W).

    Its last conv starts at zero, so a refiner grafted onto a trained linear head starts
    out returning exactly that head's frames."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        c, width = config.channels, config.refine_width
        layers: list[nn.Module] = [nn.Conv2d(c + config.refine_features, width, 3, padding=1), nn.GELU()]
        for _ in range(config.refine_depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(width, c, 3, padding=1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        # channels-last convs run 2-3x faster on CPU (oneDNN) and suit cuDNN as well
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)
        out = self.net(frames)
        return out.reshape(b, t, -1, h, w).transpose(1, 2)


# spatio-temporal stack


class SpaceTime(nn.Module):
    """Spatial transformer per step and causal temporal transformer per position, in a given order."""

    def __init__(self, config: TokenizerConfig, temporal_first: bool) -> None:
        super().__init__()
        d = config.dim
        side = config.image_size // config.patch
        self.temporal_first = temporal_first
        self.spatial_pos = nn.Parameter(torch.randn(side * side, d) * 0.02)
        self.spatial = Transformer(d, config.spatial_depth, config.heads, config.dim_head, config.ff_mult)
        self.temporal = Transformer(d, config.temporal_depth, config.heads, config.dim_head, config.ff_mult, causal=True)

    def run_spatial(self, x: Tensor) -> Tensor:
        b, t, h, w, d = x.shape
        x = x.reshape(b * t, h * w, d) + self.spatial_pos
        return self.spatial(x).reshape(b, t, h, w, d)

    def run_temporal(self, x: Tensor) -> Tensor:
        b, t, h, w, d = x.shape
        pos = sinusoidal_embedding(torch.arange(t, device=x.device), d).to(x.dtype)  # (t, d)
        x = x.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d) + pos
        return self.temporal(x).reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal_first:
            return self.run_spatial(self.run_temporal(x))
        return self.run_temporal(self.run_spatial(x))


# the tokenizer


@dataclass
class TokenizerLoss:
    recon: Tensor           # reconstructed video, (B, C, T, H, W) in [0, 1] (not clamped)
    mse: Tensor             # mean squared error in [0, 1] pixel units
    lfq: LFQOutput
    total: Tensor           # mse + lfq.loss; perceptual and GAN terms are added by the trainer


class CViViT(nn.Module):
    def __init__(self, config: TokenizerConfig, lfq_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = PatchEmbed(config)
        self.encoder = SpaceTime(config, temporal_first=False)
        self.to_bits = nn.Linear(config.dim, config.lfq_bits)
        self.quantizer = LFQ(config.lfq_bits, **(lfq_options or {}))
        self.from_bits = nn.Linear(config.lfq_bits, config.dim)
        self.decoder = SpaceTime(config, temporal_first=True)
        self.unembed = PatchUnembed(config)
        self.refiner = FrameRefiner(config) if config.refine_width else None

    def _check(self, video: Tensor) -> None:
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.channels or tuple(video.shape[-2:]) != (cfg.image_size,) * 2:
            raise ValueError(f"expected video (B, {cfg.channels}, T, {cfg.image_size}, {cfg.image_size}), got {tuple(video.shape)}")
        if not video.is_floating_point():  # uint8 * 2 - 1 would wrap around before any layer noticed
            raise ValueError(f"expected a float video in [0, 1], got {video.dtype} (from_uint8 converts uint8 frames)")
        frames = video.shape[2]
        if (frames - 1) % cfg.temporal_patch or frames > cfg.frames:
            raise ValueError(f"T must be 1 + k·{cfg.temporal_patch} and at most {cfg.frames}, got {frames}")

    def latents(self, video: Tensor) -> Tensor:
        """Video (B, C, T, H, W) in [0, 1] -> continuous pre-quantization latents (B, t, h, w, K)."""
        self._check(video)
        x = self.encoder(self.embed(video * 2 - 1))
        z = self.to_bits(x)
        # RMS-normalise per token (no mean removal: that would forbid all-same-sign codes)
        return F.normalize(z, dim=-1) * z.shape[-1] ** 0.5

    def encode(self, video: Tensor) -> Tensor:
        """Video -> token indices (B, t, h, w), long."""
        return self.quantizer.encode(self.latents(video))

    def _check_codes(self, codes: Tensor) -> None:
        t, h, w = self.config.token_grid
        k = self.config.lfq_bits
        if codes.ndim != 5 or tuple(codes.shape[2:]) != (h, w, k) or not 1 <= codes.shape[1] <= t:
            raise ValueError(f"expected codes (B, t <= {t}, {h}, {w}, {k}), got {tuple(codes.shape)}"
                             " (decode_indices takes token indices (B, t, h, w))")

    def decode(self, codes: Tensor) -> Tensor:
        """±1 codes (B, t, h, w, K) -> video (B, C, T, H, W) in [0, 1] (unclamped)."""
        self._check_codes(codes)
        x = self.unembed(self.decoder(self.from_bits(codes)))
        if self.refiner is not None:
            x = x[:, : self.config.channels] + self.refiner(x)
        return (x + 1) / 2

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Token indices (B, t, h, w) -> video (B, C, T, H, W) in [0, 1] (unclamped)."""
        return self.decode(self.quantizer.indices_to_codes(indices, dtype=self.from_bits.weight.dtype))

    def loss(self, video: Tensor, frozen_encoder: bool = False) -> TokenizerLoss:
        """Training forward: reconstruct through the straight-through quantizer.
        `frozen_encoder`: no graph through the encoder side (decoder-only training)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
            quantized = self.quantizer(self.latents(video))
        recon = self.decode(quantized.codes)
        mse = F.mse_loss(recon, video)
        return TokenizerLoss(recon=recon, mse=mse, lfq=quantized, total=mse + quantized.loss)

    def last_layer_weights(self) -> list[Tensor]:
        """The decoder's output layer(s): where the adaptive GAN weight is measured."""
        if self.refiner is not None:
            return [self.refiner.net[-1].weight]
        return self.unembed.last_layer_weights()

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Everything after the quantizer: training these alone leaves every token unchanged."""
        parts = (getattr(self, name) for name in DECODER_PARTS)
        return [p for part in parts if part is not None for p in part.parameters()]

    def inherit(self, base: "CViViT") -> None:
        """Copy a trained tokenizer's weights into this one, whose config may differ from the
        base's by the refiner alone: the patch head's leading (pixel) rows are the base's,
        the extra feature rows keep their fresh init, the refiner its zero output."""
        own = self.state_dict()
        for name, tensor in base.state_dict().items():
            if name not in own:
                raise ValueError(f"cannot inherit {name!r}: the base tokenizer has a part this one lacks")
            target = own[name]
            if target.shape == tensor.shape:
                target.copy_(tensor)
            elif name.startswith("unembed.") and target.shape[1:] == tensor.shape[1:] and target.shape[0] > tensor.shape[0]:
                target[: tensor.shape[0]].copy_(tensor)
            else:
                raise ValueError(f"cannot inherit {name!r}: shape {tuple(tensor.shape)} vs {tuple(target.shape)}")


def token_space_sha256(weights: str | Path) -> str:
    """Hex SHA-256 of a tokenizer file's encoder-side tensors (names, shapes, fp16 values):
    two files with the same digest turn every clip into the same tokens, whatever their
    decoders. fp16 because that is how tokenizers ship; an fp32 file hashes the same as its
    fp16 export."""
    tensors = load_tensors(weights)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if name.split(".", 1)[0] in DECODER_PARTS:
            continue
        t = tensors[name]
        t = t.to(torch.float16) if t.is_floating_point() else t
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# checkpoints


def save_tokenizer(model: CViViT, preset: Preset, directory: str | Path, name: str = "tokenizer", dtype: torch.dtype | None = None, **meta: Any) -> None:
    """DIR/NAME.safetensors + DIR/NAME.json with the full preset (and `meta`, e.g. the step)."""
    save_model(directory, name, model, {"kind": "tokenizer", "preset": preset.to_dict(), **meta}, dtype=dtype)


def load_tokenizer(directory: str | Path, name: str = "tokenizer", device: str | torch.device = "cpu") -> tuple[CViViT, Preset]:
    """Build the tokenizer its JSON describes and load its weights (float32, eval mode)."""
    weights, config_path = model_paths(directory, name)
    preset = load_preset(config_path, "tokenizer")
    model = CViViT(preset.tokenizer)
    load_module(model, weights)
    return model.to(device).eval(), preset
