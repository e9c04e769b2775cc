"""Token selectors of the baselines, transcribed from the official ToCa/DuCa DiT code. They run
on the namespace of the loop's arrays (`soda.arrays`); DuCa's random base score is drawn by
numpy from a per-(seed, step, layer, module) seed, identical on every backend, and uploaded.

score = base + staleness_weight * staleness / interval, then the 2x2 spatial bonus, then top-k.
- base, "toca-attention": the attention each token received in the same layer's attention at
  its last full computation (`attn_map.sum(dim=1)` of the head-averaged map), L2-normalised per
  row (`F.normalize(p=2, dim=1)`); refreshed only when that attention is fully computed.
- base, "duca-random": uniform [0, 1) per (seed, step, layer, module), shared by every batch row
  (the official code shares it between the CFG halves).
- staleness (ToCa's `cache_index`): for the module being pruned, how many earlier non-skip
  steps have passed since the token was last computed (0 right after a full compute; skip steps,
  DuCa's aggressive ones, do not count, as they never reach `cache_cutfresh`).
- spatial bonus (`local_selection_with_bonus`): in every 2x2 grid of tokens the top-scoring one
  gets + bonus_ratio * its score (ToCa 0.6, DuCa 0.8).
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from soda.arrays import device, namespace, rows
from soda.selectors import sorted_head, top_k_order


def l2_normalize(x, eps: float = 1e-12):
    """torch.nn.functional.normalize(x, p=2, dim=1)."""
    xp = namespace(x)
    return x / xp.clip(xp.sqrt(xp.sum(x * x, axis=1, keepdims=True)), min=eps)


def spatial_bonus(score, ratio: float, grid: int = 2):
    """In each grid x grid block of the token raster, add ratio * max to the (first) max token."""
    xp = namespace(score)
    B, N = score.shape
    side = math.isqrt(N)
    if side * side != N or side % grid:
        raise ValueError(f"the spatial bonus needs a square token grid divisible by {grid}, got {N} tokens")
    g = side // grid
    blocks = xp.reshape(xp.permute_dims(xp.reshape(score, (B, g, grid, g, grid)), (0, 1, 3, 2, 4)),
                        (B, g * g, grid * grid))
    first_max = xp.arange(grid * grid, device=device(score)) == xp.argmax(blocks, axis=2)[..., None]
    bonus = xp.where(first_max, blocks * ratio, xp.zeros_like(blocks))
    out = xp.permute_dims(xp.reshape(blocks + bonus, (B, g, g, grid, grid)), (0, 1, 3, 2, 4))
    return xp.reshape(out, (B, N))


class _CacheFrequencySelector:
    """Staleness bookkeeping and the score pipeline; subclasses give the base score."""

    name = "base"
    reads_scores = True  # the base scores of ToCa and the value norms read them; DuCa's random one does not

    def __init__(self, interval: int, staleness_weight: float = 0.25, bonus_ratio: float = 0.6,
                 grid: int = 2, skip_steps=()):
        self.interval = interval
        self.staleness_weight = staleness_weight
        self.bonus_ratio = bonus_ratio
        self.grid = grid
        self.skip_steps = np.array(sorted(skip_steps), dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self.last: dict = {}  # (layer, module) -> step each token was last computed [B, N]
        self._skips = None  # skip_steps on the loop's device, uploaded once

    def observe(self, s, layer, module, idx, D, received) -> None:
        key = (layer, module)
        xp = namespace(D)
        if idx is None:
            self.last[key] = xp.full(D.shape[:2], s, dtype=xp.int64, device=device(D))
        else:
            self.last[key][rows(xp, idx.shape[0], idx), idx] = s

    def staleness(self, s: int, layer: int, module: str):
        return self.stalenesses(s, [(layer, module)])[0]

    def stalenesses(self, s: int, keys):
        """[R, B, N]: the staleness of each (layer, module) in `keys`, stacked."""
        for layer, module in keys:
            if (layer, module) not in self.last:
                raise ValueError(f"layer {layer} {module}: pruned before any full compute")
        first = self.last[keys[0]]
        xp = namespace(first)
        last = xp.stack([self.last[key] for key in keys]) if len(keys) > 1 else first[None]
        if not self.skip_steps.size:
            return s - last - 1
        if self._skips is None:
            self._skips = xp.asarray(self.skip_steps, device=device(last))
        before_s = int(np.searchsorted(self.skip_steps, s, "left"))
        skipped = before_s - xp.searchsorted(self._skips, xp.reshape(last, (-1,)), side="right")
        return s - last - 1 - xp.reshape(skipped, last.shape)

    def base_score(self, s: int, layer: int, module: str, B: int, N: int):
        raise NotImplementedError

    def score(self, s: int, layer: int, module: str, B: int, N: int):
        return self.scores(s, [(layer, module)], B, N)[0]

    def scores(self, s: int, keys, B: int, N: int):
        """[R, B, N]: the scores of each (layer, module) in `keys`, computed together (the same
        element-wise arithmetic as one at a time, so the same values)."""
        stale = self.stalenesses(s, keys)
        xp = namespace(stale)  # float64 on every library (torch would make int * float float32)
        bases = [self.base_score(s, layer, module, B, N) for layer, module in keys]
        base = xp.stack(bases) if len(bases) > 1 else bases[0][None]
        score = base + self.staleness_weight * xp.astype(stale, xp.float64) / self.interval
        if not self.bonus_ratio:  # off (Open-Sora's ToCa/DuCa): any token layout, square or not
            return score
        return xp.reshape(spatial_bonus(xp.reshape(score, (-1, N)), self.bonus_ratio, self.grid), score.shape)

    # Same-layer modules whose computation the base score reads (soda.selectors.TokenSelector.reads);
    # a subclass that does not say is taken to read everything of the layer, tokens included.
    same_layer: tuple[str, ...] = ("tokens", "*")

    def reads(self, module: str) -> tuple[str, ...]:
        return self.same_layer  # staleness is the module's own history

    def select(self, s, layer, module, k, tokens, cache):
        B, N = tokens.shape[:2]
        return self.select_many(s, [(layer, module, k)], B, N)[0]

    def select_many(self, s: int, requests, B: int, N: int) -> list:
        """`select` for every (layer, module, k) of `requests` at once (one score pipeline and
        one sort over the stacked rows): what `select` returns for each, in order. Valid before
        the step's layers run, since the choice reads only the module's own history and its
        layer's state from earlier steps (`reads`)."""
        if not requests:
            return []
        score = self.scores(s, [(layer, module) for layer, module, _ in requests], B, N)
        order = top_k_order(namespace(score).reshape(score, (-1, N)))
        return [sorted_head(order[r * B:(r + 1) * B], k) for r, (_, _, k) in enumerate(requests)]


