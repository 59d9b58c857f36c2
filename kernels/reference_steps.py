"""Torch references of the fused decode steps: the CPU path, and the oracle for the CuPy kernels.

One MaskGIT step, split the way the GPU kernels split it (`core/sampler.py` has the same
math as one function):

    guided  = null + s · (cond − null)                      classifier-free guidance
    sampled = argmax(guided + τ_t · Gumbel)                 (known tokens keep their id)
    conf    = log_softmax(guided)[sampled] + ν_t · Gumbel    (known tokens: +inf)
    remask  = stable_rank(conf) < n_t                       the n_t least confident

Randomness is counter-based: every Gumbel draw is a hash of (row seed, step, stream,
element index), so a row's noise depends on its own seed only, never on which other rows
share its batch or on the order of launches. That is what lets one batched replay serve
many devices and still give each device the tokens it would get alone, and what lets a
CUDA graph replay with new seeds written into a device tensor. The CUDA kernels in
`kernels/cupy_kernels.py` compute the same hash bit for bit.

Arithmetic is written as separate tensor ops (no fused multiply-add), and the kernels use
round-to-nearest intrinsics in the same order, so the sampled ids agree exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE_STREAM = 0      # Gumbel noise of the token sampling
CONFIDENCE_STREAM = 1  # Gumbel noise of the remasking confidence

# lowbias32 multipliers (Wellons' integer hash); the second as its int32 two's-complement value
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
_U24 = 1.0 / (1 << 24)


# counter-based noise


def _logical_shift(x: Tensor, bits: int, out: Tensor) -> Tensor:
    """x >> bits as an unsigned 32-bit shift (int32 shifts are arithmetic, so mask the sign copies)."""
    torch.bitwise_right_shift(x, bits, out=out)
    return out.bitwise_and_((1 << (32 - bits)) - 1)


def _lowbias32_(x: Tensor) -> Tensor:
    """lowbias32 in place on int32 bits (wrapping multiply); in place because on CPU the
    allocations of the plain form cost twice the arithmetic."""
    tmp = torch.empty_like(x)
    x ^= _logical_shift(x, 16, tmp)
    x *= _MUL1
    x ^= _logical_shift(x, 15, tmp)
    x *= _MUL2
    x ^= _logical_shift(x, 16, tmp)
    return x


def lowbias32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (bijective; Wellons' lowbias32) of int32 tensors holding the bits."""
    if x.dtype != torch.int32:
        raise TypeError("lowbias32 works on int32 bit patterns")
    return _lowbias32_(x.clone())


def _low32(x: Tensor) -> Tensor:
    """int64 -> int32 with the same low 32 bits."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def row_keys(seeds: Tensor, step: int, stream: int) -> Tensor:
    """(B,) int64 seeds -> (B,) int32 keys for one step and noise stream."""
    lo, hi = _low32(seeds), _low32(seeds >> 32)
    tag = lowbias32(torch.full_like(lo, step * 2 + stream + 1))
    return lowbias32(lo ^ lowbias32(hi ^ tag))


def hash_gumbel(keys: Tensor, index: Tensor | int) -> Tensor:
    """Standard Gumbel noise (B, M) from each row's key and element indices: `index` is an
    int (elements 0..index-1 of every row) or an int32 tensor (M,) or (B, M)."""
    if isinstance(index, int):
        index = torch.arange(index, dtype=torch.int32, device=keys.device)
    bits = _lowbias32_(keys[:, None] ^ index)
    u = _logical_shift(bits, 8, bits).float().add_(0.5).mul_(_U24)  # in (0, 1), exact in float32
    return u.log_().neg_().log_().neg_()  # -log(-log(u)), in place


# the step, with explicit noise (the sampler's math)


def guided_logits(logits2: Tensor, cond_scale: Tensor) -> Tensor:
    """(2B, N, V) conditional then null logits -> (B, N, V) guided logits, float32."""
    cond, null = logits2.float().chunk(2)
    return (cond - null).mul_(cond_scale).add_(null)  # null + s·(cond − null), one temporary


def sample_with_noise(
    guided: Tensor, ids: Tensor, unknown: Tensor, temperature: Tensor, gumbel: Tensor
) -> Tensor:
    """Gumbel-max sampling; known tokens keep their id. (B, N, V) -> (B, N) long."""
    sampled = (guided + temperature * gumbel).argmax(-1)
    return torch.where(unknown, sampled, ids)


def log_prob_confidence(guided: Tensor, sampled: Tensor) -> Tensor:
    """log p(sampled) under the guided distribution: (B, N)."""
    return guided.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)


def noisy_confidence(conf: Tensor, unknown: Tensor, noise: Tensor, gumbel: Tensor) -> Tensor:
    """Annealed noise on the confidence; known tokens get +inf so they are never re-masked."""
    conf = conf + noise * gumbel
    return torch.where(unknown, conf, torch.full_like(conf, math.inf))


def stable_rank(scores: Tensor) -> Tensor:
    """Rank along the last axis, 0 = smallest, ties broken by position (what the kernel's sort does)."""
    return scores.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)


