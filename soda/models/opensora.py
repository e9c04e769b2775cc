"""Open-Sora 1.2's STDiT3 (hpcaitech/Open-Sora v1.2.0), with parameter names identical to the
official checkpoints (`OpenSora-STDiT-v3`).

Video latents [B, C, T, H, W] become tokens in one flat layout [B, N, D], N = T * S with
S = H * W patches per frame (frame-major, as the official code). The toolchain only ever sees that
layout; the two kinds of self-attention reshape inside themselves: spatial blocks attend over the S
patches of each frame ((B*T) x S), temporal blocks over the T frames of each patch ((B*S) x T,
with rotary position embedding). 28 spatial and 28 temporal blocks run interleaved, so the adapter
exposes 56 layers, each with modules `attn` (gated, mixes tokens along its axis), `cross_attn` (to
the caption; no norm, no gate, token-wise) and `mlp` (gated, token-wise).

Conditioning has three lifetimes, each computed once at its own: per generation the caption
projection, its mask and every layer's cross-attention K/V (`Caption`); per step the timestep +
fps embedding and the shared `t_block` output (`StepCond`); per layer the block's modulation.
`forward` composes the pieces exactly as the official `STDiT3.forward` does (text-to-video: no
temporal `x_mask`), so a full-compute schedule is the official model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.errors import UserError
from soda.models.caption_attention import CaptionAttentionProjections, entropy_term
from soda.models.config import REGISTRY, ModelConfig, get_config
from soda.models.video import (DEFAULT_VIDEO, IMG_FPS, INPUT_SQ_SIZE, OFFICIAL_VIDEO, latent_frames,  # noqa: F401
                               resolve_video, video_config)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --- layers (official names) ----------------------------------------------------------------------
class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch; the latent is zero-padded up to a multiple of the patch."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, D, T, H/ph, W/pw] (sizes from the input: any video in a graph)."""
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patches(x).flatten(2).transpose(1, 2)  # [B, T*H*W, D], frame-major