class ToCaAttentionSelector(_CacheFrequencySelector):
    """ToCa's s1 + s3 + s4: needs the attention map (non-fused attention)."""

    name = "toca-attention"
    same_layer = ("attn",)  # the layer's attention map, refreshed by a full attention

    def reset(self) -> None:
        super().reset()
        self.received: dict = {}  # layer -> attention received [B, N], float64
        self._base: dict = {}  # layer -> its L2-normalised received, made on first use

    def observe(self, s, layer, module, idx, D, received) -> None:
        super().observe(s, layer, module, idx, D, received)
        if module == "attn" and idx is None and received is not None:
            xp = namespace(received)
            self.received[layer] = xp.astype(received, xp.float64)
            self._base.pop(layer, None)

    def base_score(self, s, layer, module, B, N):
        if layer not in self.received:
            raise ValueError(f"layer {layer}: no attention map yet (toca-attention needs a full attn compute first)")
        if layer not in self._base:  # every pruned step until the next full attention reads it
            self._base[layer] = l2_normalize(self.received[layer])
        return self._base[layer]


class DuCaRandomSelector(_CacheFrequencySelector):
    """DuCa's random choice (+ staleness and bonus): no attention map needed."""

    name = "duca-random"
    same_layer = ()
    reads_scores = False

    def __init__(self, interval: int, staleness_weight: float = 0.25, bonus_ratio: float = 0.8,
                 grid: int = 2, skip_steps=(), seed: int = 0):
        super().__init__(interval, staleness_weight, bonus_ratio, grid, skip_steps)
        self.seed = seed

    def base_score(self, s, layer, module, B, N):
        rng = np.random.default_rng([self.seed, s, layer, zlib.crc32(module.encode())])
        last = self.last[(layer, module)]  # observed before any prune: where the loop's arrays live
        xp = namespace(last)
        return xp.broadcast_to(xp.asarray(rng.random(N), device=device(last)), (B, N))


