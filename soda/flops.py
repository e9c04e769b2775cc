"""Analytic FLOPs per action: 2 * multiply-adds of every matmul and convolution.

Element-wise work (norms, activations, softmax, residual adds, gathers) is left out: it is
under 2% of a DiT block at every size we ship, and leaving it out keeps the count exact and
backend-independent. Attention on n tokens costs its projections (linear in n) plus QK^T and
AV (quadratic in n), so pruned attention saves more than its token fraction. Cross-attention
to a caption of L tokens costs its query and output projections plus n * L for QK^T and AV;
its keys and values are computed once per generation (the `condition` term).

Modules are costed by the kind their adapter declares (`soda.models.interface`); the parts
outside the modules come from the architecture's per-row table. Nothing here names a model.
"""
from __future__ import annotations

from dataclasses import dataclass

from soda.models.config import ModelConfig
from soda.models.interface import CROSS_ATTN, MLP, SELF_ATTN


@dataclass(frozen=True)
class FlopsModel:
    hidden: int
    mlp_hidden: int
    num_tokens: int
    kinds: tuple[tuple[str, str], ...]  # (module name, kind) in block order
    embed_row: float  # per step and batch row
    modulation_row: float  # per layer, step and batch row
    final_row: float  # per step and batch row
    condition_row: float = 0.0  # per generation and batch row
    context_len: int = 0  # caption tokens cross-attention attends to
    mix_lengths: tuple[int, ...] = ()  # per layer, tokens a full self-attention query sees (empty: all)

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "FlopsModel":
        from soda.models.interface import per_row_flops

        rows = per_row_flops(cfg)
        kinds = tuple((m.name, m.kind) for m in cfg.interface.modules)
        mix = cfg.interface.mix_lengths(cfg) if cfg.interface.mix_lengths else ()
        return cls(cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), cfg.num_tokens, kinds, rows["embed"],
                   rows["modulation"], rows["final"], rows["condition"], cfg.caption_len or 0, tuple(mix))

    def condition(self, B: int) -> float:
        return float(B * self.condition_row)

    def embed(self, B: int) -> float:
        return float(B * self.embed_row)

    def modulation(self, B: int) -> float:
        return float(B * self.modulation_row)

    def module(self, name: str, B: int, n: int, layer: int | None = None) -> float:
        """FLOPs of module `name` on n tokens. Self-attention: each query attends to min(n, the
        layer's mix length) tokens (a video model's spatial or temporal sequence); `layer` None
        gives the mean over layers, so L times it is the sum over the layers."""
        H = self.hidden
        kind = dict(self.kinds)[name]
        if kind == SELF_ATTN:
            if self.mix_lengths and layer is None:
                return sum(self.module(name, B, n, l) for l in range(len(self.mix_lengths))) / len(self.mix_lengths)
            seen = min(n, self.mix_lengths[layer]) if self.mix_lengths else n
            return float(2 * B * n * H * 3 * H + 2 * 2 * B * n * seen * H + 2 * B * n * H * H)
        if kind == CROSS_ATTN:
            return float(2 * 2 * B * n * H * H + 2 * 2 * B * n * self.context_len * H)
        if kind == MLP:
            return float(2 * 2 * B * n * H * self.mlp_hidden)
        raise KeyError(kind)

    def final(self, B: int) -> float:
        return float(B * self.final_row)


def schedule_flops(schedule, fm: FlopsModel, batch: int) -> float:
    """FLOPs a schedule executes for a model batch of `batch` rows (CFG rows included).

    Mirrors the executor's accounting exactly; tests hold the two equal.
    """
    from soda.schedule import kept_tokens, parse_action

    total = fm.condition(batch)
    for s in range(schedule.num_steps):
        total += fm.embed(batch) + fm.final(batch)
        if schedule.is_skip(s):
            continue
        total += schedule.num_layers * fm.modulation(batch)
        for l, row in enumerate(schedule.steps[s]):
            for name, action in zip(schedule.modules, row):
                kind, rate = parse_action(action)
                if kind == "full":
                    total += fm.module(name, batch, fm.num_tokens, l)
                elif kind == "prune":
                    total += fm.module(name, batch, kept_tokens(rate, fm.num_tokens), l)
    return total