def remask(conf: Tensor, sampled: Tensor, n_masked: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Re-mask the `n_masked` least confident tokens. Returns (ids, unknown)."""
    again = stable_rank(conf) < n_masked
    return torch.where(again, torch.full_like(sampled, mask_id), sampled), again


def remasked_positions(conf: Tensor, n_masked: int) -> Tensor:
    """Positions (B, n_masked) of the tokens `remask` re-masks, least confident first (ties by
    position): the remask kernel's optional output, the next step's unknown tokens."""
    return conf.argsort(dim=-1, stable=True)[:, :n_masked]


# the step, with counter-based noise (what the resident generator and the kernels run)


def sample_confidence(
    logits2: Tensor,
    ids: Tensor,
    unknown: Tensor,
    seeds: Tensor,
    cond_scale: Tensor,
    temperature: Tensor,
    noise: Tensor,
    step: int,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of the first fused kernel. Returns (sampled ids, noisy confidence, guided logits).

    `temperature`, `noise` are the step's 0-d values; `seeds` (B,) int64 one per row.
    `positions` (B, U): logits2 holds only these tokens (2B, U, V), and the outputs are
    theirs (B, U); their noise is the noise those positions get in a full pass."""
    guided = guided_logits(logits2, cond_scale)
    b, u, v = guided.shape
    if positions is None:
        index: Tensor | int = u * v
        token_index: Tensor | int = u
    else:
        pos = positions.to(torch.int32)
        index = (pos[..., None] * v + torch.arange(v, dtype=torch.int32, device=pos.device)).view(b, u * v)
        token_index = pos
        ids, unknown = ids.gather(1, positions), unknown.gather(1, positions)
    g_sample = hash_gumbel(row_keys(seeds, step, SAMPLE_STREAM), index).view(b, u, v)
    scores = g_sample.mul_(temperature).add_(guided)  # guided + τ·gumbel, in place
    sampled = torch.where(unknown, scores.argmax(-1), ids)
    g_conf = hash_gumbel(row_keys(seeds, step, CONFIDENCE_STREAM), token_index)
    conf = noisy_confidence(log_prob_confidence(guided, sampled), unknown, noise, g_conf)
    return sampled, conf, guided


def critic_confidence(critic_logits: Tensor, unknown: Tensor, seeds: Tensor, noise: Tensor, step: int) -> Tensor:
    """Confidence from a token critic's "real" logits instead of the log-probability."""
    g_conf = hash_gumbel(row_keys(seeds, step, CONFIDENCE_STREAM), critic_logits.shape[-1])
    return noisy_confidence(critic_logits.float(), unknown, noise, g_conf)


# token and pixel conversions


def lfq_codes(indices: Tensor, bits: int, scale: float = 1.0) -> Tensor:
    """Reference of the LFQ kernel: (...) indices -> (..., bits) ±scale float32, most significant bit first."""
    powers = 2 ** torch.arange(bits - 1, -1, -1, device=indices.device)
    on = (indices.long()[..., None] // powers) % 2
    return (on * 2 - 1).float() * scale


def frames_uint8(video: Tensor) -> Tensor:
    """Reference of the frames kernel: decoder video (B, 1, T, H, W) in [0, 1] -> frames 1..T-1
    as uint8 (B, T-1, H, W), clipped and rounded half to even (frame 0 is the prime)."""
    return (video[:, 0, 1:].float().clamp(0, 1) * 255).round().to(torch.uint8)
