"""Model review: each test here failed before its fix (sampler batch independence and given
tokens, guided logits in fp32, exact LoRA unmerge and adapter loading, ECG padding and
lead ids, clear shape errors), plus schedule edge cases and causality of the shipped tokenizer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from echopulse.core.ecg_encoder import EcgEncoder
from echopulse.core.generator import DEFAULT_WEIGHTS, Generator
from echopulse.core.lora import LoRALinear, apply_lora, load_lora, lora_parameters, merge_lora, save_lora, unmerge_lora
from echopulse.core.sampler import decode, make_schedule
from echopulse.core.tokenizer import CViViT, load_tokenizer
from echopulse.core.config import TokenizerConfig
from echopulse.core.transformer import EcgFeatures

from _generator_fixtures import ecg_batch, features, small_parts, small_preset


def _decode_inputs(b: int):
    p, enc, model = small_parts(0)
    ecg = features(enc, *ecg_batch(p, b=b, seed=3))
    rr = torch.linspace(0.6, 1.0, b)
    ref = torch.zeros(b, model.num_tokens, dtype=torch.long)
    ref_valid = torch.zeros(b, dtype=torch.bool)
    ids = torch.full((b, model.num_tokens), model.mask_id)
    ids[:, : model.prime_tokens] = torch.randint(0, model.codebook_size, (b, model.prime_tokens),
                                                 generator=torch.Generator().manual_seed(4))
    return model, ecg, rr, ref, ref_valid, ids


def _rows(x, rows):
    return x[rows] if isinstance(x, torch.Tensor) else EcgFeatures(*(t[rows] for t in x))


def _decode_rows(model, ecg, rr, ref, ref_valid, ids, rows, seeds, steps=4):
    schedule = make_schedule(steps, model.num_tokens - model.prime_tokens, 0.9, 3.0, 2.0)
    ctx2 = model.guidance_context(_rows(ecg, rows), rr[rows], ref[rows], ref_valid[rows])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return decode(model, ids[rows], ctx2, schedule, generators)


# sampler


def test_a_row_samples_the_same_tokens_alone_or_in_any_batch() -> None:
    """One generator per row: a device's beat does not depend on who shares its batch."""
    model, ecg, rr, ref, ref_valid, ids = _decode_inputs(3)
    batch = _decode_rows(model, ecg, rr, ref, ref_valid, ids, [0, 1, 2], [10, 11, 12])
    swapped = _decode_rows(model, ecg, rr, ref, ref_valid, ids, [2, 0], [12, 10])
    for row in range(3):
        alone = _decode_rows(model, ecg, rr, ref, ref_valid, ids, [row], [10 + row])
        assert torch.equal(alone[0], batch[row])
    assert torch.equal(swapped[0], batch[2]) and torch.equal(swapped[1], batch[0])


def test_one_generator_per_row_of_one_draws_what_one_generator_draws() -> None:
    """A batch of one keeps its old noise, so the facade's seeded beats are unchanged."""
    model, ecg, rr, ref, ref_valid, ids = _decode_inputs(1)
    schedule = make_schedule(4, model.num_tokens - model.prime_tokens, 0.9, 3.0, 2.0)
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    with torch.inference_mode():
        single = decode(model, ids, ctx2, schedule, torch.Generator().manual_seed(5))
        listed = decode(model, ids, ctx2, schedule, [torch.Generator().manual_seed(5)])
    assert torch.equal(single, listed)
    with pytest.raises(ValueError, match="one per row"):
        decode(model, ids, ctx2, schedule, [torch.Generator(), torch.Generator()])


