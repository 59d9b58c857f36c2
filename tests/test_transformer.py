"""Masked transformer: CFG is live, ECG masking and condition dropout really happen in
training, the prime frame is never masked, the loss counts masked tokens only."""
from __future__ import annotations

import math

import pytest
import torch

from echopulse.core.critic import TokenCritic, critic_batch, critic_loss
from echopulse.core.transformer import EcgFeatures, cosine_mask_ratio

from _generator_fixtures import ecg_batch, features, small_parts


def _inputs(b: int = 4, seed: int = 0):
    p, enc, model = small_parts(seed)
    window, valid, leads = ecg_batch(p, b=b, seed=seed)
    ecg = features(enc, window, valid, leads)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.codebook_size, (b, model.num_tokens), generator=g)
    rr = torch.full((b,), 0.8)
    ref = torch.randint(0, model.codebook_size, (b, model.num_tokens), generator=g)
    return p, enc, model, ecg, ids, rr, ref, torch.ones(b, dtype=torch.bool)


def test_null_condition_changes_the_logits() -> None:
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    with torch.no_grad():
        cond = model(ids, model.condition(ecg, rr, ref, ref_valid))
        null = model(ids, model.condition(ecg, rr, ref, ref_valid, drop=torch.ones(4, dtype=torch.bool)))
        ctx2 = model.guidance_context(ecg, rr, ref, ref_valid)
        guided0 = model.forward_with_cond_scale(ids, ctx2, 0.0)
        guided1 = model.forward_with_cond_scale(ids, ctx2, 1.0)
        guided3 = model.forward_with_cond_scale(ids, ctx2, 3.0)
    assert (cond - null).abs().mean() > 1e-3
    # the batched 2B pass gives exactly the two single passes
    assert torch.allclose(guided0, null, atol=1e-5) and torch.allclose(guided1, cond, atol=1e-5)
    assert torch.allclose(guided3, null + 3 * (cond - null), atol=1e-4)


def test_null_condition_ignores_the_ecg() -> None:
    p, enc, model, ecg, ids, rr, ref, ref_valid = _inputs()
    other = features(enc, *ecg_batch(p, b=4, seed=9))
    drop = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        a = model(ids, model.condition(ecg, rr, ref, ref_valid, drop=drop))
        b = model(ids, model.condition(other, rr, ref, ref_valid, drop=drop))
        c = model(ids, model.condition(other, rr, ref, ref_valid))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def test_training_drops_the_condition_and_hides_ecg_spans() -> None:
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs(b=8)
    g = torch.Generator().manual_seed(1)
    dropped = hidden_rows = hidden_patches = batches = 0
    p_count = ecg.emb.shape[1]
    for _ in range(50):
        batch = model.training_batch(ids, ecg, rr, ref, ref_valid, g)
        ecg_keys = batch.context.mask[:, :p_count]
        # hidden patches are really out of the cross-attention keys (unless the whole condition is null)
        live = ~batch.cond_dropped
        assert not (ecg_keys[live] & batch.ecg_hidden[live]).any()
        assert ecg_keys[~live].all()  # the null condition: every key is the learned null vector
        dropped += int(batch.cond_dropped.sum())
        hidden_rows += int(batch.ecg_hidden.any(-1).sum())
        hidden_patches += int(batch.ecg_hidden.sum())
        batches += 1
    rows = 8 * batches
    cfg = model.cfg
    assert abs(dropped / rows - cfg.cond_drop_prob) < 0.06
    assert abs(hidden_rows / rows - cfg.ecg_mask_prob) < 0.1
    # spans, not single patches: on average several patches per masked row
    assert hidden_patches / max(hidden_rows, 1) > 2


def test_prime_frame_is_never_masked_and_ratio_follows_cosine() -> None:
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs(b=8)
    g = torch.Generator().manual_seed(2)
    ratios = []
    for _ in range(40):
        batch = model.training_batch(ids, ecg, rr, ref, ref_valid, g)
        assert not batch.target_mask[:, : model.prime_tokens].any()
        assert (batch.input_ids == model.mask_id).equal(batch.target_mask)
        ratios.append(batch.target_mask[:, model.prime_tokens :].float().mean(-1))
    ratios = torch.cat(ratios)
    # E[cos(pi/2 U)] = 2/pi
    assert abs(ratios.mean().item() - 2 / math.pi) < 0.05
    assert ratios.min() > 0 and ratios.max() > 0.9
    assert cosine_mask_ratio(torch.tensor([0.0, 1.0])).allclose(torch.tensor([1.0, 0.0]), atol=1e-6)


