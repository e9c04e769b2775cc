"""SODA's selector: top-k tokens by feature mean, no attention map needed.

The feature averaged is the module's cached pre-gate output D: score = mean over channels of
|D_cached|. Tokens whose cached contribution to the residual stream is largest are the ones
whose staleness costs most, so they are recomputed first. It works with fused attention.
"""
from __future__ import annotations

from soda.arrays import namespace
from soda.selectors import top_k


class FeatureMeanSelector:
    name = "feature-mean"
    reads_scores = False  # the module's own cache only

    def reset(self) -> None:
        pass

    def observe(self, *args) -> None:
        pass

    def reads(self, module: str) -> tuple[str, ...]:
        return ()  # the module's own cache only

    def select(self, s, layer, module, k, tokens, cache):
        xp = namespace(cache)
        return top_k(xp.mean(xp.abs(cache), axis=2), k)