def test_tokens_given_beyond_the_prime_never_change() -> None:
    """A row that gives a second token step: the schedule's counts exceed its unknown tokens,
    and the +inf confidence of given tokens must not get them re-masked and resampled."""
    model, ecg, rr, ref, ref_valid, ids = _decode_inputs(2)
    given = 2 * model.prime_tokens
    ids[:, model.prime_tokens:given] = torch.randint(0, model.codebook_size, (2, given - model.prime_tokens),
                                                     generator=torch.Generator().manual_seed(6))
    schedule = make_schedule(4, model.num_tokens - model.prime_tokens, 0.9, 3.0, 2.0)
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    with torch.inference_mode():
        out = decode(model, ids, ctx2, schedule, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :given], ids[:, :given])
    assert (out < model.codebook_size).all()


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 18, 400])
@pytest.mark.parametrize("generated", [1, 2, 320, 1280])
def test_schedule_counts_are_exact_at_the_edges(steps: int, generated: int) -> None:
    counts = [generated] + make_schedule(steps, generated, 0.9, 3.0, 1.5).n_masked.tolist()
    fixed = [a - b for a, b in zip(counts, counts[1:])]
    assert counts[-1] == 0 and sum(fixed) == generated
    assert all(f >= 0 for f in fixed)
    assert all(f >= 1 for f, before in zip(fixed, counts) if before > 0)  # progress while anything is masked


def test_guided_logits_are_combined_in_float32_under_bf16() -> None:
    model, ecg, rr, ref, ref_valid, ids = _decode_inputs(2)
    ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        pair = model(torch.cat([ids, ids]), ctx2)
        guided = model.forward_with_cond_scale(ids, ctx2, 1.5)
    cond, null = pair.float().chunk(2)
    assert guided.dtype == torch.float32
    assert torch.equal(guided, null + 1.5 * (cond - null))


# LoRA


def _tokenizer(seed: int = 0) -> CViViT:
    torch.manual_seed(seed)
    return CViViT(TokenizerConfig(dim=64, spatial_depth=1, temporal_depth=1, heads=2, dim_head=32)).eval()


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _codes() -> torch.Tensor:
    return torch.randint(0, 2, (1, 6, 8, 8, 10), generator=torch.Generator().manual_seed(2)).float() * 2 - 1


def test_unmerge_restores_the_base_weights_bit_for_bit() -> None:
    model = _tokenizer()
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_lora(model, rank=4, alpha=3.0)
    _randomise(model, 1)
    for _ in range(3):
        merge_lora(model)
        unmerge_lora(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert layers and all(torch.equal(m.base.weight, base[n]) for n, m in layers)


def test_loading_adapters_replaces_the_scale_of_a_wrapped_model(tmp_path) -> None:
    tuned = _tokenizer()
    apply_lora(tuned, rank=3, alpha=0.3)
    _randomise(tuned, 1)
    save_lora(tuned, tmp_path)
    other_patient = _tokenizer()
    apply_lora(other_patient, rank=3, alpha=12.0)  # wrapped before, with another scale
    _randomise(other_patient, 2)
    fresh = _tokenizer()
    load_lora(other_patient, tmp_path)
    load_lora(fresh, tmp_path)
    with torch.no_grad():
        want = tuned.decode(_codes())
        assert torch.equal(other_patient.decode(_codes()), want)
        assert torch.equal(fresh.decode(_codes()), want)


def test_loading_adapters_refuses_leftovers_and_changes_nothing(tmp_path) -> None:
    tuned = _tokenizer()
    apply_lora(tuned, rank=2, targets=["*.to_q"])
    _randomise(tuned, 1)
    save_lora(tuned, tmp_path)
    wider = _tokenizer()
    apply_lora(wider, rank=2)  # to_q, to_kv, to_out: the file has adapters for to_q only
    _randomise(wider, 3)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="no adapter in the file"):
        load_lora(wider, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())

    other_rank = _tokenizer()
    apply_lora(other_rank, rank=4, targets=["*.to_q"])
    with pytest.raises(ValueError, match="shape"):
        load_lora(other_rank, tmp_path)

    smaller = CViViT(TokenizerConfig(dim=32, spatial_depth=1, temporal_depth=1, heads=2, dim_head=16)).eval()
    with pytest.raises(ValueError, match="shape"):
        load_lora(smaller, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in smaller.modules())  # refused before wrapping


# ECG encoder


