"""MaskGIT iterative decoding with classifier-free guidance, written to be graph-capturable.

Every per-step number (how many tokens stay masked, the sampling temperature, the
confidence noise, the guidance scale) is computed once into tensors by
`make_schedule`; the loop then runs a fixed number of identical steps on fixed shapes:

    logits   = guided transformer pass (cond + null as one batch of 2B)
    sampled  = argmax(logits + τ_s · Gumbel)              (τ_s annealed; τ = 0 is greedy)
    conf     = log p(sampled)  or the critic's "real" logit, + ν_s · Gumbel
    keep the known tokens (conf = +inf), re-mask the n_s least confident by rank

No `.item()`, no Python branch on a tensor value, no `topk` with a changing k, no
boolean indexing: the same code captures into a CUDA graph (DESIGN §6) and runs on the
`meta` device (which refuses every data-dependent host operation; the tests use that).
Randomness comes only from the `torch.Generator` passed in, so a seed fixes the result.
One generator draws the whole batch's noise in one go, so a row's noise depends on the
batch it shares; a list of generators, one per row, gives each row the noise (and so
the tokens) it would get alone with its own generator.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from .transformer import Context, MaskedTransformer, random_ranks

# one generator for the whole batch, one per row (batch-independent), or torch's default
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class Schedule(NamedTuple):
    """Per-step values for a decode of `steps` steps (all on the model's device)."""

    n_masked: Tensor      # (T,) long: tokens still masked after step s (last is 0)
    temperature: Tensor   # (T,) sampling temperature at step s
    noise: Tensor         # (T,) scale of the Gumbel noise on the remasking confidence
    cond_scale: Tensor    # () classifier-free guidance scale


def make_schedule(
    steps: int,
    num_generated: int,
    temperature: float,
    confidence_noise: float,
    cond_scale: float,
    device: torch.device | str = "cpu",
) -> Schedule:
    """The cosine schedule and annealing, precomputed. At least one token is fixed per step."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    settings = {"temperature": temperature, "confidence_noise": confidence_noise, "cfg_scale": cond_scale}
    for name, value in settings.items():  # a NaN passes `< 0` and would turn every logit into NaN
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    counts = []
    previous = num_generated
    for s in range(steps):
        n = math.floor(num_generated * math.cos(0.5 * math.pi * (s + 1) / steps))
        n = max(0, min(n, previous - 1))
        counts.append(n)
        previous = n
    counts[-1] = 0
    progress = torch.arange(steps, dtype=torch.float32)
    return Schedule(
        n_masked=torch.tensor(counts, dtype=torch.long, device=device),
        temperature=(temperature * (steps - progress) / steps).to(device),
        noise=(confidence_noise * (1.0 - (progress + 1) / steps)).to(device),
        cond_scale=torch.tensor(float(cond_scale), device=device),
    )


def gumbel_noise(like: Tensor, generator: Generators) -> Tensor:
    """Standard Gumbel noise shaped like `like`, from `generator`: one for the whole tensor,
    or one per row of the first axis (row i's noise then comes from generator i alone)."""
    u = _uniform(like, generator).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u)).to(like.dtype)


def _uniform(like: Tensor, generator: Generators) -> Tensor:
    """U[0, 1) float32 shaped like `like`, from one generator or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]} rows: give one per row")
    # a batch of one draws exactly what one generator for the whole tensor draws
    return torch.stack([torch.rand(like.shape[1:], generator=g, device=like.device, dtype=torch.float32)
                        for g in generator])


def decode_step(
    model: MaskedTransformer,
    ids: Tensor,
    unknown: Tensor,
    context2: Context,
    n_masked: Tensor,
    temperature: Tensor,
    noise: Tensor,
    cond_scale: Tensor,
    generator: Generators = None,
    critic: MaskedTransformer | None = None,
    critic_context: Context | None = None,
) -> tuple[Tensor, Tensor]:
    """One MaskGIT step on tensors only. Returns the new ids (masked again where unsure) and
    the new unknown mask. `n_masked`, `temperature`, `noise`, `cond_scale` are 0-d tensors."""
    logits = model.forward_with_cond_scale(ids, context2, cond_scale).float()
    sampled = (logits + temperature * gumbel_noise(logits, generator)).argmax(-1)
    sampled = torch.where(unknown, sampled, ids)
    if critic is None:
        conf = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
    else:  # which critic is used is fixed per decoder, not a tensor-value branch
        conf = critic(sampled, critic_context).float()
    conf = conf + noise * gumbel_noise(conf, generator)
    conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
    # never more than the row's unknown tokens: a given token (+inf) must never be re-masked,
    # even when a row gives more than the prime and the schedule counts on fewer
    n_masked = torch.minimum(n_masked, unknown.sum(-1, keepdim=True))
    remask = random_ranks(conf) < n_masked
    return torch.where(remask, torch.full_like(sampled, model.mask_id), sampled), remask


def decode(
    model: MaskedTransformer,
    ids: Tensor,
    context2: Context,
    schedule: Schedule,
    generator: Generators = None,
    critic: MaskedTransformer | None = None,
    critic_context: Context | None = None,
) -> Tensor:
    """Fill every `mask_id` in `ids` (B, N). The given tokens (the prime frame) never change.

    `context2` comes from `model.guidance_context` (2B). The schedule is made for
    `num_generated` masked tokens per row (only the prime given); a row that gives more
    keeps them, and its steps fix what is left. `generator`: see `gumbel_noise`.
    """
    unknown = ids == model.mask_id
    for s in range(schedule.n_masked.shape[0]):
        ids, unknown = decode_step(
            model,
            ids,
            unknown,
            context2,
            schedule.n_masked[s],
            schedule.temperature[s],
            schedule.noise[s],
            schedule.cond_scale,
            generator,
            critic,
            critic_context,
        )
    return ids