class RMSNorm(nn.Module):
    """LlamaRMSNorm (q/k norm over the head dimension)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """rotary_embedding_torch's RotaryEmbedding as STDiT3 uses it: 'lang' frequencies, theta 10000,
    interleaved pairs, positions 0..T-1. `freqs` is a parameter there, so checkpoints carry it."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.freqs = nn.Parameter(1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)),
                                  requires_grad=False)
        rot = torch.zeros(dim, dim)
        rot[torch.arange(1, dim, 2), torch.arange(0, dim, 2)] = -1.0
        rot[torch.arange(0, dim, 2), torch.arange(1, dim, 2)] = 1.0
        self.register_buffer("rotate_half", rot, persistent=False)  # a matmul, not a reshape: exports cleanly

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, d]: rotate each (2i, 2i+1) pair by angle pos * freqs[i]."""
        pos = torch.ones_like(x[(0,) * (x.dim() - 2)][:, 0]).cumsum(0) - 1  # 0..T-1 from the shape: any T in a graph
        angles = pos[:, None] * self.freqs.repeat_interleave(2)[None, :]  # [T, d]: pair i turns by pos * freqs[i]
        rotated = x @ self.rotate_half  # (x0, x1) -> (-x1, x0) per pair, exact (one +-1 term per output)
        return x * angles.cos() + rotated * angles.sin()


class Attention(nn.Module):
    """Self-attention with q/k RMSNorm; `rope` set = temporal (RoPE over the sequence axis)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self._rope = [rope]  # a reference, not a submodule: its weights live once, at `rope.freqs`

    def forward(self, x: torch.Tensor, return_value_norm: bool = False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = self._rope[0]
        if rope is not None:
            q, k = rope.rotate(q), rope.rotate(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if not return_value_norm:
            return out
        # DuCa-Open-Sora's kv-norm score before normalisation: sum over heads of 1 - |v_head|, [B, N]
        return out, (1 - torch.linalg.vector_norm(v, dim=-1)).sum(dim=1)


class MultiHeadCrossAttention(CaptionAttentionProjections):
    """Image tokens attend to their own sample's caption tokens (key-padding mask per sample; the
    official code packs the valid tokens of all samples into one block-diagonal sequence, the same
    attention). K/V depend on the caption only, so `kv` runs once per generation."""

    def kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption tokens [B, L, D] -> K, V each [B, heads, L, d]."""
        B, L, _ = y.shape
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                return_entropy: bool = False):
        """x [B, n, D] (any subset of tokens), mask [B, L] bool (True = a caption token). With
        `return_entropy` also, per token, -sum_j 0.5 p log(0.5 p + 1e-7) of the head-averaged map p
        over its caption: ToCa-Open-Sora's entropy of the (cond + uncond) / 2 map is this term of a
        conditional row plus its unconditional row (their maps cover disjoint caption tokens in the
        official packed sequence; a masked token has p = 0 there and here)."""
        B, n, C = x.shape
        q = self.q_linear(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, n, C))
        if not return_entropy:
            return out
        return out, entropy_term(attn)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos first) -> MLP; also the fps embedder (`SizeEmbedder`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class CaptionEmbedder(nn.Module):
    """`y_proj` (Mlp caption_channels -> D -> D, GELU-tanh) and the learned null caption `y_embedding`."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


def position_embedding(dim: int, patches: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PositionEmbedding2D of an h x w patch grid (`patches` [h, w]: only its shape is read): [h, w,
    dim]; the first half encodes the patch's column, the second its row, each as [sin, cos] of
    coordinate / scale * base_size / side with base_size = round(sqrt(h * w)). Built from tensor
    ops on the grid's shape (no Python sizes), so an exported graph takes any grid."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    ones = torch.ones_like(patches, dtype=torch.float32)
    h, w = ones[:, 0].sum(), ones[0].sum()
    base_size = torch.round(torch.sqrt(h * w))
    col = (ones[0].cumsum(0) - 1) / scale * (base_size / w)  # [w]
    row = (ones[:, 0].cumsum(0) - 1) / scale * (base_size / h)  # [h]

    def sincos(c: torch.Tensor) -> torch.Tensor:
        out = c[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    zeros = (ones - 1)[:, :, None]
    return torch.cat([sincos(col)[None] + zeros, sincos(row)[:, None] + zeros], dim=-1)


def unpatchify(x: torch.Tensor, T, H, W, p: int, C: int) -> torch.Tensor:
    """Final-layer tokens [B, T*Hp*Wp, p*p*C] -> [B, C, T, H, W], the patch padding cropped (sizes
    may be ints or 0-dim tensors, so a graph takes any video)."""
    B = x.shape[0]
    Hp, Wp = (H + p - 1) // p, (W + p - 1) // p
    x = x.reshape(B, T, Hp, Wp, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(B, C, T, Hp * p, Wp * p)[:, :, :, :H, :W]


# --- what the loop hands back to the modules --------------------------------------------------
@dataclass
class Grid:
    """Token layout of one latent: T frames x (H x W) patches after padding, and the raw sizes."""

    T: int
    H: int
    W: int
    raw: tuple[int, int, int]

    @property
    def S(self) -> int:
        return self.H * self.W


@dataclass
class Caption:
    """Per generation: projected caption [B, L, D], its mask [B, L] and each layer's K/V (lazily)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    kv: dict

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(dim=1).tolist()


@dataclass
class StepCond:
    """Per step: t = t_embedder(t) + fps_embedder(fps) [B, D] (the final layer's input) and
    t_mlp = t_block(t) [B, 6D], shared by every block."""

    t: torch.Tensor
    t_mlp: torch.Tensor


@dataclass
class Modulation:
    shift: torch.Tensor | None
    scale: torch.Tensor | None
    gate: torch.Tensor | None  # None: the module is added with weight 1


class STDiT3Block(nn.Module):
    modules_order = ("attn", "cross_attn", "mlp")

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 temporal: bool = False, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm, rope=rope if temporal else None)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t_mlp: torch.Tensor) -> dict[str, Modulation]:
        B = t_mlp.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).unbind(1)
        return {"attn": Modulation(shift_msa, scale_msa, gate_msa),
                "cross_attn": Modulation(None, None, None),
                "mlp": Modulation(shift_mlp, scale_mlp, gate_mlp)}

    def mix(self, x: torch.Tensor, T, return_value_norm: bool = False):
        """Self-attention on flat tokens [B, T*S, D] of T frames (an int, or a 0-dim tensor in a
        graph), along this block's axis; with `return_value_norm`, also DuCa's per-token value-norm
        score [B, T*S] in the flat layout."""
        B, N, C = x.shape
        frames = x.reshape(B, T, -1, C)  # [B, T, S, C]
        if self.temporal:
            out, score = self.attn(frames.transpose(1, 2).flatten(0, 1), True)  # (B*S) x T
            out = out.reshape(B, -1, T, C).transpose(1, 2).reshape(B, N, C)
            score = score.reshape(B, -1, T).transpose(1, 2).reshape(B, N)
        else:
            out, score = self.attn(frames.flatten(0, 1), True)  # (B*T) x S
            out, score = out.reshape(B, N, C), score.reshape(B, N)
        return (out, score) if return_value_norm else out

    def run_module(self, name: str, x: torch.Tensor, mod: Modulation, grid: Grid, kv=None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-gate output of module `name`: on all tokens for `attn`, on any subset for the others."""
        if name == "attn":
            return self.mix(t2i_modulate(self.norm1(x), mod.shift[:, None], mod.scale[:, None]), grid.T)
        if name == "cross_attn":
            return self.cross_attn(x, kv[0], kv[1], mask)
        if name == "mlp":
            return self.mlp(t2i_modulate(self.norm2(x), mod.shift[:, None], mod.scale[:, None]))
        raise KeyError(name)


class STDiT3(nn.Module):
    """The adapter interface: `encode_caption` (per generation), `step_cond` (per step), `embed`,
    `layers[l].modulation` / `.run_module` (56 interleaved blocks), `final`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, heads = config.hidden_size, config.num_heads
        if D % heads or D % 4 or (D // heads) % 2 or config.depth % 2:
            raise UserError(f"width {D} with {heads} heads and {config.depth} layers: STDiT3 needs the width "
                            "divisible by 4 and by the head count, an even head width, and an even layer count "
                            "(spatial and temporal blocks)")
        p = config.patch_size
        self.rope = RotaryEmbedding(D // heads)
        self.x_embedder = PatchEmbed3D((1, p, p), config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.fps_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.caption_len)
        qk_norm = config.qk_norm is not False
        block = lambda temporal: STDiT3Block(D, heads, config.mlp_ratio, qk_norm, temporal, self.rope)  # noqa: E731
        self.spatial_blocks = nn.ModuleList([block(False) for _ in range(config.depth // 2)])
        self.temporal_blocks = nn.ModuleList([block(True) for _ in range(config.depth // 2)])
        self.final_layer = T2IFinalLayer(D, p * p, config.out_channels)

    @property
    def layers(self) -> list[STDiT3Block]:
        """spatial 0, temporal 0, spatial 1, ... (the official execution order): config.depth layers."""
        return [b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair]

    @property
    def blocks(self) -> list[STDiT3Block]:
        return self.layers

    def null_caption_table(self) -> np.ndarray:
        """The learned null caption [caption_len, C] (the unconditional rows without negatives)."""
        return self.y_embedder.y_embedding.detach().numpy().copy()

    def randomize(self, seed: int = 0) -> None:
        """Random weights everywhere with outputs of order one (a random-init model to exercise the
        toolchain; the official init zeroes the temporal blocks' output projections)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name == "rope.freqs":
                    continue
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / math.prod(p.shape[1:]) ** 0.5)
                elif name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            self.y_embedder.y_embedding.copy_(torch.randn(self.y_embedder.y_embedding.shape, generator=g))

    # --- per generation ------------------------------------------------------------------------
    def encode_caption(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> Caption:
        """Caption embeddings [B, L, C_text] (mask [B, L]) -> projected caption for every layer."""
        if y.shape[-1] != self.config.caption_channels:
            raise UserError(f"caption width {y.shape[-1]} does not match the checkpoint's "
                            f"{self.config.caption_channels}")
        mask = torch.ones(y.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise UserError("a caption mask selects no token; every prompt needs at least one")
        return Caption(self.y_embedder(y), mask, {})

    def layer_kv(self, layer: int, caption: Caption):
        if layer not in caption.kv:
            caption.kv[layer] = self.layers[layer].cross_attn.kv(caption.tokens)
        return caption.kv[layer]

    def grid(self, x: torch.Tensor) -> Grid:
        _, _, T, H, W = x.shape
        p = self.config.patch_size
        return Grid(T, -(-H // p), -(-W // p), (T, H, W))

    # --- per step ------------------------------------------------------------------------------
    def step_cond(self, t: torch.Tensor, fps: torch.Tensor) -> StepCond:
        """t [B] (rectified-flow time in [0, 1000]), fps [B] or [1]."""
        if fps.shape[0] != t.shape[0]:
            fps = fps.repeat(t.shape[0] // fps.shape[0])
        tt = self.t_embedder(t) + self.fps_embedder(fps)
        return StepCond(tt, self.t_block(tt))

    def embed(self, x: torch.Tensor, height: float, width: float) -> tuple[torch.Tensor, Grid]:
        """Latents [B, C, T, H, W] -> tokens [B, T*S, D] with the position embedding of a
        `height` x `width` pixel video (scale = sqrt(h*w) / input_sq_size), and their grid."""
        scale = torch.tensor((height * width) ** 0.5 / INPUT_SQ_SIZE, dtype=torch.float32)
        return self.patch_tokens(x, scale), self.grid(x)

    def patch_tokens(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> tokens [B, T*S, D] plus the position embedding at `scale`."""
        patches = self.x_embedder.patches(x)  # [B, D, T, Hp, Wp]
        pos = position_embedding(self.config.hidden_size, patches[0, 0, 0], scale)  # [Hp, Wp, D]
        return (patches.permute(0, 2, 3, 4, 1) + pos.to(patches.dtype)).flatten(1, 3)

    def final(self, tokens: torch.Tensor, cond: StepCond, grid: Grid) -> torch.Tensor:
        """Tokens -> model output [B, C_out, T, H, W] (padding cropped)."""
        return unpatchify(self.final_layer(tokens, cond.t), *grid.raw, self.config.patch_size,
                          self.config.out_channels)

    # --- the generic adapter protocol (soda.models.interface) --------------------------------------
    # The video size comes with the inputs, never from the config: the latent's own shape (embed),
    # the conditioning's "grid" (latent frames, height, width: attention) and "pe_scale" (the
    # position-embedding scale), and the step's "grid" (final). So the exported graphs take any video.
    def prepare(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per generation: caption [B, L, C] -> each layer's cross-attention K/V [B, L, D] (the mask,
        fps and video size stay in the conditioning, which the loop keeps next to these)."""
        caption = cond["caption"].float()
        if caption.shape[-1] != self.config.caption_channels:
            raise UserError(f"caption width {caption.shape[-1]} does not match the checkpoint's "
                            f"{self.config.caption_channels}")
        y = self.y_embedder(caption)
        ctx = {}
        for l, block in enumerate(self.layers):
            ctx[f"k.{l}"], ctx[f"v.{l}"] = block.cross_attn.kv_linear(y).chunk(2, dim=-1)
        return ctx

    def step_embed(self, x: torch.Tensor, t: torch.Tensor, context: dict) -> tuple[torch.Tensor, tuple]:
        """Per step: tokens (patches + position embedding at the conditioning's scale) and
        (t_mlp [B, 6D] for every block, t [B, D] for the final layer, the latent's grid [B, 3])."""
        tokens = self.patch_tokens(x, context["pe_scale"][0].float())
        cond = self.step_cond(t.float(), context["fps"].float())
        shape = torch._shape_as_tensor(x)[2:].to(t.device)  # T, H, W of the latent (a Shape op in a graph)
        grid = torch.zeros_like(t[:, None], dtype=torch.int64) + shape  # [B, 3]
        return tokens, (cond.t_mlp, cond.t, grid)

    def layer_modulation(self, layer: int, step: tuple, gates_only: frozenset[str] = frozenset()
                         ) -> dict[str, tuple[tuple, torch.Tensor | None]]:
        # A table add: nothing to save for `gates_only` (a DiT layer's matmul), so every term comes.
        mods = self.layers[layer].modulation(step[0])
        return {name: (() if m.shift is None else (m.shift, m.scale), m.gate) for name, m in mods.items()}

    def module_forward(self, layer: int, name: str, tokens: torch.Tensor, args: tuple, context: dict | None = None):
        """(pre-gate D, per-token score): `attn` (always on every token) with DuCa's value norms,
        `cross_attn` with ToCa's entropy half, `mlp` with none."""
        block = self.layers[layer]
        if name == "attn":
            shift, scale = args
            return block.mix(t2i_modulate(block.norm1(tokens), shift[:, None], scale[:, None]), context["grid"][0, 0],
                             return_value_norm=True)
        if name == "cross_attn":
            B, L, D = context["k"].shape
            heads = self.config.num_heads
            split = lambda a: a.reshape(B, L, heads, D // heads).transpose(1, 2)  # noqa: E731
            return block.cross_attn(tokens, split(context["k"]), split(context["v"]), context["mask"].bool(),
                                    return_entropy=True)
        if name == "mlp":
            shift, scale = args
            return block.mlp(t2i_modulate(block.norm2(tokens), shift[:, None], scale[:, None])), None
        raise KeyError(name)

    def step_final(self, tokens: torch.Tensor, step: tuple) -> torch.Tensor:
        grid = step[2]
        T, H, W = grid[0, 0], grid[0, 1], grid[0, 2]
        return unpatchify(self.final_layer(tokens, step[1]), T, H, W, self.config.patch_size, self.config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                fps: torch.Tensor, height: float, width: float) -> torch.Tensor:
        """The official forward (x_mask=None): y [B, L, C_text] with mask [B, L]."""
        caption = self.encode_caption(y, mask)
        cond = self.step_cond(t, fps)
        tokens, grid = self.embed(x, height, width)
        for l, block in enumerate(self.layers):
            mods = block.modulation(cond.t_mlp)
            for name in block.modules_order:
                mod = mods[name]
                kv = self.layer_kv(l, caption) if name == "cross_attn" else None
                D = block.run_module(name, tokens, mod, grid, kv, caption.mask)
                tokens = tokens + (D if mod.gate is None else mod.gate[:, None] * D)
        return self.final(tokens, cond, grid)


# --- the video a command makes ------------------------------------------------------------------
def apply_video(model: "STDiT3", height: int | None = None, width: int | None = None, num_frames: int | None = None,
                fps: float | None = None) -> tuple[int, int, int, float]:
    """Set the model's config to a pixel video (unset flags: the model's default video) and return
    (height, width, num_frames, fps the model sees: 120 for a single image, as the official code)."""
    model.config, video = resolve_video(model.config, height, width, num_frames, fps)
    return video


# --- checkpoints --------------------------------------------------------------------------------
GENERIC = "opensora"


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, name: str = GENERIC) -> ModelConfig:
    """Architecture from the tensors (the video size: the official default until the caller sets
    one). The head width is read from the q/k norm (or `rope.freqs`); only a checkpoint with
    neither needs `num_heads`."""
    try:
        proj = state["x_embedder.proj.weight"]  # [D, C, pt, ph, pw]
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], tuple(proj.shape[2:])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("spatial_blocks."))
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
        max_length = state["y_embedder.y_embedding"].shape[0]
        out_dim = state["final_layer.linear.weight"].shape[0]
        mlp_hidden = state["spatial_blocks.0.mlp.fc1.weight"].shape[0]
        if len(patch) != 3 or "temporal_blocks.0.attn.qkv.weight" not in state:
            raise KeyError("temporal_blocks / a 3D patch embedding")
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"checkpoint does not look like an Open-Sora STDiT3 (missing {e})") from None
    if patch[0] != 1 or patch[1] != patch[2]:
        raise UserError(f"patch size {patch}: only (1, p, p) patches are supported (Open-Sora 1.2 uses (1, 2, 2))")
    qk_norm = "spatial_blocks.0.attn.q_norm.weight" in state
    head_dim = (state["spatial_blocks.0.attn.q_norm.weight"].shape[0] if qk_norm
                else 2 * state["rope.freqs"].shape[0] if "rope.freqs" in state else None)
    if num_heads is None:
        if head_dim is None:
            raise UserError("this checkpoint has neither q/k norms nor rope.freqs to read the head count from; "
                            "pass --num-heads")
        num_heads = hidden // head_dim
    elif head_dim is not None and num_heads * head_dim != hidden:
        raise UserError(f"--num-heads {num_heads} disagrees with the checkpoint's head width {head_dim} "
                        f"(width {hidden} means {hidden // head_dim} heads)")
    if num_heads < 1 or hidden % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the width {hidden}")
    out_ch = out_dim // (patch[1] * patch[2])
    height, width, frames, _ = OFFICIAL_VIDEO
    base = ModelConfig(name, depth=2 * depth, hidden_size=hidden, patch_size=patch[1], num_heads=num_heads,
                       in_channels=in_ch, num_classes=0, learn_sigma=out_ch == 2 * in_ch, mlp_ratio=mlp_hidden / hidden,
                       arch="opensora", caption_channels=caption_channels, caption_len=max_length, qk_norm=qk_norm)
    return video_config(base, height, width, frames)


def load(name: str, ckpt=None, num_heads: int | None = None, random_init: bool = False,
         seed: int = 0) -> tuple[STDiT3, str]:
    """(model in eval mode, float32, weights identity): the checkpoint's sha256 or "random-init-<seed>".

    Checkpoints: the released safetensors (official key names), a bare state dict, or a training
    checkpoint holding one under "ema"/"model". `rope.freqs` may be absent (it is a constant)."""
    from soda.models.loading import _check_keys, file_sha256, read_state_dict

    if name != GENERIC:
        get_config(name, num_heads=num_heads)
    if random_init:
        if name == GENERIC:
            raise UserError(f"--random-init needs a named config (e.g. opensora-v1.2), not the generic '{GENERIC}'")
        model = STDiT3(get_config(name))
        model.randomize(seed)
        return model.eval(), f"random-init-{seed}"
    if ckpt is None:
        raise UserError(f"model {name!r} needs --ckpt FILE (the released OpenSora-STDiT-v3 model.safetensors), "
                        "or --random-init to try the toolchain without weights")
    state = {k: v.float() for k, v in read_state_dict(ckpt).items()}
    # A named config fixes the architecture (misfits are listed key by key); the generic one reads it.
    config = infer_config(state, num_heads) if name == GENERIC else REGISTRY[name]
    state.setdefault("rope.freqs", RotaryEmbedding(config.hidden_size // config.num_heads).freqs.detach())
    with torch.device("meta"):  # shapes only: a misfit is reported before any real allocation
        _check_keys(STDiT3(config), state, ckpt)
    model = STDiT3(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), file_sha256(Path(ckpt))
