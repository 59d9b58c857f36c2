"""LFQ: exact index <-> bits conversions, straight-through gradient, entropy terms."""
from __future__ import annotations

import math

import pytest
import torch

from echopulse.core.quantize import LFQ


def test_indices_codes_round_trip_every_index() -> None:
    q = LFQ(10)
    indices = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(indices)
    assert codes.shape == (1024, 10)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.codes_to_indices(codes), indices)


def test_codes_indices_round_trip_random_codes() -> None:
    q = LFQ(13)
    codes = torch.randint(0, 2, (4, 6, 16, 16, 13)).float() * 2 - 1
    assert torch.equal(q.indices_to_codes(q.codes_to_indices(codes)), codes)


def test_most_significant_bit_first() -> None:
    q = LFQ(3)
    assert q.codes_to_indices(torch.tensor([1.0, -1.0, -1.0])).item() == 4
    assert q.codes_to_indices(torch.tensor([-1.0, -1.0, 1.0])).item() == 1
    assert q.indices_to_codes(torch.tensor(6)).tolist() == [1.0, 1.0, -1.0]


def test_straight_through_gradient_and_indices() -> None:
    q = LFQ(6)
    z = torch.randn(5, 7, 6, requires_grad=True)
    out = q(z)
    assert torch.equal(out.codes.detach(), torch.sign(z.detach()))
    assert torch.equal(out.indices, q.encode(z.detach()))
    w = torch.randn_like(z)
    (out.codes * w).sum().backward(inputs=[z])
    # the codes pass the gradient straight through (the loss terms are not part of this sum)
    assert torch.allclose(z.grad, w)


def _brute_force_entropies(q: LFQ, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    corners = q.indices_to_codes(torch.arange(q.codebook_size))
    logits = -q.inv_temperature * torch.cdist(z, corners).pow(2)  # (n, C)
    p = logits.softmax(-1)
    sample = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    mean = p.mean(0)
    return sample, -(mean * mean.clamp_min(1e-30).log()).sum()


def test_entropies_match_brute_force_and_chunking() -> None:
    torch.manual_seed(0)
    z = torch.randn(300, 5) * 0.02  # small latents: soft assignments, entropies far from 0
    whole = LFQ(5, inv_temperature=10.0)
    chunked = LFQ(5, inv_temperature=10.0, chunk_elements=64)  # 2 tokens per chunk
    a, b = whole(z), chunked(z.clone().requires_grad_())
    sample, codebook = _brute_force_entropies(whole, z)
    assert a.sample_entropy.item() == pytest.approx(sample.item(), rel=1e-4)
    assert a.codebook_entropy.item() == pytest.approx(codebook.item(), rel=1e-4)
    assert b.codebook_entropy.item() == pytest.approx(codebook.item(), rel=1e-4)
    b.loss.backward()  # checkpointed chunks give gradients


def test_diverse_batch_has_higher_codebook_entropy() -> None:
    q = LFQ(4)
    spread = q.indices_to_codes(torch.arange(16).repeat(4))
    same = q.indices_to_codes(torch.zeros(64, dtype=torch.long))
    assert q(spread).codebook_entropy.item() == pytest.approx(math.log(16), rel=1e-3)
    assert q(same).codebook_entropy.item() < 1e-3


def test_encode_builds_nothing_codebook_sized() -> None:
    q = LFQ(28)  # 2^28 codes: any N x 2^K tensor would need gigabytes
    z = torch.randn(2, 1536, 28)
    indices = q.encode(z)
    assert indices.max().item() < 2**28
    assert torch.equal(q.indices_to_codes(indices), torch.sign(z))
