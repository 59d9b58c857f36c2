"""Transformer building blocks shared by the tokenizer, the ECG encoder, the masked
transformer and the critic: pre-norm attention (self, causal or cross) and feed-forward.

Attention goes through `scaled_dot_product_attention`, so the fused kernels run on GPU
and the math path on CPU, with no branch in our code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Devices whose autocast runs layer_norm in fp32 (CUDA's lists it so; CPU's keeps bf16 in bf16).
UPCASTING_AUTOCAST = ("cuda",)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that keeps a low-precision input's dtype under autocast.

    CUDA autocast runs layer_norm in fp32 and returns fp32, so every linear layer after it casts
    the activations back to bf16: about 430 extra kernels in a paper-preset beat. The
    normalisation kernel accumulates in fp32 whatever its input, so bf16 in, bf16 out
    loses nothing that the next bf16 matmul keeps. Same parameters and state-dict keys
    as nn.LayerNorm. Measured on an H200: a paper-preset beat as one graph replay went
    from 32.7 to 26.3 ms (docs/gpu.md)."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        low_precision = x.dtype in (torch.bfloat16, torch.float16)
        if device not in UPCASTING_AUTOCAST or not low_precision or not torch.is_autocast_enabled(device):
            return super().forward(x)
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        # The switch itself rather than a nested torch.autocast(): no context object per
        # call on a path that runs hundreds of times a beat.
        torch.set_autocast_enabled(device, False)
        try:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        finally:
            torch.set_autocast_enabled(device, True)


class FeedForward(nn.Module):
    """Pre-norm GELU MLP."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult)
        self.down = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head attention.

    Self-attention when `context` is None, cross-attention (queries from x, keys and
    values from context) otherwise. `causal` makes token i see only tokens <= i.
    `key_mask` (batch, keys), True where a key may be attended, hides padding or
    masked-out condition tokens.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, causal: bool = False, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.causal = causal
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (b, heads, keys, d) of `source`: for cross-attention they depend on
        the context alone, so a caller that attends to one context many times computes them once."""
        k, v = self.to_kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (b, n, heads*d) -> (b, heads, n, d)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """`kv`: this layer's `keys_values(context)`, computed beforehand (context is then unused).
        `rows` (b, r): only these tokens ask (queries and output are theirs); in
        self-attention every token is still a key."""
        if self.causal and rows is not None:
            raise ValueError("rows are for bidirectional attention: causal queries need their own positions")
        h = self.norm(x)
        q = self._heads(self.to_q(h if rows is None else take_rows(h, rows)))
        k, v = kv if kv is not None else self.keys_values(h if context is None else context)
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :]  # (b, 1, 1, keys), broadcast over heads and queries
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and context is None and kv is None
        )
        return self.to_out(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Self-attention, optional cross-attention to a condition, feed-forward; all residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        ff_mult: int = 4,
        causal: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, causal=causal)
        self.cross = Attention(dim, heads, dim_head, context_dim=context_dim) if context_dim else None
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        rows: Tensor | None = None,
        copies: int = 1,
    ) -> Tensor:
        """`rows` (b, r): the output holds these tokens only (b, r, dim); they still attend to all.
        `copies`: x holds one of `copies` identical stacks of the batch (see `Transformer.forward`)."""
        own_rows = None if rows is None else rows[: x.shape[0]]  # the stacks' rows are the same too
        attended = self.attn(x, key_mask=key_mask, rows=own_rows)
        x = (x if rows is None else take_rows(x, own_rows)) + attended
        if copies > 1:  # from here on the stacks differ: each meets its own context
            x = x.repeat(copies, 1, 1)
        if self.cross is not None:
            x = x + self.cross(x, context=context, key_mask=context_mask, kv=cross_kv)
        return x + self.ff(x)


class Transformer(nn.Module):
    """A stack of Blocks with a final LayerNorm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int = 4,
        causal: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, ff_mult, causal=causal, context_dim=context_dim) for _ in range(depth)
        )
        self.norm = LayerNorm(dim)

    def cross_keys_values(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every block's cross-attention keys and values of `context`, for `forward(cross_kv=)`:
        MaskGIT attends to the same context at every decode step, so they are computed once."""
        return [block.cross.keys_values(context) for block in self.blocks]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        cross_kv: list[tuple[Tensor, Tensor]] | None = None,
        rows: Tensor | None = None,
        copies: int = 1,
    ) -> Tensor:
        """`key_mask` (batch, tokens) hides tokens of x from self-attention (padding, invalid patches).

        `rows` (batch, r): return these tokens only (batch, r, dim). Every token is needed
        as a key up to the last block, so only the last block computes fewer rows: the
        same values as the full output's rows, for less work (MaskGIT needs the tokens it
        has yet to sample, about half of them over a decode).

        `copies` > 1: the batch is `copies` identical stacks of x (a classifier-free
        guidance pair: the same tokens, conditional and null contexts), and x holds one.
        The first block's self-attention sees x alone, so it runs once for all stacks;
        the stacks part at its cross-attention. `context`, `rows` and the result cover
        the whole batch (copies · b rows)."""
        if copies > 1 and key_mask is not None:
            raise ValueError("copies: the stacks share x and need no key mask of their own")
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            kv = cross_kv[i] if cross_kv is not None else None
            x = block(
                x, context=context, context_mask=context_mask, key_mask=key_mask, cross_kv=kv,
                rows=rows if i == last else None, copies=copies if i == 0 else 1,
            )
        return self.norm(x)


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (b, n, d) at token positions rows (b, r) -> (b, r, d)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sin/cos features of (possibly fractional) positions: (...,) -> (..., dim).

    Used for time in seconds or frame indices; a fixed function of the position alone,
    so it never leaks information across a causal boundary.
    """
    half = dim // 2
    # a Python float, not a CPU tensor: nothing on the host inside a captured GPU pipeline
    freqs = torch.exp(torch.arange(half, device=positions.device) * -math.log(max_period) / half)
    angles = positions.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
