"""Token critic (Lezama et al. 2022; ECHOPulse eq. 9-10): the masked transformer with a
one-logit head saying, per token, "this token is real".

Trained on the generator transformer's own samples: hide tokens as at a random step of
decoding, let the (frozen) transformer sample them as the sampler would (guided, that
step's temperature), and label a token real when the sample equals the ground truth (the
phenaki-pytorch critic gets this backwards). In sampling, its logit can
replace the transformer's own confidence for remasking (`core/sampler.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_preset, load_module, model_paths
from .config import Preset, TokenizerConfig, TransformerConfig
from .sampler import gumbel_noise
from .transformer import Context, EcgFeatures, MaskedTransformer, hide_ecg_spans


class TokenCritic(MaskedTransformer):
    """(B, N) ids + context -> (B, N) logits of "real"."""

    def __init__(self, cfg: TransformerConfig, tok: TokenizerConfig, ecg_dim: int) -> None:
        super().__init__(cfg, tok, ecg_dim, out_dim=1)

    def forward(self, ids: Tensor, context: Context) -> Tensor:
        return super().forward(ids, context).squeeze(-1)


class CriticBatch(NamedTuple):
    filled: Tensor   # (B, N) the truth with the transformer's samples where it was hidden
    target: Tensor   # (B, N) bool: the sampled positions
    real: Tensor     # (B, N) float: 1 where the sample equals the truth
    ecg: EcgFeatures  # the ECG as the sampler saw it (spans hidden)
    ref_valid: Tensor  # (B,) whether the sampler had the reference loop


def decoding_point(cfg: TransformerConfig, rows: int, generator: torch.Generator | None,
                   device: torch.device | str) -> tuple[Tensor, Tensor]:
    """A random point of the decoding schedule per row: progress u (rows, 1) and its
    temperature. Step s of `make_schedule` starts with cos(π/2·s/steps) of the tokens hidden
    (`mask_for_training` at u = s/steps) and samples at τ·(1 − s/steps), so u stays within
    [0, (steps−1)/steps]: beyond the last step no decoding state hides so few tokens."""
    u = torch.rand(rows, 1, generator=generator, device=device) * ((cfg.steps - 1) / cfg.steps)
    return u, cfg.temperature * (1.0 - u)


def critic_batch(
    transformer: MaskedTransformer,
    ids: Tensor,
    ecg: EcgFeatures,
    rr: Tensor,
    ref_ids: Tensor,
    ref_valid: Tensor,
    generator: torch.Generator | None = None,
) -> CriticBatch:
    """The transformer's samples at hidden positions, drawn as the sampler draws them.

    The critic judges samples in decoding, so it learns on those: a row is put at a random
    point of the schedule (that many tokens hidden, that step's temperature), sampled with
    guidance at the preset's scale, from a context the critic sees too. ECG spans are
    hidden and reference loops withheld at the transformer's training rates, as live
    windows lose samples and image-primed devices have no loop; the condition itself is
    never dropped (decoding never drops it)."""
    cfg = transformer.cfg
    b, dev = ids.shape[0], ids.device
    with torch.no_grad():
        progress, temperature = decoding_point(cfg, b, generator, dev)
        target = transformer.mask_for_training(ids, generator, progress=progress)
        hidden = hide_ecg_spans(ecg.time, ecg.valid, cfg.ecg_mask_prob, cfg.ecg_mask_max, generator)
        keep_ref = torch.rand(b, generator=generator, device=dev) >= cfg.ref_drop_prob
        seen = EcgFeatures(ecg.emb, ecg.time, ecg.valid & ~hidden)
        ref_seen = ref_valid & keep_ref
        input_ids = torch.where(target, torch.full_like(ids, transformer.mask_id), ids)
        context2 = transformer.guidance_context(seen, rr, ref_ids, ref_seen)
        scale = torch.tensor(float(cfg.cfg_scale), device=dev)
        logits = transformer.forward_with_cond_scale(input_ids, context2, scale).float()
        sampled = (logits + temperature[..., None] * gumbel_noise(logits, generator)).argmax(-1)
    filled = torch.where(target, sampled, ids)
    return CriticBatch(filled, target, (filled == ids).float(), seen, ref_seen)


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
    """BCE of the critic on the sampled positions (the given ones are trivially real), the
    critic seeing the context the samples were drawn from."""
    batch = critic_batch(transformer, ids, ecg, rr, ref_ids, ref_valid, generator)
    context = critic.condition(batch.ecg, rr, ref_ids, batch.ref_valid)
    logits = critic(batch.filled, context)
    return F.binary_cross_entropy_with_logits(logits[batch.target], batch.real[batch.target])


def load_critic(directory: str | Path, name: str = "critic", device: str | torch.device = "cpu") -> tuple[TokenCritic, Preset]:
    """The critic saved with `transformer.save_transformer(critic, preset, DIR, name="critic")`."""
    weights, config_path = model_paths(directory, name)
    preset = load_preset(config_path, "critic")
    model = TokenCritic(preset.transformer, preset.tokenizer, preset.ecg.dim)
    load_module(model, weights)
    return model.to(device).eval(), preset
