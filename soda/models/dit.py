"""DiT (facebookresearch/DiT), with parameter names identical to the official checkpoints.

The math is the official `models.py` (timm's Attention/Mlp/PatchEmbed inlined so the keys
match without timm). The block is split into what acceleration needs to address separately:
`modulation(c)` (adaLN shift/scale/gate, always recomputed) and one pre-gate function per
module, `run_module(name, x, mod, keep_idx)`. `forward` composes them exactly as the
official block does, so a full-compute schedule is the official model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.models.config import ModelConfig

MODULES = ("attn", "mlp")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm PatchEmbed: conv with kernel = stride = patch, flattened to [B, N, D]."""

    def __init__(self, input_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null label used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            if force_drop_ids is None:
                drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop_ids = force_drop_ids == 1
            labels = torch.where(drop_ids, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm Attention with an explicit softmax, so the attention map is there for ToCa's score."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_received: bool = False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if not return_received:
            return out
        # Attention each token receives: column sum of the head-averaged map, [B, N].
        return out, attn.mean(dim=1).sum(dim=1)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class Modulation:
    """adaLN terms of one module for the current conditioning, each [B, D]."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class DiTBlock(nn.Module):
    modules_order = MODULES

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor) -> dict[str, Modulation]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        return {"attn": Modulation(shift_msa, scale_msa, gate_msa), "mlp": Modulation(shift_mlp, scale_mlp, gate_mlp)}

    def run_module(self, name: str, x: torch.Tensor, mod: Modulation, return_received: bool = False):
        """Pre-gate output D of module `name` on tokens `x` (all tokens, or a gathered subset)."""
        if name == "attn":
            return self.attn(modulate(self.norm1(x), mod.shift, mod.scale), return_received=return_received)
        if name == "mlp":
            return self.mlp(modulate(self.norm2(x), mod.shift, mod.scale))
        raise KeyError(name)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.modulation(c)
        for name in self.modules_order:
            x = x + mods[name].gate.unsqueeze(1) * self.run_module(name, x, mods[name])
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; the adapter interface the toolchain uses is
    `embed`, `blocks[l].modulation`, `blocks[l].run_module`, `final`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        H = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, H)
        self.t_embedder = TimestepEmbedder(H)
        self.y_embedder = LabelEmbedder(config.num_classes, H, config.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, H), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(H, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(H, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation (adaLN-Zero: modulation and output layers start at zero)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches**0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def randomize_zero_init(self, seed: int = 0) -> None:
        """Give the adaLN-Zero layers small random values so a random-init model is not constant.

        With the official init every block is the identity and the output is zero, which would
        make caching errors 0/0; `--random-init` uses this so the toolchain has work to do.
        """
        g = torch.Generator().manual_seed(seed)
        for p in [*(b.adaLN_modulation[-1].weight for b in self.blocks), self.final_layer.adaLN_modulation[-1].weight,
                  self.final_layer.linear.weight]:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)

    # --- the adapter interface -------------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, C, H, W], timesteps [B], labels [B] -> tokens [B, N, D], conditioning [B, D]."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def final(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] -> model output [B, out_channels, H, W]."""
        return self.unpatchify(self.final_layer(tokens, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.out_channels
        p = self.x_embedder.proj.kernel_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    # --- the generic adapter protocol (soda.models.interface), over the methods above ----------
    def prepare(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per generation: the labels are all the context (embedded with t at every step)."""
        return {"y": cond["y"]}

    def step_embed(self, x: torch.Tensor, t: torch.Tensor, context: dict) -> tuple[torch.Tensor, tuple]:
        tokens, c = self.embed(x, t, context["y"])
        return tokens, (c,)

    def layer_modulation(self, layer: int, step: tuple, gates_only: frozenset[str] = frozenset()
                         ) -> dict[str, tuple[tuple | None, torch.Tensor]]:
        """{module: ((shift, scale), gate)}; (None, gate) for the modules in `gates_only`, whose
        cached outputs are only added. adaLN's linear runs chunk by chunk (a D x D slice of its
        weight per term): a layer that reuses both modules reads a third of the weights (the
        memory-bound part of a reuse step), and every graph slices the same tensors, which the
        export stores once. The same sums as `DiTBlock.modulation` (1e-6 here, not bit for bit)."""
        linear = self.blocks[layer].adaLN_modulation[1]
        s, D = F.silu(step[0]), self.config.hidden_size

        def chunk(i: int) -> torch.Tensor:  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
            return F.linear(s, linear.weight[i * D:(i + 1) * D], linear.bias[i * D:(i + 1) * D])

        return {name: (None if name in gates_only else (chunk(3 * m), chunk(3 * m + 1)), chunk(3 * m + 2))
                for m, name in enumerate(DiTBlock.modules_order)}

    def module_forward(self, layer: int, name: str, tokens: torch.Tensor, args: tuple, context: dict | None = None):
        """(pre-gate D, attention received or None) of module `name` at `layer`; `context` holds
        the per-generation inputs the module declares, by their bare names (none for DiT)."""
        mod = Modulation(args[0], args[1], None)
        if name == "attn":
            return self.blocks[layer].run_module(name, tokens, mod, return_received=True)
        return self.blocks[layer].run_module(name, tokens, mod), None

    def step_final(self, tokens: torch.Tensor, step: tuple) -> torch.Tensor:
        return self.final(tokens, step[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.final(tokens, c)


# --- fixed 2D sin-cos position embedding (official, from MAE) ----------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
