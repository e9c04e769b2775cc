"""PixArt-alpha (PixArt-alpha/PixArt-alpha `PixArt.py`), with the official parameter names.

Per block: self-attention gated by `t2i_modulate(norm1(x), shift, scale)`; cross-attention to
the caption with no norm and no gate; MLP gated like self-attention. The six modulation
vectors are the block's `scale_shift_table` plus `t0 = t_block(t_embedder(t))`, shared by all
blocks. What the toolchain sees is the generic adapter protocol (`soda.models.interface`):
- `prepare` (per generation): caption projection `y_embedder.y_proj` and every layer's
  cross-attention K/V, computed once; the mask stays with them;
- `step_embed` (per step): patch tokens + fixed position embedding, and (t0, t_emb);
- `layer_modulation` (per layer): the table add, no matmul;
- `module_forward`: one module's pre-gate output on any subset of tokens;
- `step_final`: `T2IFinalLayer`, driven by t_emb (not t0).

The caption mask: the official code packs the valid tokens of every row (xformers'
BlockDiagonalMask); here each row attends to its own caption with masked keys getting a
-10000 bias (diffusers' convention), which is the same attention whenever a row has at
least one valid token. Masks must be given: the official code with `mask=None` attends across
the batch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from soda.errors import UserError
from soda.models.caption_attention import CaptionAttentionProjections, entropy_term
from soda.models.config import ModelConfig
from soda.models.dit import Attention, Mlp, PatchEmbed, TimestepEmbedder

MASK_BIAS = -10000.0
TOKEN_NUM = 120  # length of the learned null caption (and the T5 pipeline's max_sequence_length)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class CaptionMlp(nn.Module):
    """timm Mlp(in, hidden, out) with GELU-tanh: `y_embedder.y_proj.fc1/fc2`."""

    def __init__(self, in_features: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, hidden_size: int, token_num: int = TOKEN_NUM):
        super().__init__()
        self.y_proj = CaptionMlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)

    def token_drop(self, caption: torch.Tensor, drop_ids: torch.Tensor) -> torch.Tensor:
        """Training's caption dropout (official `token_drop`): rows in `drop_ids` [B] (bool) get
        the null caption's first L tokens; their mask stays the caption's, as in the official code."""
        null = self.y_embedding[: caption.shape[1]].to(caption.dtype)
        return torch.where(drop_ids[:, None, None], null[None], caption)


class CrossAttention(CaptionAttentionProjections):
    """MultiHeadCrossAttention: queries from the image tokens, keys/values from the caption.

    `kv(y)` is what `prepare` caches per layer; `forward` takes the cached K/V."""

    def kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected caption [B, L, D] -> K, V, each [B, L, D]."""
        return self.kv_linear(y).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                return_entropy: bool = False):
        """Output [B, N, C]; with `return_entropy` also, per token, -sum_j 0.5 p log(0.5 p + 1e-7)
        of the head-averaged attention p over the caption: PixArt-ToCa's cross-attention entropy
        score of the (cond + uncond) / 2 map is this term of a cond row plus its uncond row."""
        B, N, C = x.shape
        L = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_linear(x).reshape(B, N, h, d).transpose(1, 2)
        k = k.reshape(B, L, h, d).transpose(1, 2)
        v = v.reshape(B, L, h, d).transpose(1, 2)
        bias = ((1 - mask.to(q.dtype)) * MASK_BIAS)[:, None, None, :]
        attn = ((q * d**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if not return_entropy:
            return out
        return out, entropy_term(attn)


class PixArtBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each [B, D]."""
        B = t0.shape[0]
        return tuple(c.squeeze(1) for c in (self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1))


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    """PixArt-alpha; the adapter protocol is `prepare`, `step_embed`, `layer_modulation`,
    `module_forward`, `step_final` (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "pixart":
            raise ValueError(f"{config.name} is not a PixArt config")
        self.config = config
        self.out_channels = config.out_channels
        H = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, H)
        self.t_embedder = TimestepEmbedder(H)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H, bias=True))
        self.y_embedder = CaptionEmbedder(config.caption_channels, H)
        grid = config.input_size // config.patch_size
        pos = pixart_pos_embed(H, grid, config.pe_interpolation)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0))
        self.blocks = nn.ModuleList([PixArtBlock(H, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(H, config.patch_size, self.out_channels)
        self.has_null_caption = True  # False for diffusers checkpoints (no y_embedding there)

    def initialize_weights(self) -> None:
        """The official initialisation (`PixArt.initialize_weights`): xavier linears, the patch
        embedding as a linear, N(0, 0.02) timestep/t_block/caption MLPs, and zeros for every
        cross-attention output and the final linear. The null caption `y_embedding` is a buffer
        (randn / sqrt(C)) there too, so the official optimiser never updates it."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def randomize(self, seed: int = 0, std: float = 0.02) -> None:
        """Small random weights everywhere (the official init zeroes the output and each
        cross-attention's projection, which would make a random model constant)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (std if p.ndim > 1 else std / 2))
            self.y_embedder.y_embedding.copy_(torch.randn(self.y_embedder.y_embedding.shape, generator=g))

    # --- the adapter protocol ---------------------------------------------------------------------
    def prepare(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per generation: the caption [B, L, C] -> each layer's cross-attention K/V (the mask
        stays in the conditioning, which the loop keeps next to these)."""
        y = self.y_embedder(cond["caption"].float())
        ctx = {}
        for l, block in enumerate(self.blocks):
            ctx[f"k.{l}"], ctx[f"v.{l}"] = block.cross_attn.kv(y)
        return ctx

    def step_embed(self, x: torch.Tensor, t: torch.Tensor, context: dict | None = None) -> tuple[torch.Tensor, tuple]:
        tokens = self.x_embedder(x) + self.pos_embed
        temb = self.t_embedder(t)
        return tokens, (self.t_block(temb), temb)

    def layer_modulation(self, layer: int, step: tuple, gates_only: frozenset[str] = frozenset()
                         ) -> dict[str, tuple[tuple, torch.Tensor | None]]:
        # A table add: nothing to save for `gates_only` (a DiT layer's matmul), so every term comes.
        sm, cm, gm, sf, cf, gf = self.blocks[layer].modulation(step[0])
        return {"attn": ((sm, cm), gm), "cross_attn": ((), None), "mlp": ((sf, cf), gf)}

    def module_forward(self, layer: int, name: str, tokens: torch.Tensor, args: tuple, context: dict | None = None):
        block = self.blocks[layer]
        if name == "attn":
            shift, scale = args
            return block.attn(t2i_modulate(block.norm1(tokens), shift[:, None], scale[:, None]), return_received=True)
        if name == "cross_attn":
            return block.cross_attn(tokens, context["k"], context["v"], context["mask"], return_entropy=True)
        if name == "mlp":
            shift, scale = args
            return block.mlp(t2i_modulate(block.norm2(tokens), shift[:, None], scale[:, None])), None
        raise KeyError(name)

    def step_final(self, tokens: torch.Tensor, step: tuple) -> torch.Tensor:
        return self.unpatchify(self.final_layer(tokens, step[1]))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The whole model: latents, timesteps, caption [B, L, C], mask [B, L] -> [B, 2C, H, W]."""
        ctx = self.prepare({"caption": caption, "mask": mask})
        tokens, step = self.step_embed(x, t)
        for l in range(len(self.blocks)):
            mods = self.layer_modulation(l, step)
            for name in ("attn", "cross_attn", "mlp"):
                args, gate = mods[name]
                own = {"k": ctx[f"k.{l}"], "v": ctx[f"v.{l}"], "mask": mask}
                D = self.module_forward(l, name, tokens, args, own)[0]
                tokens = tokens + (gate[:, None] * D if gate is not None else D)
        return self.step_final(tokens, step)

    def null_caption_table(self) -> np.ndarray | None:
        """The learned null caption [token_num, C] for unconditional rows, or None (diffusers)."""
        return self.y_embedder.y_embedding.detach().numpy().copy() if self.has_null_caption else None

    def null_caption(self, length: int) -> torch.Tensor:
        """The learned null caption's first `length` tokens, [length, C]."""
        if not self.has_null_caption:
            raise UserError("this checkpoint has no learned null caption (a diffusers checkpoint): "
                            "give negative_prompt_embeds and negative_prompt_attention_mask in --prompt-embeds")
        if length > self.y_embedder.y_embedding.shape[0]:
            raise UserError(f"captions of {length} tokens are longer than the learned null caption "
                            f"({self.y_embedder.y_embedding.shape[0]}); give negatives in --prompt-embeds")
        return self.y_embedder.y_embedding[:length]


# --- fixed 2D sin-cos position embedding with PixArt's interpolation scale ------------------------
def pixart_pos_embed(embed_dim: int, grid_size: int, scale: float | None) -> np.ndarray:
    """Official `get_2d_sincos_pos_embed(..., lewei_scale, base_size=grid)`: positions i / scale."""
    from soda.models.dit import _1d_sincos

    scale = 1.0 if scale is None else float(scale)
    g = np.arange(grid_size, dtype=np.float32).astype(np.float64) / scale  # base_size = grid_size
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([_1d_sincos(embed_dim // 2, grid[0]), _1d_sincos(embed_dim // 2, grid[1])], axis=1)


def scale_from_pos_embed(pos: np.ndarray, embed_dim: int, grid_size: int) -> float:
    """The interpolation scale a stored position embedding was made with (exact check after).

    Token 1 sits at x = 1/scale; its first sin/cos pair (frequency 1) gives x in [0, 2 pi)."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, embed_dim)
    q = embed_dim // 4  # emb_h = [sin(x w) | cos(x w)] over embed_dim // 2 columns
    x = math.atan2(pos[1, 0], pos[1, q]) % (2 * math.pi)
    if x <= 0:
        raise UserError("the checkpoint's pos_embed is not a PixArt sin-cos embedding")
    scale = 1.0 / x
    for nice in (0.25, 0.5, 1.0, 2.0, 4.0):
        if abs(scale - nice) < 1e-4:
            scale = nice
    if np.abs(pixart_pos_embed(embed_dim, grid_size, scale) - pos).max() > 1e-4:
        raise UserError("the checkpoint's pos_embed is not a PixArt sin-cos embedding at any interpolation scale")
    return scale


# --- checkpoints: official .pth and diffusers folders ----------------------------------------------
MS_KEYS = ("csize_embedder.", "ar_embedder.")
MS_REFUSAL = ("PixArt-XL-2-1024-MS adds resolution and aspect-ratio embedders (csize_embedder, ar_embedder), "
              "which this version does not support; use PixArt-XL-2-256x256 or 512x512")


def official_config(state: dict[str, torch.Tensor], name: str, num_heads: int | None) -> ModelConfig:
    """Architecture from an official state dict's shapes (heads from --num-heads or width / 72)."""
    if any(k.startswith(MS_KEYS) for k in state):
        raise UserError(MS_REFUSAL)
    try:
        proj = state["x_embedder.proj.weight"]
        H, C, p = proj.shape[0], proj.shape[1], proj.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
        out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint does not look like a PixArt (missing {e})") from None
    if "pos_embed" in state:
        num_patches = state["pos_embed"].shape[1]
        grid = int(round(num_patches**0.5))
        pe = scale_from_pos_embed(state["pos_embed"].numpy(), H, grid)
    else:
        raise UserError("the checkpoint has no pos_embed, so its position-embedding scale is unknown")
    return _config(name, depth, H, p, num_heads, grid * p, C, out_ch, mlp_hidden, caption_channels, pe)


def _config(name, depth, H, p, num_heads, input_size, C, out_ch, mlp_hidden, caption_channels, pe) -> ModelConfig:
    heads = num_heads or (H // 72 if H % 72 == 0 else None)
    if heads is None:
        raise UserError(f"width {H} is not a standard PixArt width (72 per head); pass --num-heads")
    if heads < 1 or H % heads:
        raise UserError(f"--num-heads {heads} does not divide the width {H}")
    return ModelConfig(name, depth=depth, hidden_size=H, patch_size=p, num_heads=heads, input_size=input_size,
                       in_channels=C, num_classes=0, learn_sigma=out_ch == 2 * C, mlp_ratio=mlp_hidden / H,
                       arch="pixart", caption_channels=caption_channels, caption_len=TOKEN_NUM,
                       pe_interpolation=float(pe))


def diffusers_folder(path: Path) -> Path | None:
    """The transformer folder of a diffusers checkpoint (itself, or a pipeline's transformer/)."""
    for d in (path, path / "transformer"):
        if (d / "config.json").is_file() and (d / "diffusion_pytorch_model.safetensors").is_file():
            return d
    return None


def diffusers_config(folder: Path, name: str, num_heads: int | None) -> ModelConfig:
    try:
        c = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if c.get("_class_name") not in ("PixArtTransformer2DModel", "Transformer2DModel"):
        raise UserError(f"{folder} holds a {c.get('_class_name')}, not a PixArtTransformer2DModel")
    sample = c.get("sample_size", 128)
    extra = c.get("use_additional_conditions")
    if extra or (extra is None and sample == 128):
        raise UserError(MS_REFUSAL)
    if c.get("norm_type", "ada_norm_single") != "ada_norm_single" or c.get("caption_channels") is None:
        raise UserError(f"{folder} is not a PixArt-alpha transformer (needs ada_norm_single and caption_channels)")
    heads, head_dim = c.get("num_attention_heads", 16), c.get("attention_head_dim", 72)
    if num_heads is not None and num_heads != heads:
        raise UserError(f"{folder} says {heads} heads; --num-heads {num_heads} disagrees")
    pe = c.get("interpolation_scale")
    pe = pe if pe is not None else max(sample // 64, 1)  # what diffusers does with this config
    H = heads * head_dim
    C = c.get("in_channels", 4)
    out = c.get("out_channels") or C
    return _config(name, c.get("num_layers", 28), H, c.get("patch_size", 2), heads, sample, C, out, 4 * H,
                   c["caption_channels"], pe)


def from_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers PixArtTransformer2DModel keys -> official keys (the converter, inverted)."""
    s = dict(state)
    out = {
        "x_embedder.proj.weight": s.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": s.pop("pos_embed.proj.bias"),
        "y_embedder.y_proj.fc1.weight": s.pop("caption_projection.linear_1.weight"),
        "y_embedder.y_proj.fc1.bias": s.pop("caption_projection.linear_1.bias"),
        "y_embedder.y_proj.fc2.weight": s.pop("caption_projection.linear_2.weight"),
        "y_embedder.y_proj.fc2.bias": s.pop("caption_projection.linear_2.bias"),
        "t_block.1.weight": s.pop("adaln_single.linear.weight"),
        "t_block.1.bias": s.pop("adaln_single.linear.bias"),
        "final_layer.linear.weight": s.pop("proj_out.weight"),
        "final_layer.linear.bias": s.pop("proj_out.bias"),
        "final_layer.scale_shift_table": s.pop("scale_shift_table"),
    }
    if "caption_projection.y_embedding" in s:
        out["y_embedder.y_embedding"] = s.pop("caption_projection.y_embedding")
    for i in (1, 2):
        for kind in ("weight", "bias"):
            out[f"t_embedder.mlp.{2 * (i - 1)}.{kind}"] = s.pop(f"adaln_single.emb.timestep_embedder.linear_{i}.{kind}")
    for d in range(depth):
        b, o = f"transformer_blocks.{d}.", f"blocks.{d}."
        out[o + "scale_shift_table"] = s.pop(b + "scale_shift_table")
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat([s.pop(b + f"attn1.to_{x}.{kind}") for x in "qkv"])
            out[o + f"attn.proj.{kind}"] = s.pop(b + f"attn1.to_out.0.{kind}")
            out[o + f"mlp.fc1.{kind}"] = s.pop(b + f"ff.net.0.proj.{kind}")
            out[o + f"mlp.fc2.{kind}"] = s.pop(b + f"ff.net.2.{kind}")
            out[o + f"cross_attn.q_linear.{kind}"] = s.pop(b + f"attn2.to_q.{kind}")
            out[o + f"cross_attn.kv_linear.{kind}"] = torch.cat([s.pop(b + f"attn2.to_{x}.{kind}") for x in "kv"])
            out[o + f"cross_attn.proj.{kind}"] = s.pop(b + f"attn2.to_out.0.{kind}")
    if s:
        raise UserError(f"unexpected diffusers keys: {', '.join(sorted(s)[:4])}")
    return out
