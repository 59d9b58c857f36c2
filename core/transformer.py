"""Masked video-token transformer (MVTM) with ECG cross-attention and classifier-free guidance.

Tokens are the tokenizer's (t, h, w) grid flattened; token step 0 is the prime frame
(the previous beat's last frame), always given, never masked. Attention over the video
tokens is bidirectional; every block cross-attends to a context made of

    [ ECG patch embeddings (P) | reference-loop tokens (N) | one register token ]

- ECG patches carry their phase in the beat (time since R / RR) through the same
  embedding as the video steps' phases, so "the T wave" and "the frames around end
  systole" meet in attention; invalid or hidden patches are masked out of the keys.
- The reference loop (another beat of this patient's echo, optional) gives the model
  the patient's contraction, so the generated ejection fraction can follow the patient;
  it is embedded with the video token table plus a segment embedding and masked out of
  the keys when absent.
- The register token is always attendable, so no row of the key mask is ever empty.
- Classifier-free guidance: the null condition replaces every ECG key by one learned
  null vector (all attendable); the prime frame and the reference loop stay, so guidance
  amplifies what the ECG adds.

The token critic is this class with a one-logit head (`core/critic.py`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_preset, load_module, model_paths, save_model
from .config import Preset, TokenizerConfig, TransformerConfig
from .ecg_encoder import TIME_UNIT_S
from .layers import LayerNorm, Transformer, sinusoidal_embedding


class EcgFeatures(NamedTuple):
    """What the ECG encoder gives per beat: emb (B, P, D), time (B, P) s since R, valid (B, P)."""

    emb: Tensor
    time: Tensor
    valid: Tensor


class Context(NamedTuple):
    """Cross-attention keys (B, C, dim) and their key mask (B, C), True = attendable;
    None when every key is (the "dense" layout). `kv`: every block's keys and values of
    `tokens`, when computed once for many forwards (`with_keys_values`)."""

    tokens: Tensor
    mask: Tensor | None
    kv: list[tuple[Tensor, Tensor]] | None = None


# How `MaskedTransformer.condition` lays the keys out; see there.
KEY_LAYOUTS = ("masked", "dense", "no_ref")


def key_layout(ref_valid: Sequence[bool], ecg_all_valid: Sequence[bool]) -> str:
    """The cheapest exact layout for a batch: per row, whether it has a reference loop and
    whether every ECG sample of its window is valid."""
    if not any(ref_valid):
        return "no_ref"
    if all(ref_valid) and all(ecg_all_valid):
        return "dense"
    return "masked"


class TrainingBatch(NamedTuple):
    """One masked-token training input, kept separate from the loss so tests can inspect it."""

    input_ids: Tensor      # (B, N) with mask_id at hidden positions
    target_mask: Tensor    # (B, N) True where the loss is taken
    context: Context
    ecg_hidden: Tensor     # (B, P) True where a valid ECG patch was hidden by ECG masking
    cond_dropped: Tensor   # (B,) True where the null condition replaced the ECG


# helpers


def step_phases(tok: TokenizerConfig) -> Tensor:
    """Phase in the beat (fraction of RR since R) of each token step's frames: (t,).

    Frame i of a beat-locked clip sits at phase (i - 1) / (frames - 1): frame 0 is the
    previous beat's last frame; a tubelet step takes the mean phase of its frames.
    """
    span = tok.frames - 1
    phases = [-1.0 / span]
    for s in range(1, tok.token_grid[0]):
        first = 1 + (s - 1) * tok.temporal_patch
        frames = torch.arange(first, first + tok.temporal_patch, dtype=torch.float32)
        phases.append(float(((frames - 1) / span).mean()))
    return torch.tensor(phases)


def cosine_mask_ratio(u: Tensor) -> Tensor:
    """MaskGIT's cosine schedule: fraction of tokens masked at progress u in [0, 1]."""
    return torch.cos(0.5 * math.pi * u)


def random_ranks(scores: Tensor) -> Tensor:
    """Rank of every entry along the last axis (0 = smallest); fixed shape, no data-dependent ops."""
    return scores.argsort(-1).argsort(-1)


def hide_ecg_spans(
    time: Tensor, valid: Tensor, prob: float, max_frac: float, generator: torch.Generator | None = None
) -> Tensor:
    """ECG masking for training: with probability `prob` per sample, hide one random span of
    time (up to `max_frac` of the window, across all leads). Returns the hidden patches (B, P)."""
    b = time.shape[0]
    dev = time.device
    apply = torch.rand(b, 1, generator=generator, device=dev) < prob
    lo, hi = time.min(-1, keepdim=True).values, time.max(-1, keepdim=True).values
    length = torch.rand(b, 1, generator=generator, device=dev) * max_frac * (hi - lo)
    start = lo + torch.rand(b, 1, generator=generator, device=dev) * (hi - lo - length).clamp(min=0)
    # at least the patch nearest the start is hidden: a span shorter than a patch still counts
    nearest = (time - start).abs() == (time - start).abs().min(-1, keepdim=True).values
    inside = ((time >= start) & (time < start + length)) | nearest
    return apply & inside & valid


