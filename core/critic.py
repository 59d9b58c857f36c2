"""Token critic (Lezama et al. 2022; ECHOPulse eq. 9-10): the masked transformer with a
one-logit head saying, per token, "this token is real".

Trained on the generator transformer's own samples: hide tokens as in training, let the
(frozen) transformer sample them, and label a token real when the sample equals the
ground truth (the phenaki-pytorch critic gets this backwards). In sampling, its logit can
replace the transformer's own confidence for remasking (`core/sampler.py`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_preset, load_module, model_paths
from .config import Preset, TokenizerConfig, TransformerConfig
from .sampler import gumbel_noise
from .transformer import Context, EcgFeatures, MaskedTransformer


class TokenCritic(MaskedTransformer):
    """(B, N) ids + context -> (B, N) logits of "real"."""

    def __init__(self, cfg: TransformerConfig, tok: TokenizerConfig, ecg_dim: int) -> None:
        super().__init__(cfg, tok, ecg_dim, out_dim=1)

    def forward(self, ids: Tensor, context: Context) -> Tensor:
        return super().forward(ids, context).squeeze(-1)


def critic_batch(
    transformer: MaskedTransformer,
    ids: Tensor,
    ecg: EcgFeatures,
    rr: Tensor,
    ref_ids: Tensor,
    ref_valid: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The transformer's samples at hidden positions: (filled ids, target mask, real labels)."""
    with torch.no_grad():
        batch = transformer.training_batch(ids, ecg, rr, ref_ids, ref_valid, generator)
        logits = transformer(batch.input_ids, batch.context).float()
        sampled = (logits + gumbel_noise(logits, generator)).argmax(-1)  # temperature 1
    filled = torch.where(batch.target_mask, sampled, ids)
    return filled, batch.target_mask, (filled == ids).float()


def critic_loss(
    critic: TokenCritic,
    transformer: MaskedTransformer,
    ids: Tensor,
    ecg: EcgFeatures,
    rr: Tensor,
    ref_ids: Tensor,
    ref_valid: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BCE of the critic on the sampled positions (the given ones are trivially real)."""
    filled, target, real = critic_batch(transformer, ids, ecg, rr, ref_ids, ref_valid, generator)
    context = critic.condition(ecg, rr, ref_ids, ref_valid)
    logits = critic(filled, context)
    return F.binary_cross_entropy_with_logits(logits[target], real[target])


def load_critic(directory: str | Path, name: str = "critic", device: str | torch.device = "cpu") -> tuple[TokenCritic, Preset]:
    """The critic saved with `transformer.save_transformer(critic, preset, DIR, name="critic")`."""
    weights, config_path = model_paths(directory, name)
    preset = load_preset(config_path, "critic")
    model = TokenCritic(preset.transformer, preset.tokenizer, preset.ecg.dim)
    load_module(model, weights)
    return model.to(device).eval(), preset
