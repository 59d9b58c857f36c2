"""The torch references of the fused steps (kernels/reference_steps.py) against the sampler's own math."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echopulse.core.quantize import LFQ
from echopulse.core.sampler import decode_step, gumbel_noise, make_schedule
from echopulse.core.tokenizer import to_uint8
from echopulse.core.transformer import random_ranks
from echopulse.kernels import reference_steps as ref

from _generator_fixtures import ecg_batch, features, small_parts


def _lowbias32_python(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_matches_a_plain_python_lowbias32() -> None:
    values = np.random.default_rng(0).integers(0, 2**32, size=2000, dtype=np.uint64)
    values[:3] = [0, 2**31, 2**32 - 1]
    signed = torch.from_numpy(values.astype(np.int64)).to(torch.int64)
    signed = torch.where(signed >= 2**31, signed - 2**32, signed).to(torch.int32)
    got = ref.lowbias32(signed).to(torch.int64) & 0xFFFFFFFF
    assert got.tolist() == [_lowbias32_python(int(v)) for v in values]


def test_row_keys_depend_on_seed_step_and_stream_only() -> None:
    seeds = torch.tensor([0, 1, 2**40 + 1, -5])
    keys = {(s, st): ref.row_keys(seeds, s, st).tolist() for s in range(3) for st in (0, 1)}
    flat = [k for v in keys.values() for k in v]
    assert len(set(flat)) == len(flat)  # no collisions among these
    assert ref.row_keys(seeds[2:3], 1, 0).tolist() == [keys[(1, 0)][2]]  # a row's key ignores its neighbours


def test_hash_gumbel_is_standard_gumbel() -> None:
    g = ref.hash_gumbel(ref.row_keys(torch.tensor([7]), 0, 0), 200_000)[0].double()
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01          # Euler–Mascheroni
    assert abs(g.var().item() - np.pi**2 / 6) < 0.03


def test_reference_step_equals_the_sampler_step_given_the_same_noise() -> None:
    p, encoder, model = small_parts(seed=3)
    window, valid, leads = ecg_batch(p, b=2, seed=4)
    ecg = features(encoder, window, valid, leads)
    b, n = 2, model.num_tokens
    rr = torch.tensor([0.8, 1.0])
    ref_ids = torch.randint(0, model.codebook_size, (b, n))
    context2 = model.guidance_context(ecg, rr, ref_ids, torch.tensor([True, False]))
    sch = make_schedule(4, n - model.prime_tokens, 0.9, 3.0, 3.0)
    ids = torch.full((b, n), model.mask_id)
    ids[:, : model.prime_tokens] = torch.randint(0, model.codebook_size, (b, model.prime_tokens))
    ids[0, 20] = 5  # a known token outside the prime
    unknown = ids == model.mask_id
    with torch.inference_mode():
        for step in range(2):
            g = torch.Generator().manual_seed(11 + step)
            want_ids, want_unknown = decode_step(
                model, ids, unknown, context2, sch.n_masked[step], sch.temperature[step], sch.noise[step], sch.cond_scale, g
            )
            g = torch.Generator().manual_seed(11 + step)
            logits2 = model(torch.cat([ids, ids]), context2)
            guided = ref.guided_logits(logits2, sch.cond_scale)
            g_sample = gumbel_noise(guided, g)
            sampled = ref.sample_with_noise(guided, ids, unknown, sch.temperature[step], g_sample)
            conf = ref.log_prob_confidence(guided, sampled)
            conf = ref.noisy_confidence(conf, unknown, sch.noise[step], gumbel_noise(conf, g))
            got_ids, got_unknown = ref.remask(conf, sampled, sch.n_masked[step], model.mask_id)
            assert torch.equal(got_ids, want_ids)
            assert torch.equal(got_unknown, want_unknown)
            assert int(got_unknown[0].sum()) == int(sch.n_masked[step])
            ids, unknown = got_ids, got_unknown


def test_stable_rank_equals_the_sampler_rank_without_ties_and_breaks_ties_by_position() -> None:
    scores = torch.randn(3, 500)
    assert torch.equal(ref.stable_rank(scores), random_ranks(scores))
    tied = torch.tensor([[2.0, 1.0, 2.0, float("inf"), 1.0, float("inf")]])
    assert ref.stable_rank(tied).tolist() == [[2, 0, 3, 4, 1, 5]]


def test_hash_sampling_of_a_row_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(0)
    b, n, v = 3, 40, 64
    logits2 = torch.randn(2 * b, n, v)
    ids = torch.randint(0, v, (b, n))
    unknown = torch.rand(b, n) < 0.7
    seeds = torch.tensor([5, 9, 2**33 + 7])
    args = (torch.tensor(3.0), torch.tensor(0.9), torch.tensor(2.0), 1)
    sampled, conf, _ = ref.sample_confidence(logits2, ids, unknown, seeds, *args)
    for i in range(b):
        one = torch.stack([logits2[i], logits2[b + i]])
        s1, c1, _ = ref.sample_confidence(one, ids[i : i + 1], unknown[i : i + 1], seeds[i : i + 1], *args)
        assert torch.equal(s1[0], sampled[i])
        assert torch.equal(c1[0], conf[i])
    assert torch.equal(sampled[~unknown], ids[~unknown])
    assert torch.isinf(conf[~unknown]).all() and torch.isfinite(conf[unknown]).all()
    other, _, _ = ref.sample_confidence(logits2, ids, unknown, seeds + 1, *args)
    assert not torch.equal(other[unknown], sampled[unknown])  # the seed matters


def test_zero_temperature_is_greedy() -> None:
    logits2 = torch.randn(2, 10, 32)
    ids = torch.zeros(1, 10, dtype=torch.long)
    unknown = torch.ones(1, 10, dtype=torch.bool)
    sampled, _, guided = ref.sample_confidence(
        logits2, ids, unknown, torch.tensor([1]), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(0.0), 0
    )
    assert torch.equal(sampled, guided.argmax(-1))


@pytest.mark.parametrize("bits", [6, 13])
def test_lfq_codes_equal_the_quantizer(bits: int) -> None:
    lfq = LFQ(bits)
    idx = torch.randint(0, 2**bits, (2, 7, 5))
    assert torch.equal(ref.lfq_codes(idx, bits), lfq.indices_to_codes(idx))
    assert torch.equal(ref.lfq_codes(idx, bits, scale=0.5), lfq.indices_to_codes(idx) * 0.5)
    assert torch.equal(lfq.codes_to_indices(ref.lfq_codes(idx, bits)), idx)


def test_frames_uint8_equals_to_uint8_of_frames_after_the_prime() -> None:
    video = torch.rand(2, 1, 5, 8, 8) * 1.4 - 0.2  # some outside [0, 1]
    video[0, 0, 1, 0, :3] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255])  # halves: round to even
    got = ref.frames_uint8(video)
    assert got.shape == (2, 4, 8, 8) and got.dtype == torch.uint8
    assert torch.equal(got, to_uint8(video[:, 0, 1:]))
    assert torch.equal(ref.frames_uint8(video.bfloat16()), to_uint8(video.bfloat16().float()[:, 0, 1:]))


def test_sampling_selected_positions_equals_sampling_all() -> None:
    """The torch path projects and samples only the unknown tokens; their ids and
    confidences must be the ones a full pass gives them (same noise per position)."""
    torch.manual_seed(1)
    b, n, v = 2, 30, 50
    logits2 = torch.randn(2 * b, n, v)
    ids = torch.randint(0, v, (b, n))
    unknown = torch.zeros(b, n, dtype=torch.bool)
    unknown[0, [1, 4, 5, 20]] = True
    unknown[1, [0, 2, 28, 29]] = True
    seeds = torch.tensor([3, 4])
    args = (torch.tensor(2.0), torch.tensor(0.8), torch.tensor(1.5), 2)
    full_s, full_c, _ = ref.sample_confidence(logits2, ids, unknown, seeds, *args)
    positions = (~unknown).to(torch.uint8).argsort(dim=-1, stable=True)[:, :4]
    pos2 = torch.cat([positions, positions])
    some = logits2.gather(1, pos2[..., None].expand(-1, -1, v))
    part_s, part_c, _ = ref.sample_confidence(some, ids, unknown, seeds, *args, positions=positions)
    assert torch.equal(positions, torch.tensor([[1, 4, 5, 20], [0, 2, 28, 29]]))
    assert torch.equal(part_s, full_s.gather(1, positions))
    assert torch.equal(part_c, full_c.gather(1, positions))