# model


class MaskedTransformer(nn.Module):
    """Bidirectional transformer over video tokens, cross-attending to ECG (+ reference loop)."""

    def __init__(self, cfg: TransformerConfig, tok: TokenizerConfig, ecg_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = tok.token_grid
        self.num_tokens = tok.num_tokens
        self.prime_tokens = self.grid[1] * self.grid[2]  # token step 0: the prime frame
        self.codebook_size = tok.codebook_size
        self.mask_id = tok.codebook_size  # one extra embedding row
        dim = cfg.dim
        t, h, w = self.grid

        self.token_emb = nn.Embedding(tok.codebook_size + 1, dim)
        self.pos_t = nn.Parameter(torch.randn(t, dim) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(h, dim) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(w, dim) * 0.02)
        self.phase_proj = nn.Linear(dim, dim)  # shared by video steps and ECG patches
        self.register_buffer("phases", step_phases(tok), persistent=False)

        self.ecg_proj = nn.Sequential(LayerNorm(ecg_dim), nn.Linear(ecg_dim, dim))
        self.null_ecg = nn.Parameter(torch.randn(dim) * 0.02)
        self.ref_segment = nn.Parameter(torch.randn(dim) * 0.02)
        self.register = nn.Parameter(torch.randn(1, dim) * 0.02)

        self.transformer = Transformer(dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult, context_dim=dim)
        self.to_out = nn.Linear(dim, out_dim or tok.codebook_size)

    # embeddings

    def phase_embedding(self, phase: Tensor) -> Tensor:
        """(…,) phase in RR units -> (…, dim); same scale as ECG time at 60 bpm."""
        return self.phase_proj(sinusoidal_embedding(phase / TIME_UNIT_S, self.cfg.dim))

    def position_embedding(self) -> Tensor:
        """(N, dim): factorised t/h/w learned positions plus the step's phase in the beat."""
        t, h, w = self.grid
        pos = self.pos_t[:, None, None] + self.pos_h[None, :, None] + self.pos_w[None, None, :]
        pos = pos + self.phase_embedding(self.phases)[:, None, None]
        return pos.reshape(t * h * w, -1)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(B, N) ids (mask_id allowed) -> (B, N, dim)."""
        return self.token_emb(ids) + self.position_embedding()

    # condition

    def condition(
        self,
        ecg: EcgFeatures,
        rr: Tensor,
        ref_ids: Tensor,
        ref_valid: Tensor,
        drop: Tensor | None = None,
        layout: str = "masked",
    ) -> Context:
        """Cross-attention context for a batch.

        ecg: the encoder's output; rr (B,) seconds of this beat; ref_ids (B, N) the
        reference loop's tokens (any ids when absent) and ref_valid (B,) whether it is
        given; drop (B,) True where the null condition replaces the ECG (CFG).

        layout (speed only: the attention result is the same, see `KEY_LAYOUTS`):
        "masked" keeps every key and a mask; "dense" drops the mask, for batches whose
        keys are all valid (every row has its reference loop and every ECG patch is
        valid or dropped), so attention runs its maskless kernel (cuDNN or flash on GPU);
        "no_ref" leaves the reference block out, for batches where no row has one
        (its N keys would all be masked: cost without effect). The caller vouches for
        the condition; `key_layout` decides it on the host.
        """
        if layout not in KEY_LAYOUTS:
            raise ValueError(f"layout must be one of {KEY_LAYOUTS}, got {layout!r}")
        b = rr.shape[0]
        phase = ecg.time / rr[:, None]
        ecg_ctx = self.ecg_proj(ecg.emb) + self.phase_embedding(phase)
        ecg_mask = ecg.valid
        if drop is not None:
            ecg_ctx = torch.where(drop[:, None, None], self.null_ecg.to(ecg_ctx.dtype), ecg_ctx)
            ecg_mask = ecg_mask | drop[:, None]
        reg = self.register.expand(b, 1, -1).to(ecg_ctx.dtype)
        reg_mask = torch.ones(b, 1, dtype=torch.bool, device=rr.device)
        if layout == "no_ref":
            return Context(torch.cat([ecg_ctx, reg], dim=1), torch.cat([ecg_mask, reg_mask], dim=1))
        ref_ctx = self.embed_tokens(ref_ids) + self.ref_segment
        tokens = torch.cat([ecg_ctx, ref_ctx, reg], dim=1)
        if layout == "dense":
            return Context(tokens, None)
        ref_mask = ref_valid[:, None].expand(b, ref_ids.shape[1])
        return Context(tokens, torch.cat([ecg_mask, ref_mask, reg_mask], dim=1))

    def guidance_context(
        self, ecg: EcgFeatures, rr: Tensor, ref_ids: Tensor, ref_valid: Tensor, layout: str = "masked"
    ) -> Context:
        """Conditional and null contexts stacked on the batch axis (2B): one forward does both CFG passes."""
        b = rr.shape[0]
        ecg2 = EcgFeatures(*(torch.cat([x, x]) for x in ecg))
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(rr.device)
        return self.condition(
            ecg2, torch.cat([rr, rr]), torch.cat([ref_ids, ref_ids]), torch.cat([ref_valid, ref_valid]), drop, layout
        )

    # forward passes

    def with_keys_values(self, context: Context) -> Context:
        """`context` with its cross-attention keys and values computed: a decode runs the
        transformer once per step on the same context, so they need computing only once."""
        return context._replace(kv=self.transformer.cross_keys_values(context.tokens))

    def forward(self, ids: Tensor, context: Context, rows: Tensor | None = None) -> Tensor:
        """(B, N) token ids -> (B, N, out_dim) logits; with `rows` (B, R) token positions,
        the logits of those tokens only (B, R, out_dim), computed for less (`Transformer.forward`)."""
        x = self.transformer(
            self.embed_tokens(ids), context=context.tokens, context_mask=context.mask, cross_kv=context.kv, rows=rows
        )
        return self.to_out(x)

    def forward_with_cond_scale(self, ids: Tensor, context2: Context, cond_scale: Tensor | float) -> Tensor:
        """Classifier-free guided logits (B, N, V) from a `guidance_context` (2B).

        null + scale · (cond − null): scale 0 is unconditional, 1 conditional, > 1 guided.
        Both passes run as one batch of 2B. The combination is float32 (the resident
        path's `guided_logits` too): in bf16, s · (cond − null) would round the logits.
        """
        logits = self(torch.cat([ids, ids]), context2)
        cond, null = logits.float().chunk(2)
        return null + cond_scale * (cond - null)

    # training

    def mask_for_training(self, ids: Tensor, generator: torch.Generator | None = None,
                          progress: Tensor | None = None) -> Tensor:
        """Which tokens to hide: a cosine-schedule ratio of the non-prime tokens. (B, N) bool.
        `progress` (B, 1) in [0, 1]: where in the schedule each row is (drawn when None)."""
        b, n = ids.shape
        dev = ids.device
        gen_count = n - self.prime_tokens
        if progress is None:
            progress = torch.rand(b, 1, generator=generator, device=dev)
        ratio = cosine_mask_ratio(progress)
        n_masked = (ratio * gen_count).ceil().clamp(1, gen_count)
        scores = torch.rand(b, n, generator=generator, device=dev)
        scores[:, : self.prime_tokens] = 2.0  # the prime frame is never masked
        return random_ranks(scores) < n_masked

    def training_batch(
        self,
        ids: Tensor,
        ecg: EcgFeatures,
        rr: Tensor,
        ref_ids: Tensor,
        ref_valid: Tensor,
        generator: torch.Generator | None = None,
    ) -> TrainingBatch:
        """Token masking, ECG span masking, reference withholding and condition dropout."""
        b = ids.shape[0]
        dev = ids.device
        cfg = self.cfg
        target = self.mask_for_training(ids, generator)
        hidden = hide_ecg_spans(ecg.time, ecg.valid, cfg.ecg_mask_prob, cfg.ecg_mask_max, generator)
        drop = torch.rand(b, generator=generator, device=dev) < cfg.cond_drop_prob
        keep_ref = torch.rand(b, generator=generator, device=dev) >= cfg.ref_drop_prob
        context = self.condition(EcgFeatures(ecg.emb, ecg.time, ecg.valid & ~hidden), rr, ref_ids, ref_valid & keep_ref, drop)
        input_ids = torch.where(target, torch.full_like(ids, self.mask_id), ids)
        return TrainingBatch(input_ids, target, context, hidden, drop)

    def loss(
        self,
        ids: Tensor,
        ecg: EcgFeatures,
        rr: Tensor,
        ref_ids: Tensor,
        ref_valid: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Cross-entropy on the masked tokens only."""
        batch = self.training_batch(ids, ecg, rr, ref_ids, ref_valid, generator)
        logits = self(batch.input_ids, batch.context)
        return F.cross_entropy(logits[batch.target_mask], ids[batch.target_mask])


# checkpoints


def build_transformer(preset: Preset) -> MaskedTransformer:
    return MaskedTransformer(preset.transformer, preset.tokenizer, preset.ecg.dim)


def save_transformer(model: MaskedTransformer, preset: Preset, directory: str | Path, name: str = "transformer", **meta: Any) -> None:
    """DIR/NAME.safetensors + DIR/NAME.json with the full preset (the critic uses name="critic")."""
    kind = "critic" if model.to_out.out_features == 1 else "transformer"
    save_model(directory, name, model, {"kind": kind, "preset": preset.to_dict(), **meta})


def load_transformer(directory: str | Path, name: str = "transformer", device: str | torch.device = "cpu") -> tuple[MaskedTransformer, Preset]:
    weights, config_path = model_paths(directory, name)
    preset = load_preset(config_path, "transformer")
    model = build_transformer(preset)
    load_module(model, weights)
    return model.to(device).eval(), preset