class ToCaCrossEntropySelector(_CacheFrequencySelector):
    """PixArt-ToCa / DuCa-PixArt's `attn_score`: the entropy of the cross-attention map averaged
    over the CFG halves (0.5 cond + 0.5 uncond), as 1 + entropy L2-normalised per row, the same
    score for both halves. The cross-attention module returns, per token, its half of that
    entropy (-sum 0.5 p log(0.5 p + 1e-7)); the map is refreshed for recomputed tokens too, as
    the official `update_cache` scatters the fresh rows. Needs the [cond; uncond] batch."""

    name = "toca-cross-entropy"
    same_layer = ("cross_attn",)
    module = "cross_attn"

    def reset(self) -> None:
        super().reset()
        self.entropy: dict = {}  # layer -> per-token cross-attention entropy [B, N], float64

    def observe(self, s, layer, module, idx, D, received) -> None:
        super().observe(s, layer, module, idx, D, received)
        if module != self.module or received is None:
            return
        xp = namespace(received)
        if idx is None:
            self.entropy[layer] = xp.astype(received, xp.float64)  # a copy
        else:
            self.entropy[layer][rows(xp, idx.shape[0], idx), idx] = xp.astype(received, xp.float64)

    def base_score(self, s, layer, module, B, N):
        if layer not in self.entropy:
            raise ValueError(f"layer {layer}: no cross-attention map yet (needs a full cross-attention first)")
        e = self.entropy[layer]
        if B % 2:
            raise ValueError("toca-cross-entropy needs the CFG-doubled batch [cond; uncond]")
        half = B // 2
        score = l2_normalize(1 + e[:half] + e[half:])
        return namespace(score).concat([score, score])


class DuCaValueNormSelector(_CacheFrequencySelector):
    """DuCa-Open-Sora's `kv_norm_score`: per token, the sum over heads of 1 - |v_head| of the
    self-attention values at the layer's last full attention (the module returns that sum),
    L2-normalised per row (`F.normalize(p=2)`); each row its own (no CFG pairing)."""

    name = "duca-value-norm"
    same_layer = ("attn",)

    def reset(self) -> None:
        super().reset()
        self.value_norm: dict = {}  # layer -> per-token value-norm sum [B, N], float64

    def observe(self, s, layer, module, idx, D, received) -> None:
        super().observe(s, layer, module, idx, D, received)
        if module == "attn" and idx is None and received is not None:
            xp = namespace(received)
            self.value_norm[layer] = xp.astype(received, xp.float64)

    def base_score(self, s, layer, module, B, N) -> np.ndarray:
        if layer not in self.value_norm:
            raise ValueError(f"layer {layer}: no value norms yet (duca-value-norm needs a full attn compute first)")
        return l2_normalize(self.value_norm[layer])


BASELINE_SELECTORS = {s.name: s for s in (ToCaAttentionSelector, DuCaRandomSelector, ToCaCrossEntropySelector,
                                          DuCaValueNormSelector)}
