"""Model presets: one dataclass per model, named presets, saved beside every checkpoint.

A preset fixes the geometry every part must agree on (video size, token grid, codebook,
ECG window); the training recipe lives with the training code, not here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TokenizerConfig:
    """C-ViViT video tokenizer with lookup-free quantization."""

    frames: int = 11            # clip length; frame 0 is patched alone, the rest as tubelets
    image_size: int = 64        # square frames, one channel
    channels: int = 1
    patch: int = 8              # spatial patch (pixels)
    temporal_patch: int = 2     # frames per tubelet after the first frame
    dim: int = 128              # transformer width
    spatial_depth: int = 2      # spatial layers (per frame), encoder and decoder each
    temporal_depth: int = 2     # causal temporal layers (per patch position)
    heads: int = 4
    dim_head: int = 32
    ff_mult: int = 4
    lfq_bits: int = 10          # codebook size is 2**lfq_bits
    refine_width: int = 0       # > 0: per-frame conv refiner after the patch projection (0 = the paper's linear head)
    refine_depth: int = 3       # conv layers in the refiner
    refine_features: int = 8    # extra feature channels per pixel the patch projection hands the refiner

    def __post_init__(self) -> None:
        if (self.frames - 1) % self.temporal_patch:
            raise ValueError("frames - 1 must be a multiple of temporal_patch")
        if self.image_size % self.patch:
            raise ValueError("image_size must be a multiple of patch")
        if self.refine_width and self.refine_depth < 2:
            raise ValueError("refine_depth must be at least 2 when the refiner is on")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(t, h, w) of the token grid: the first frame alone, then one step per tubelet."""
        side = self.image_size // self.patch
        return (1 + (self.frames - 1) // self.temporal_patch, side, side)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    @property
    def codebook_size(self) -> int:
        return 2 ** self.lfq_bits


@dataclass
class EcgEncoderConfig:
    """ST-MEM-style ECG patch encoder. Input is resampled to `fs` on the way in.

    A beat's window starts `pre_r_s` before its R peak and lasts `window_s`; samples the
    stream has not delivered yet are padded and marked invalid (the transformer was
    trained with ECG masking, so missing patches are a case it knows).
    """

    fs: int = 250
    patch: int = 25             # samples per patch (0.1 s at 250 Hz)
    window_s: float = 2.5
    pre_r_s: float = 0.5
    max_leads: int = 12         # lead embeddings exist for 12 leads; a watch uses lead 0
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    ff_mult: int = 4
    mask_ratio: float = 0.75    # MAE pretraining

    def __post_init__(self) -> None:
        if self.window_samples % self.patch:
            raise ValueError("window_s * fs must be a multiple of patch")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.fs))

    @property
    def patches_per_lead(self) -> int:
        return self.window_samples // self.patch


@dataclass
class TransformerConfig:
    """Bidirectional masked video-token transformer with ECG cross-attention."""

    dim: int = 128                  # tiny: ~140 ms per beat for 6 CFG steps on 2 CPU cores
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    ff_mult: int = 4
    cond_drop_prob: float = 0.1     # classifier-free guidance: null condition in training
    ecg_mask_prob: float = 0.5      # chance a training sample has a span of ECG patches hidden
    ecg_mask_max: float = 0.4       # longest hidden span, as a fraction of the window
    ref_drop_prob: float = 0.5      # chance the reference loop is withheld in training
    steps: int = 6                  # MaskGIT decoding steps
    cfg_scale: float = 3.0          # 0: unconditional, 1: conditional, >1: guided
    temperature: float = 0.9        # sampling temperature, annealed linearly to τ/steps at the last step
    confidence_noise: float = 3.0   # Gumbel noise on remasking confidence, annealed to 0 at the last step


@dataclass
class Preset:
    name: str
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ecg: EcgEncoderConfig = field(default_factory=EcgEncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        return cls(
            name=data["name"],
            tokenizer=TokenizerConfig(**data.get("tokenizer", {})),
            ecg=EcgEncoderConfig(**data.get("ecg", {})),
            transformer=TransformerConfig(**data.get("transformer", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Preset":
        return cls.from_dict(json.loads(Path(path).read_text()))


def tiny() -> Preset:
    """11×64×64 → 6×8×8 tokens; small enough for real time on a 2-core CPU. Its decoder
    ends in the conv refiner (sharper, no patch seams); `paper` keeps the paper's linear head."""
    return Preset(name="tiny", tokenizer=TokenizerConfig(refine_width=32))


def paper() -> Preset:
    """The paper's geometry: 11×128×128 → 6×16×16 = 1536 tokens; GPU."""
    return Preset(
        name="paper",
        tokenizer=TokenizerConfig(
            image_size=128, dim=512, spatial_depth=4, temporal_depth=4, heads=8, dim_head=64, lfq_bits=13
        ),
        ecg=EcgEncoderConfig(patch=75, window_s=3.0, pre_r_s=0.6, dim=768, depth=12, heads=12, dim_head=64),
        transformer=TransformerConfig(dim=512, depth=6, heads=8, dim_head=64, steps=18),
    )


PRESETS = {"tiny": tiny, "paper": paper}


def preset(name: str) -> Preset:
    """A named preset; raises ValueError naming the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