def test_loss_trains_and_reaches_the_null_embedding() -> None:
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs(b=8)
    model.train()
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ecg = EcgFeatures(*(x.detach() for x in ecg))
    first = None
    got_null_grad = False
    for _ in range(30):
        loss = model.loss(ids[:1].repeat(8, 1), ecg, rr, ref, ref_valid, g)
        opt.zero_grad()
        loss.backward()
        got_null_grad |= bool(model.null_ecg.grad is not None and model.null_ecg.grad.abs().sum() > 0)
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.5
    assert got_null_grad  # the null condition is trained, not dead


def test_critic_labels_real_when_the_sample_equals_the_truth() -> None:
    p, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    g = torch.Generator().manual_seed(4)
    filled, target, real, _, _ = critic_batch(model, ids, ecg, rr, ref, ref_valid, g)
    assert real.equal((filled == ids).float())
    assert filled[~target].equal(ids[~target])
    critic = TokenCritic(p.transformer, p.tokenizer, p.ecg.dim)
    assert critic(filled, critic.condition(ecg, rr, ref, ref_valid)).shape == ids.shape
    loss = critic_loss(critic, model, ids, ecg, rr, ref, ref_valid, g)
    loss.backward()
    assert torch.isfinite(loss) and critic.to_out.weight.grad is not None


def test_the_critic_learns_on_samples_drawn_as_decoding_draws_them() -> None:
    """Guided samples from a condition never dropped, the critic seeing what the sampler saw.
    Once the samples came from training's context (condition dropped for some rows, ECG
    hidden, loop withheld) at temperature 1, while the critic saw the whole context."""
    import dataclasses

    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    # a large guidance scale makes the ECG outweigh the sampling noise in an untrained model
    model.cfg = dataclasses.replace(model.cfg, cond_drop_prob=1.0, ecg_mask_prob=0.0, ref_drop_prob=0.0, cfg_scale=50.0)
    other = EcgFeatures(10 * torch.randn(ecg.emb.shape, generator=torch.Generator().manual_seed(9)), ecg.time, ecg.valid)
    batches = [critic_batch(model, ids, e, rr, ref, ref_valid, torch.Generator().manual_seed(4)) for e in (ecg, other)]
    (filled, target, _, seen, seen_ref), (filled_other, *_) = batches
    # the same tokens hidden and the same noise: only the ECG differs, and every row heard it
    assert all((filled[i] != filled_other[i])[target[i]].any() for i in range(ids.shape[0]))
    assert seen.valid.equal(ecg.valid) and seen_ref.equal(ref_valid)

    model.cfg = dataclasses.replace(model.cfg, ecg_mask_prob=1.0, ecg_mask_max=0.4, ref_drop_prob=1.0)
    hidden = critic_batch(model, ids, ecg, rr, ref, ref_valid, torch.Generator().manual_seed(4))
    # what the sampler did not see, the critic is not shown either
    assert (hidden.ecg.valid.sum() < ecg.valid.sum()) and not hidden.ref_valid.any()


def test_key_layouts_give_the_masked_result_where_they_apply() -> None:
    """"dense" (no mask) when every key is valid, "no_ref" (no reference block) when no row
    has a reference loop: the same logits as the masked layout, for less work."""
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    drop = torch.tensor([False, True, False, True])
    with torch.no_grad():
        masked = model(ids, model.condition(ecg, rr, ref, ref_valid, drop))
        dense_ctx = model.condition(ecg, rr, ref, ref_valid, drop, layout="dense")
        dense = model(ids, dense_ctx)
        no_ref = torch.zeros_like(ref_valid)
        masked_no_ref = model(ids, model.condition(ecg, rr, ref, no_ref, drop))
        short_ctx = model.condition(ecg, rr, ref, no_ref, drop, layout="no_ref")
        short = model(ids, short_ctx)
    assert dense_ctx.mask is None
    assert short_ctx.tokens.shape[1] == ecg.emb.shape[1] + 1  # ECG patches and the register
    torch.testing.assert_close(dense, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, masked_no_ref, atol=1e-5, rtol=1e-5)
    assert (masked - masked_no_ref).abs().mean() > 1e-3  # the reference block matters when given


