"""What PixArt's and Open-Sora's cross-attention share (both from PixArt-alpha's
`MultiHeadCrossAttention`): the projections, under the official parameter names, and ToCa's
per-token entropy term. Their K/V layout and caption-mask semantics differ, so each adapter
keeps its own class (`soda.models.pixart.CrossAttention`, `soda.models.opensora.MultiHeadCrossAttention`)."""
from __future__ import annotations

import torch
import torch.nn as nn


class CaptionAttentionProjections(nn.Module):
    """q_linear (image tokens), kv_linear (caption tokens -> K and V) and proj, width d_model."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)


def entropy_term(attn: torch.Tensor) -> torch.Tensor:
    """Per token, -sum_j 0.5 p log(0.5 p + 1e-7) of the head-averaged map p over the caption
    (`attn` [B, heads, n, L] -> [B, n]): ToCa's entropy of the (cond + uncond) / 2 map is this term
    of a conditional row plus its unconditional row (PixArt-ToCa's and ToCa-Open-Sora's `attn_score`;
    the `toca-cross-entropy` selector adds the halves)."""
    half = 0.5 * attn.mean(dim=1)
    return -(half * torch.log(half + 1e-7)).sum(dim=-1)
