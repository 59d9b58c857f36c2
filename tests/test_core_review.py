"""Review of today's core changes: each test here failed before its fix.

- The token critic's training batch pairs a row's hidden tokens with the temperature of
  the decoding step that hides that many, and hides no fewer than any step does.
"""
from __future__ import annotations

import math

import pytest
import torch

from echopulse.core import critic as critic_module
from echopulse.core.critic import critic_batch
from echopulse.core.sampler import make_schedule

from _generator_fixtures import ecg_batch, features, small_parts


# the token critic's training batch


def _critic_inputs(b: int):
    p, enc, model = small_parts(0)
    ecg = features(enc, *ecg_batch(p, b=b, seed=1))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.codebook_size, (b, model.num_tokens), generator=g)
    ref = torch.randint(0, model.codebook_size, (b, model.num_tokens), generator=g)
    return model, ecg, ids, torch.full((b,), 0.8), ref, torch.ones(b, dtype=torch.bool)


def _temperature_probe(model, monkeypatch: pytest.MonkeyPatch) -> float:
    """Make every sampled id read out the temperature it was drawn at: logits −a·v² and
    'Gumbel noise' v give the score −a·v² + τ·v, largest at the id nearest τ / 2a.
    Returns 2a: the temperature one id stands for."""
    v = model.codebook_size
    step = 2.0 * model.cfg.temperature / (v - 2)
    ladder = torch.arange(v, dtype=torch.float32)

    def logits(ids, context2, scale):
        return (-(step / 2) * ladder**2).expand(*ids.shape, v).clone()

    monkeypatch.setattr(model, "forward_with_cond_scale", logits)
    monkeypatch.setattr(critic_module, "gumbel_noise", lambda like, generator: ladder.expand_as(like).clone())
    return step


def test_critic_samples_at_the_temperature_of_the_step_that_hides_as_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding's step s starts with cos(π/2·s/T) of the tokens hidden and samples at
    τ·(1 − s/T). The batch drew its temperature as τ·(1 − u·(1 − 1/T)) for a row hiding
    cos(π/2·u): hotter than decoding at every step after the first (at T = 4 and
    u = 3/4, 0.39 for decoding's 0.225)."""
    model, ecg, ids, rr, ref, ref_valid = _critic_inputs(256)
    step = _temperature_probe(model, monkeypatch)
    tau, steps = model.cfg.temperature, model.cfg.steps
    generated = model.num_tokens - model.prime_tokens
    batch = critic_batch(model, ids, ecg, rr, ref, ref_valid, torch.Generator().manual_seed(3))
    for row in range(ids.shape[0]):
        hidden = int(batch.target[row].sum())
        temperature = float(batch.filled[row][batch.target[row]].float().mean()) * step
        # the schedule points hiding exactly this many: u in (u_lo, u_hi]
        u_lo = 2 / math.pi * math.acos(min(hidden / generated, 1.0))
        u_hi = 2 / math.pi * math.acos(min((hidden - 1) / generated, 1.0))
        assert tau * (1 - u_hi) - step <= temperature <= tau * (1 - u_lo) + step, (row, hidden, temperature)


def test_critic_hides_no_fewer_tokens_than_decoding_ever_does() -> None:
    """The last step still samples the tokens the step before it left hidden; a row with
    fewer hidden (the batch's progress ran to 1, one token left) is a state decoding
    never shows the critic."""
    model, ecg, ids, rr, ref, ref_valid = _critic_inputs(256)
    generated = model.num_tokens - model.prime_tokens
    schedule = make_schedule(model.cfg.steps, generated, 0.9, 0.0, 1.0)
    fewest = int(schedule.n_masked[-2])  # hidden when the last step starts
    with torch.no_grad():
        batch = critic_batch(model, ids, ecg, rr, ref, ref_valid, torch.Generator().manual_seed(3))
    assert int(batch.target.sum(-1).min()) >= fewest
