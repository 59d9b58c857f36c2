"""Tiny model dimensions shared by the ECG encoder / transformer / sampler / generator tests."""
from __future__ import annotations

import pytest

import torch

from echopulse.core.config import EcgEncoderConfig, Preset, TokenizerConfig, TransformerConfig
from echopulse.core.ecg_encoder import EcgEncoder
from echopulse.core.transformer import EcgFeatures, MaskedTransformer, build_transformer


def small_preset() -> Preset:
    """5 frames of 32x32 -> 3x4x4 = 48 tokens, 64 codes; dims of 32: milliseconds per forward."""
    return Preset(
        name="test",
        tokenizer=TokenizerConfig(frames=5, image_size=32, dim=32, spatial_depth=1, temporal_depth=1, heads=2, dim_head=16, lfq_bits=6),
        ecg=EcgEncoderConfig(dim=32, depth=1, heads=2, dim_head=16),
        transformer=TransformerConfig(dim=32, depth=1, heads=2, dim_head=16, steps=4),
    )


def small_parts(seed: int = 0) -> tuple[Preset, EcgEncoder, MaskedTransformer]:
    torch.manual_seed(seed)
    p = small_preset()
    return p, EcgEncoder(p.ecg).eval(), build_transformer(p).eval()


def ecg_batch(p: Preset, b: int = 2, leads: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    window = torch.randn(b, leads, p.ecg.window_samples, generator=g)
    valid = torch.ones(b, leads, p.ecg.window_samples, dtype=torch.bool)
    return window, valid, torch.arange(leads)


def features(encoder: EcgEncoder, window: torch.Tensor, valid: torch.Tensor, leads: torch.Tensor) -> EcgFeatures:
    return EcgFeatures(*encoder.encode(window, valid, leads))


@pytest.fixture
def one_thread():
    """Training tests share 2 cores with everything else: one thread, restored afterwards
    (and one thread makes a run's arithmetic the same from run to run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resident_requests(res, count: int, seed: int = 0, priming: str = "loop") -> list:
    """BeatRequests for a ResidentGenerator. Row 0 has a whole ECG window, later rows lose
    its end: one row alone runs the "dense" key layout when loop-primed, several the
    "masked" one; image priming "no_ref"."""
    import numpy as np

    from echopulse.core.resident import BeatRequest

    rng = np.random.default_rng(seed)
    size, n = res.preset.tokenizer.image_size, res.preset.ecg.window_samples
    out = []
    for i in range(count):
        loop = rng.integers(0, 256, (res.preset.tokenizer.frames, size, size), dtype=np.uint8)
        state = res.prime_loop(loop, seed=i) if priming == "loop" else res.prime_image(loop[-1], seed=i)
        valid = np.arange(n) < n - 37 * i
        out.append(BeatRequest(state, rng.standard_normal((1, n)).astype(np.float32), valid, 0.8 + 0.05 * i, 0.0, seed=1000 + i))
    return out