@pytest.fixture(scope="module")
def encoder() -> EcgEncoder:
    torch.manual_seed(0)
    return EcgEncoder(small_preset().ecg).eval()


@pytest.mark.parametrize("padding", [math.nan, math.inf, 1e30])
def test_what_sits_in_invalid_samples_never_reaches_the_embeddings(encoder: EcgEncoder, padding: float) -> None:
    window, valid, leads = ecg_batch(small_preset(), b=1, leads=2)
    valid[..., -60:] = False
    padded = window.clone()
    padded[~valid] = padding
    with torch.no_grad():
        clean = encoder.encode(torch.where(valid, window, 0.0), valid, leads)[0]
        got = encoder.encode(padded, valid, leads)[0]
    assert torch.isfinite(got).all() and torch.equal(got, clean)


def test_lead_ids_name_every_lead(encoder: EcgEncoder) -> None:
    window, valid, _ = ecg_batch(small_preset(), b=2, leads=3)
    with pytest.raises(ValueError, match="one id per lead"):
        encoder.encode(window, valid, torch.tensor([0]))  # would be broadcast to all three leads
    with pytest.raises(ValueError, match="one id per lead"):
        encoder.encode(window, valid, torch.zeros(3, 3, dtype=torch.long))  # 3 rows of ids for a batch of 2
    with pytest.raises(ValueError, match=r"\(batch, leads, samples\)"):
        encoder.encode(window[0], valid[0], torch.arange(3))
    with pytest.raises(ValueError, match="valid must broadcast"):
        encoder.encode(window, valid[:, :, :-1], torch.arange(3))
    emb, _, _ = encoder.encode(window, valid[:, :1], torch.arange(3).repeat(2, 1))
    assert emb.shape[:2] == (2, 3 * encoder.cfg.patches_per_lead)


# tokenizer and generator inputs


def test_tokenizer_names_wrong_codes_and_uint8_video() -> None:
    model = _tokenizer()
    with pytest.raises(ValueError, match="expected codes"):
        model.decode_indices(torch.zeros(1, 384, dtype=torch.long))  # flat token ids
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(torch.ones(1, 6, 8, 8, 9))
    with pytest.raises(ValueError, match="from_uint8"):
        model.encode(torch.zeros(1, 1, 11, 64, 64, dtype=torch.uint8))


def test_generate_beat_names_a_valid_mask_of_the_wrong_length() -> None:
    gen = Generator.untrained(small_preset(), seed=0)
    size = gen.preset.tokenizer.image_size
    gen.prime_image(np.full((size, size), 90, np.uint8))
    samples = gen.preset.ecg.window_samples
    with pytest.raises(ValueError, match="valid must be"):
        gen.generate_beat(np.zeros((1, samples), np.float32), np.ones(samples - 5, bool), 1.0, 0.8, seed=0)


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "tokenizer.json").is_file(), reason="no shipped tokenizer")
@pytest.mark.parametrize("frame", [1, 4, 10])
def test_shipped_tokenizer_is_causal(frame: int) -> None:
    """Changing frame t changes no token of an earlier step, nor a decoded earlier frame
    (through the conv refiner too), with the weights that ship."""
    model, _ = load_tokenizer(DEFAULT_WEIGHTS)
    video = torch.rand(1, 1, 11, 64, 64, generator=torch.Generator().manual_seed(1))
    changed = video.clone()
    changed[:, :, frame:] = torch.rand(1, 1, 11 - frame, 64, 64, generator=torch.Generator().manual_seed(2))
    step = (frame + 1) // 2
    with torch.no_grad():
        a, b = model.latents(video), model.latents(changed)
        assert torch.equal(a[:, :step], b[:, :step]) and not torch.equal(a[:, step], b[:, step])
        ids = model.encode(video)
        other = ids.clone()
        other[:, step:] = torch.randint(0, 1024, other[:, step:].shape, generator=torch.Generator().manual_seed(3))
        first = 1 + (step - 1) * 2  # the first frame of token step `step`
        assert torch.equal(model.decode_indices(ids)[:, :, :first], model.decode_indices(other)[:, :, :first])
