"""Sampler: precomputed schedule, reproducible under a seed, CFG live, no host sync."""
from __future__ import annotations

import math

import torch

from echopulse.core.critic import TokenCritic
from echopulse.core.sampler import decode, make_schedule
from echopulse.core.transformer import EcgFeatures

from _generator_fixtures import ecg_batch, features, small_parts


def _setup(b: int = 2):
    p, enc, model = small_parts(0)
    ecg = features(enc, *ecg_batch(p, b=b))
    rr = torch.full((b,), 0.8)
    ref = torch.zeros(b, model.num_tokens, dtype=torch.long)
    ref_valid = torch.zeros(b, dtype=torch.bool)
    ids = torch.full((b, model.num_tokens), model.mask_id)
    ids[:, : model.prime_tokens] = torch.arange(model.prime_tokens) % model.codebook_size
    return p, model, ecg, rr, ref, ref_valid, ids


def _run(model, ids, ctx2, steps, scale, seed, critic=None, critic_ctx=None):
    sched = make_schedule(steps, model.num_tokens - model.prime_tokens, 0.9, 3.0, scale)
    with torch.inference_mode():
        return decode(model, ids, ctx2, sched, torch.Generator().manual_seed(seed), critic, critic_ctx)


def test_schedule_is_precomputed_cosine_and_reaches_zero() -> None:
    s = make_schedule(8, 320, 0.9, 3.0, 3.0)
    assert s.n_masked.shape == s.temperature.shape == s.noise.shape == (8,)
    counts = s.n_masked.tolist()
    assert counts[-1] == 0 and all(a > b for a, b in zip([320] + counts, counts))
    assert counts[0] == math.floor(320 * math.cos(math.pi / 2 / 8))
    assert s.temperature[0] == 0.9 and (s.temperature.diff() < 0).all()
    assert s.noise[-1] == 0 and (s.noise.diff() <= 0).all()
    # more steps than tokens still fixes at least one token per step and ends at zero
    tight = make_schedule(6, 4, 1.0, 1.0, 1.0).n_masked.tolist()
    assert tight[-1] == 0 and all(b < a or b == 0 for a, b in zip([4] + tight, tight))


def test_decode_fills_everything_and_keeps_the_prime() -> None:
    _, model, ecg, rr, ref, ref_valid, ids = _setup()
    out = _run(model, ids, model.guidance_context(ecg, rr, ref, ref_valid), 4, 3.0, 0)
    assert out.shape == ids.shape and out.dtype == torch.long
    assert (out < model.codebook_size).all() and (out >= 0).all()
    assert out[:, : model.prime_tokens].equal(ids[:, : model.prime_tokens])


def test_seed_reproducible_and_seeds_differ() -> None:
    _, model, ecg, rr, ref, ref_valid, ids = _setup()
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    a = _run(model, ids, ctx2, 4, 3.0, 7)
    b = _run(model, ids, ctx2, 4, 3.0, 7)
    c = _run(model, ids, ctx2, 4, 3.0, 8)
    assert a.equal(b)
    assert not a.equal(c)


def test_guidance_scale_changes_the_samples() -> None:
    _, model, ecg, rr, ref, ref_valid, ids = _setup()
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    assert not _run(model, ids, ctx2, 4, 0.0, 1).equal(_run(model, ids, ctx2, 4, 3.0, 1))


def test_critic_remasking_runs() -> None:
    p, model, ecg, rr, ref, ref_valid, ids = _setup()
    torch.manual_seed(5)
    critic = TokenCritic(p.transformer, p.tokenizer, p.ecg.dim).eval()
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    with torch.inference_mode():
        critic_ctx = critic.condition(ecg, rr, ref, ref_valid)
    out = _run(model, ids, ctx2, 4, 3.0, 0, critic, critic_ctx)
    assert (out < model.codebook_size).all()
    assert not out.equal(_run(model, ids, ctx2, 4, 3.0, 0))


def test_whole_loop_runs_without_host_sync_or_dynamic_shapes() -> None:
    """On the meta device tensors have no data: `.item()`, Python `if tensor`, boolean
    indexing, `nonzero` or a data-dependent `topk` k all raise. The loop must not need them,
    which is what CUDA-graph capture requires too."""
    p, model, ecg, rr, ref, ref_valid, ids = _setup()
    meta = torch.device("meta")
    model = model.to(meta)
    ecg = EcgFeatures(*(x.to(meta) for x in ecg))
    ctx2 = model.guidance_context(ecg, rr.to(meta), ref.to(meta), ref_valid.to(meta))
    sched = make_schedule(4, model.num_tokens - model.prime_tokens, 0.9, 3.0, 3.0, meta)
    out = decode(model, ids.to(meta), ctx2, sched, generator=None)
    assert out.shape == ids.shape and out.device == meta
