"""Analytic FLOPs per action: 2 * multiply-adds of every matmul and convolution.

Element-wise work (norms, activations, softmax, residual adds, gathers) is left out: it is
under 2% of a DiT block at every size we ship, and leaving it out keeps the count exact and
backend-independent. Attention on n tokens costs its projections (linear in n) plus QK^T and
AV (quadratic in n), so pruned attention saves more than its token fraction.
"""
from __future__ import annotations

from dataclasses import dataclass

from soda.models.config import ModelConfig


@dataclass(frozen=True)
class FlopsModel:
    hidden: int
    mlp_hidden: int
    num_tokens: int
    patch_in: int  # C * p * p
    patch_out: int  # C_out * p * p
    freq_dim: int = 256

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "FlopsModel":
        p2 = cfg.patch_size**2
        return cls(cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), cfg.num_tokens,
                   cfg.in_channels * p2, cfg.out_channels * p2)

    def embed(self, B: int) -> float:
        H = self.hidden
        patch = 2 * B * self.num_tokens * self.patch_in * H
        t_mlp = 2 * B * (self.freq_dim * H + H * H)
        return float(patch + t_mlp)

    def modulation(self, B: int) -> float:
        return float(2 * B * self.hidden * 6 * self.hidden)

    def module(self, name: str, B: int, n: int) -> float:
        H = self.hidden
        if name == "attn":
            return float(2 * B * n * H * 3 * H + 2 * 2 * B * n * n * H + 2 * B * n * H * H)
        if name == "mlp":
            return float(2 * 2 * B * n * H * self.mlp_hidden)
        raise KeyError(name)

    def final(self, B: int) -> float:
        H = self.hidden
        return float(2 * B * H * 2 * H + 2 * B * self.num_tokens * H * self.patch_out)


def schedule_flops(schedule, fm: FlopsModel, batch: int) -> float:
    """FLOPs a schedule executes for a model batch of `batch` rows (CFG rows included).

    Mirrors the executor's accounting exactly; tests hold the two equal.
    """
    from soda.schedule import kept_tokens, parse_action

    total = 0.0
    for s in range(schedule.num_steps):
        total += fm.embed(batch) + fm.final(batch)
        if schedule.is_skip(s):
            continue
        total += schedule.num_layers * fm.modulation(batch)
        for row in schedule.steps[s]:
            for name, action in zip(schedule.modules, row):
                kind, rate = parse_action(action)
                if kind == "full":
                    total += fm.module(name, batch, fm.num_tokens)
                elif kind == "prune":
                    total += fm.module(name, batch, kept_tokens(rate, fm.num_tokens))
    return total
