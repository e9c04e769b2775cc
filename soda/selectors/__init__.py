"""Token selectors: which tokens a `prune@a` action recomputes. Pluggable by name.

A selector sees every module computation (`observe`) and answers `select` with per-batch-row
token indices [B, k], sorted ascending. They compute on the namespace of the arrays they are
given (`soda.arrays`: numpy, CuPy or torch), so the indices stay on the loop's device; the
runtime uses the same selectors.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from soda.arrays import namespace
from soda.errors import UserError


class TokenSelector(Protocol):
    name: str
    reads_scores: bool  # `observe` reads the modules' scores (`received`); absent: taken as True

    def reset(self) -> None: ...

    def observe(self, s: int, layer: int, module: str, idx: np.ndarray | None, D: np.ndarray,
                received: np.ndarray | None) -> None:
        """After a computation: idx None means all tokens; D is the pre-gate output computed."""

    def select(self, s: int, layer: int, module: str, k: int, tokens: np.ndarray,
               cache: np.ndarray) -> np.ndarray:
        """Indices [B, k] (int64, ascending per row) of the tokens to recompute."""

    def reads(self, module: str) -> tuple[str, ...]:
        """What `select` for `module` reads besides its own module's cache and history: the
        same-layer modules whose computation in this step can change the choice ("*": any), and
        "tokens" when it reads the values of the tokens passed in. A block graph (`soda.blocks`) covers
        a pruned module only when its choice can be made before the layer runs."""

    # Optional: select_many(s, [(layer, module, k)], B, N) -> [indices], what `select` returns for
    # each, for choices made at the start of a step (the executor asks it only for modules whose
    # `reads` allow that); a selector whose choices batch cheaply provides it.


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Per-row indices of the k largest scores (ties to the lower index), sorted ascending."""
    return sorted_head(top_k_order(score), k)


def top_k_order(score: np.ndarray) -> np.ndarray:
    """Per row, the token indices by decreasing score (ties to the lower index)."""
    return namespace(score).argsort(-score, axis=1, stable=True)


def sorted_head(order: np.ndarray, k: int) -> np.ndarray:
    """The first k of each row of `top_k_order`, ascending, int64."""
    xp = namespace(order)
    return xp.astype(xp.sort(order[:, :k], axis=1), xp.int64)


class NoSelector:
    """For schedules without prune actions."""

    name = "none"
    reads_scores = False

    def reset(self) -> None:
        pass

    def observe(self, *args) -> None:
        pass

    def select(self, s, layer, module, k, tokens, cache):
        raise ValueError("this schedule has prune actions but no token selector")

    def reads(self, module: str) -> tuple[str, ...]:
        return ()


def make_selector(name: str, params: dict | None = None) -> TokenSelector:
    from soda.selectors.feature_mean import FeatureMeanSelector

    registry = {"none": NoSelector, "feature-mean": FeatureMeanSelector}
    try:
        from soda.selectors.baselines import BASELINE_SELECTORS

        registry.update(BASELINE_SELECTORS)
    except ImportError:
        pass
    if name not in registry:
        raise UserError(f"unknown token selector {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name](**(params or {}).get("selector_params", {}))
