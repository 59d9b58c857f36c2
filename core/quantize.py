"""Lookup-free quantization (LFQ, MAGVIT-v2).

Each of the K latent channels is quantized to its sign, ±1, so the "codebook" is the
2^K corners of a hypercube and never stored. A token's index reads the bits most
significant first: index = Σ_i [code_i > 0] · 2^(K−1−i).

Training losses:
- commitment: ‖z − sg(q)‖², keeps latents near the corners;
- entropy: E_n[H(p_n)] − γ·H(E_n[p_n]), where p_n(c) = softmax_c(−τ‖z_n − c‖²) over all
  corners (τ = inverse temperature ~100). The first term makes each token confident, the
  second spreads the batch over the whole codebook.

Because ‖z − c‖² is a sum over bits, p_n factorizes into independent bits, so the
per-sample entropy is a sum of binary entropies (exact, cheap). The codebook entropy of
the batch mean does not factorize; it needs every token's probability of every corner,
N × 2^K numbers, which is computed in chunks of tokens (with activation checkpointing)
so memory stays bounded. Only training builds it: `encode` and `indices_to_codes` touch
no 2^K-sized tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LFQOutput:
    codes: Tensor               # (..., K) ±1 with straight-through gradient to the latents
    indices: Tensor             # (...) long
    loss: Tensor                # weighted sum of the terms below
    commitment: Tensor
    sample_entropy: Tensor      # mean per-token entropy (nats); small = confident tokens
    codebook_entropy: Tensor    # entropy of the batch-mean distribution (nats); large = codebook used


def _binary_entropy(logit: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logit)), stable for large |logit|."""
    p = torch.sigmoid(logit)
    return F.softplus(logit) - p * logit


class LFQ(nn.Module):
    def __init__(
        self,
        bits: int,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
        chunk_elements: int = 2**22,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 30:
            raise ValueError("bits must be in 1..30 (indices are int64, codebooks beyond 2^30 are not practical)")
        self.bits = bits
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.inv_temperature = inv_temperature
        self.chunk_elements = chunk_elements  # tokens × codes per chunk of the codebook-entropy term
        self.register_buffer("powers", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    # exact conversions

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., K) ±1 (any float, sign is read) -> (...) long, most significant bit first."""
        return ((codes > 0).long() * self.powers).sum(-1)

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(...) long -> (..., K) ±1."""
        bits = (indices.long()[..., None] // self.powers) % 2
        return (bits * 2 - 1).to(dtype)

    # inference

    def quantize(self, z: Tensor) -> Tensor:
        """Sign per bit (0 counts as −1, as in `codes_to_indices`), no gradient trick."""
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    def encode(self, z: Tensor) -> Tensor:
        """Latents (..., K) -> indices (...); nothing of codebook size is built."""
        return self.codes_to_indices(z)

    # training

    def forward(self, z: Tensor) -> LFQOutput:
        q = self.quantize(z)
        codes = z + (q - z).detach()  # straight-through
        commitment = F.mse_loss(z, q.detach())
        flat = z.reshape(-1, self.bits).float()
        # ‖z − c‖² = const − 2 z·c, so the logit of bit i being +1 vs −1 is 4τ z_i
        logits = 4 * self.inv_temperature * flat
        sample_entropy = _binary_entropy(logits).sum(-1).mean()
        codebook_entropy = self._codebook_entropy(logits)
        entropy = sample_entropy - self.diversity_gamma * codebook_entropy
        loss = self.commitment_weight * commitment + self.entropy_weight * entropy
        return LFQOutput(
            codes=codes,
            indices=self.codes_to_indices(q.detach()),
            loss=loss,
            commitment=commitment,
            sample_entropy=sample_entropy,
            codebook_entropy=codebook_entropy,
        )

    def _codebook_entropy(self, logits: Tensor) -> Tensor:
        """Entropy of the mean over tokens of each token's distribution over all 2^K corners."""
        n = logits.shape[0]
        corners = (self.indices_to_codes(torch.arange(self.codebook_size, device=logits.device)) > 0).float()
        log_plus, log_minus = F.logsigmoid(logits), F.logsigmoid(-logits)  # (n, K)
        chunk = max(1, self.chunk_elements // self.codebook_size)
        total = logits.new_zeros(self.codebook_size)
        for start in range(0, n, chunk):
            args = (log_plus[start:start + chunk], log_minus[start:start + chunk], corners)
            if logits.requires_grad:
                total = total + checkpoint(_corner_probability_sum, *args, use_reentrant=False)
            else:
                total = total + _corner_probability_sum(*args)
        mean = total / n
        return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def _corner_probability_sum(log_plus: Tensor, log_minus: Tensor, corners: Tensor) -> Tensor:
    """Σ_tokens p(corner) for every corner: (n, K), (n, K), (C, K) -> (C,)."""
    log_p = log_plus @ corners.T + log_minus @ (1 - corners).T  # (n, C)
    return log_p.exp().sum(0)
