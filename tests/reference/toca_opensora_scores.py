"""Our transcription of the official ToCa and DuCa Open-Sora 1.2 token scores, for tests only.

ToCa (Shenyi-Z/ToCa `Open-Sora/`, `scripts/inference.py`: cache_type 'attention'):
`cache_functions/attention.py` `cached_attention_forward` (the softmax map averaged over heads),
`models/layers/blocks.py` `MultiHeadCrossAttention.forward` (all samples packed into one sequence,
xformers' block-diagonal mask materialised: 0 inside a sample's block, -inf outside; the map viewed
back as [B, N, sum of caption lengths]), `cache_functions/scores.py` `attn_score` (entropy of the
0.5 cond + 0.5 uncond map, `F.normalize(1 + entropy, dim=1)`, repeated for both halves).

DuCa (Shenyi-Z/DuCa `DuCa-Open-Sora/`, `scripts/inference.py`: cache_type 'kv-norm'):
`models/layers/blocks.py` `Attention.forward` (the L2 norm of every head's value vector, rearranged
from the spatial (B T) x S or temporal (B S) x T layout to B H (T S)), `scores.py` `kv_norm_score`
(`F.normalize((1 - v_norm).sum(dim=-2), p=2)`).

Both: `score_evaluate` adds soft_fresh_weight * cache_index / fresh_threshold (force_fresh
'global', 0.25 and 3), and `cache_cutfresh` takes the top-k of `score.argsort(descending=True)`,
then adds 1 to every token's cache_index and zeroes the fresh ones' (`force_init` zeroes all on a
full computation). Written independently of soda; torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FRESH_THRESHOLD, SOFT_FRESH_WEIGHT = 3, 0.25


def block_diagonal_bias(q_seqlen: list[int], kv_seqlen: list[int], shape) -> torch.Tensor:
    """xformers BlockDiagonalMask.from_seqlens(q, kv).materialize(shape): 0 in block b (queries
    of sample b x its caption tokens), -inf elsewhere."""
    bias = torch.full(shape[-2:], float("-inf"))
    qs = ks = 0
    for nq, nk in zip(q_seqlen, kv_seqlen):
        bias[qs:qs + nq, ks:ks + nk] = 0
        qs, ks = qs + nq, ks + nk
    return bias.expand(shape)


def cached_attention_forward(query, key, value, q_seqlen, kv_seqlen):
    scale = 1.0 / query.shape[-1] ** 0.5
    query = query * scale
    query = query.transpose(1, 2)
    key = key.transpose(1, 2)
    value = value.transpose(1, 2)
    attn = torch.matmul(query, key.transpose(-2, -1))
    attn = attn + block_diagonal_bias(q_seqlen, kv_seqlen, attn.shape)
    attn_map = attn.softmax(-1)
    attn = torch.matmul(attn_map, value)
    return attn.transpose(1, 2).contiguous(), attn_map.mean(dim=1)


def cross_attention_with_map(q_linear, kv_linear, proj, num_heads: int, x, cond, y_lens: list[int]):
    """MultiHeadCrossAttention.forward of the ToCa code: x [B, N, C], cond [1, sum(y_lens), C]
    (the valid caption tokens of every sample, packed) -> (output [B, N, C], map [B, N, sum(y_lens)])."""
    B, N, C = x.shape
    head_dim = C // num_heads
    q = q_linear(x).view(1, -1, num_heads, head_dim)
    kv = kv_linear(cond).view(1, -1, 2, num_heads, head_dim)
    k, v = kv.unbind(2)
    x, cross_attn_map = cached_attention_forward(q, k, v, [N] * B, y_lens)
    x = x.view(B, -1, C)
    cross_attn_map = cross_attn_map.view(B, -1, cross_attn_map.shape[-1])
    return proj(x), cross_attn_map


def value_norms(qkv, num_heads: int, x_m, T: int, S: int, temporal: bool):
    """DuCa's Attention.forward kv-norm branch on the modulated tokens x_m [B, T*S, C] (frame-major),
    laid out as the block does ("B (T S) C -> (B S) T C" temporal, "-> (B T) S C" spatial):
    v_norm [B, H, T*S]."""
    B, N, C = x_m.shape
    if temporal:
        x = x_m.reshape(B, T, S, C).permute(0, 2, 1, 3).reshape(B * S, T, C)
    else:
        x = x_m.reshape(B * T, S, C)
    b, n, _ = x.shape
    q, k, v = qkv(x).view(b, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    if temporal:  # "(B S) H T C -> B H (T S) C"
        v = v.reshape(B, S, num_heads, T, -1).permute(0, 2, 3, 1, 4).reshape(B, num_heads, T * S, -1)
    else:  # "(B T) H S C -> B H (T S) C"
        v = v.reshape(B, T, num_heads, S, -1).permute(0, 2, 1, 3, 4).reshape(B, num_heads, T * S, -1)
    return torch.norm(v, dim=-1, p=2)


def attn_score(cross_attn_map):
    cond_cmap, uncond_cmap = torch.split(cross_attn_map, len(cross_attn_map) // 2, dim=0)
    cond_weight = 0.5
    cmap = cond_weight * cond_cmap + (1 - cond_weight) * uncond_cmap
    cross_attention_entropy = -torch.sum(cmap * torch.log(cmap + 1e-7), dim=-1)
    cross_attention_score = F.normalize(1 + cross_attention_entropy, dim=1, p=2)
    return cross_attention_score.repeat(2, 1)


def kv_norm_score(v_norm):
    kv_norm = 1 - v_norm
    return F.normalize(kv_norm.sum(dim=-2), p=2)


def score_evaluate(base, cache_index):
    soft_step_score = cache_index.float() / FRESH_THRESHOLD
    return base + SOFT_FRESH_WEIGHT * soft_step_score


def cache_cutfresh(score, topk: int, cache_index):
    """Fresh indices [B, topk] (in score order) and the updated cache_index."""
    indices = score.argsort(dim=-1, descending=True)
    fresh_indices = indices[:, :topk]
    cache_index = cache_index + 1
    cache_index.scatter_(dim=1, index=fresh_indices, src=torch.zeros_like(fresh_indices, dtype=torch.int))
    return fresh_indices, cache_index