def test_key_layout_is_the_cheapest_exact_one() -> None:
    from echopulse.core.transformer import key_layout

    assert key_layout([False, False], [True, False]) == "no_ref"
    assert key_layout([True, True], [True, True]) == "dense"
    assert key_layout([True, False], [True, True]) == "masked"   # one row's reference block is masked
    assert key_layout([True], [False]) == "masked"               # an invalid ECG patch is masked
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    with pytest.raises(ValueError, match="layout"):
        model.condition(ecg, rr, ref, ref_valid, layout="sparse")


def test_keys_values_computed_once_give_the_same_logits() -> None:
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs()
    with torch.no_grad():
        context = model.guidance_context(ecg, rr, ref, ref_valid)
        hoisted = model.with_keys_values(context)
        assert hoisted.kv is not None and len(hoisted.kv) == len(model.transformer.blocks)
        ids2 = torch.cat([ids, ids])
        torch.testing.assert_close(model(ids2, hoisted), model(ids2, context), atol=1e-6, rtol=1e-6)


def test_logits_of_chosen_rows_equal_those_rows_of_the_full_pass() -> None:
    """Only the last block computes fewer rows; every token is still a key before it."""
    _, _, model, ecg, ids, rr, ref, ref_valid = _inputs(b=2)
    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.randperm(model.num_tokens, generator=g)[:9] for _ in range(2)])
    with torch.no_grad():
        context = model.with_keys_values(model.condition(ecg, rr, ref, ref_valid))
        full = model(ids, context)
        some = model(ids, context, rows=rows)
    assert some.shape == (2, 9, full.shape[-1])
    torch.testing.assert_close(some, full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_guidance_pair_shares_its_first_self_attention(depth: int) -> None:
    """Both halves of a CFG pair hold the same tokens: one stack through the first
    self-attention, then two, gives the pair's output (with rows too, also when the first
    block is the last)."""
    from echopulse.core.layers import Transformer

    torch.manual_seed(depth)
    body = Transformer(16, depth, 2, 8, context_dim=16).eval()
    x = torch.randn(2, 10, 16)
    context = torch.randn(4, 7, 16)  # conditional rows, then null rows
    rows = torch.tensor([[1, 4, 9], [0, 2, 3]])
    with torch.no_grad():
        want = body(torch.cat([x, x]), context=context)
        torch.testing.assert_close(body(x, context=context, copies=2), want, atol=1e-6, rtol=1e-6)
        some = body(x, context=context, rows=torch.cat([rows, rows]), copies=2)
    torch.testing.assert_close(some, want.gather(1, torch.cat([rows, rows])[..., None].expand(-1, -1, 16)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="key mask"):
        body(x, context=context, key_mask=torch.ones(2, 10, dtype=torch.bool), copies=2)


def test_rows_are_refused_for_causal_attention() -> None:
    from echopulse.core.layers import Attention

    attn = Attention(16, 2, 8, causal=True)
    with pytest.raises(ValueError, match="bidirectional"):
        attn(torch.randn(1, 5, 16), rows=torch.tensor([[1, 3]]))


@pytest.mark.parametrize("upcasting", [False, True])
def test_layer_norm_keeps_bf16_under_autocast_and_is_nn_layer_norm_otherwise(
    upcasting: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`upcasting` runs, on CPU, the branch that CUDA takes (autocast switched off around the norm)."""
    from echopulse.core import layers
    from echopulse.core.layers import LayerNorm

    if upcasting:
        monkeypatch.setattr(layers, "UPCASTING_AUTOCAST", ("cuda", "cpu"))

    torch.manual_seed(0)
    ours, plain = LayerNorm(32), torch.nn.LayerNorm(32)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    plain.load_state_dict(ours.state_dict())  # same keys: checkpoints load either way
    x = torch.randn(3, 7, 32)
    assert torch.equal(ours(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.bfloat16())
        assert torch.is_autocast_enabled("cpu")  # switched back on after the norm
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), plain(x.bfloat16().float()), atol=0.05, rtol=0.02)
