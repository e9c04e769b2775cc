"""The one stitching loop: run a Schedule step by step over a backend that computes modules.

The PyTorch reference (`soda.torch_backend`) and the deploy runtime (`runtime/`) differ only
in the backend: how `prepare`, `embed`, `modulation`, `module` and `final` are computed.
Everything else -- the per-token caches, Taylor forecasts of cached outputs, the residual
`x + gate * D` (or `x + D` for an ungated module), token selection, skip steps and FLOPs
accounting -- lives here once and reads only the modules' declarations
(`soda.models.interface.ModuleSpec`). It computes on the namespace of the arrays the backend
returns (`soda.arrays`: numpy on the CPU, CuPy or torch on a GPU), so tokens, caches and
conditioning stay where the backend keeps them; only the model output goes to the (numpy)
sampler, once per step.
"""
from __future__ import annotations

import copy
from typing import Callable, Protocol

import numpy as np

from soda.arrays import all_finite, copy as copy_array, namespace, rows as row_index, to_numpy
from soda.errors import NonFiniteError
from soda.flops import FlopsModel
from soda.forecast import TaylorState
from soda.models.interface import ModuleSpec
from soda.schedule import FORECAST, FULL, REUSE, Schedule, forecast_order, kept_tokens, parse_action
from soda.selectors import TokenSelector, make_selector


class Backend(Protocol):
    """How modules are computed (torch adapter, ORT sessions, TensorRT engines).

    Inputs from the sampler (`x`, `t`, `cond`) are numpy; everything a backend returns may be
    numpy, CuPy or torch arrays (one kind per backend), which the loop computes on as they are.

    The three conditioning lifetimes (see `soda.models.interface`): `prepare` once per
    generation, `embed` once per step, `modulation` once per layer and step. Their results
    are opaque to the loop (dicts / tuples of batch-leading arrays) and handed back as they are.
    """

    specs: tuple[ModuleSpec, ...]  # the block's modules in order
    modules: tuple[str, ...]  # their names
    num_layers: int

    def prepare(self, cond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per generation: conditioning (labels, caption + mask) -> context for embed/modules."""

    def embed(self, x: np.ndarray, t: np.ndarray, context: dict) -> tuple[np.ndarray, tuple]:
        """Per step: latents, timesteps -> tokens [B, N, D] and the step's conditioning."""

    def modulation(self, layer: int, step: tuple) -> dict[str, tuple[tuple, np.ndarray | None]]:
        """Per layer: {module: (args for `module`, gate [B, D] or None when ungated)}."""

    def module(self, layer: int, name: str, tokens: np.ndarray, *args: np.ndarray,
               context: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Pre-gate output D for `tokens` [B, n, D], and attention received [B, n] (self-attn)."""

    def final(self, tokens: np.ndarray, step: tuple) -> np.ndarray:
        """Tokens -> model output [B, C_out, H, W]."""


Recorder = Callable[[int, int, str, np.ndarray], None]  # (step, layer, module, D of all tokens)


class Executor:
    """Callable as the `model_fn` of `soda.sampling.sample_loop`: (s, x, t, cond) -> model output.

    Step 0 starts a generation: the caches are refilled by its full compute and the
    per-generation context is prepared from `cond` then, once.
    """

    def __init__(self, backend: Backend, schedule: Schedule, flops: FlopsModel,
                 selector: TokenSelector | None = None, recorder: Recorder | None = None):
        if tuple(schedule.modules) != tuple(backend.modules) or schedule.num_layers != backend.num_layers:
            raise ValueError("schedule and backend disagree on layers or modules")
        self.backend = backend
        self.schedule = schedule
        self.flops = flops
        self.gated = tuple(spec.gated for spec in backend.specs)
        self.prunable = tuple(spec.prunable for spec in backend.specs)
        self.selector = selector or make_selector(schedule.selector, schedule.params)
        self.recorder = recorder
        self.orders = schedule.forecast_orders()  # [L][M]: Taylor factors kept per (layer, module)
        self.reset()

    def reset(self) -> None:
        """Forget caches and counters; call between independent generations."""
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        self.taylor = {(l, m): TaylorState(o) for l, row in enumerate(self.orders) for m, o in enumerate(row) if o}
        self.last_tokens: np.ndarray | None = None
        self.context: dict | None = None
        self.flops_done = 0.0
        self.selector.reset()

    def __call__(self, s: int, x: np.ndarray, t: np.ndarray, cond) -> np.ndarray:
        cache, last = dict(self.cache), self.last_tokens  # shallow: entries are replaced, never edited
        taylor = {key: copy.copy(state) for key, state in self.taylor.items()}  # factors are replaced too
        out = self._step(s, x, t, cond)
        if not all_finite(self.xp, out):  # one cheap device-side check per step; locating the cause only on failure
            self.cache, self.last_tokens, self.taylor = cache, last, taylor
            raise NonFiniteError(f"NaN or inf in the model output at step {s} of {self.schedule.num_steps}, "
                                 f"first in {self._locate(s, x, t, cond)}; check the checkpoint and the noise")
        return to_numpy(out)

    def _step(self, s: int, x: np.ndarray, t: np.ndarray, cond, check: Callable | None = None) -> np.ndarray:
        b = self.backend
        B = x.shape[0]
        if s == 0 or self.context is None:
            self.context = b.prepare(cond if isinstance(cond, dict) else {"y": cond})
            self.flops_done += self.flops.condition(B)
            if check:
                check("prepare", *self.context.values())
        tokens, step = b.embed(x, t, self.context)
        self.xp = namespace(tokens)
        if check:
            check("embed", tokens, *step)
        self.flops_done += self.flops.embed(B)
        if self.schedule.is_skip(s):
            if self.last_tokens is None:
                raise ValueError(f"step {s} is a skip step but no earlier step ran the blocks")
            tokens = self.last_tokens
        else:
            for l in range(b.num_layers):
                mods = b.modulation(l, step)
                if check:
                    check(f"layer {l} modulation",
                          *(v for m in b.modules for v in (*mods[m][0], mods[m][1]) if v is not None))
                self.flops_done += self.flops.modulation(B)
                for m, name in enumerate(b.modules):
                    args, gate = mods[name]
                    D = self._module_output(s, l, m, name, tokens, args)
                    tokens = tokens + gate[:, None, :] * D if self.gated[m] else tokens + D
                    if check:
                        check(f"layer {l} {name}", D)
                        check(f"layer {l} {name} (residual sum)", tokens)
            self.last_tokens = tokens
        self.flops_done += self.flops.final(B)
        return b.final(tokens, step)

    def _locate(self, s: int, x: np.ndarray, t: np.ndarray, cond) -> str:
        """Where a step's non-finite output first appears: rerun the step from the same caches,
        checking every intermediate (only after a failure, so sampling pays one check per step)."""
        if not np.isfinite(x).all():
            return "the input latents"

        class Found(Exception):
            pass

        def check(where, *arrays):
            if not all(all_finite(namespace(a), a) for a in arrays):
                raise Found(where)

        try:
            self._step(s, x, t, cond, check)
        except Found as f:
            return str(f)
        return "the final layer"

    def extra_cache_bytes(self) -> dict[tuple[int, int], int]:
        """Per (layer, module): memory the forecast factors hold now beyond the plain cache."""
        return {key: state.extra_bytes() for key, state in self.taylor.items()}

    def _module_output(self, s, l, m, name, tokens, args) -> np.ndarray:
        action = self.schedule.action(s, l, m)
        kind, rate = parse_action(action)
        B, N, _ = tokens.shape
        if kind == REUSE:
            return self.cache[(l, m)]
        if kind == FORECAST:
            return self.taylor[(l, m)].predict(s, forecast_order(action))
        if kind == FULL:
            D, received = self.backend.module(l, name, tokens, *args, context=self.context)
            self.flops_done += self.flops.module(name, B, N, l)
            self.cache[(l, m)] = D
            if (l, m) in self.taylor:
                self.taylor[(l, m)].update(s, D)
            self.selector.observe(s, l, name, None, D, received)
            if self.recorder is not None:
                self.recorder(s, l, name, D)
            return D
        if not self.prunable[m]:
            raise ValueError(f"layer {l} {name}: this module cannot be pruned (full or reuse only)")
        # prune@a (+forecast@O): recompute k tokens chosen on the cache; the others come from the
        # cache, or from the forecast when the action has one. Recomputed tokens enter the cache.
        k = kept_tokens(rate, N)
        cache = self.cache[(l, m)]
        idx = self.selector.select(s, l, name, k, tokens, cache)  # [B, k]
        rows = row_index(self.xp, B, tokens)  # fancy indexing: 6-18x faster than take/put_along_axis here (docs/runtime.md)
        part = tokens[rows, idx]
        D_part, received = self.backend.module(l, name, part, *args, context=self.context)
        self.flops_done += self.flops.module(name, B, k, l)
        cache = copy_array(self.xp, cache)
        cache[rows, idx] = D_part
        self.cache[(l, m)] = cache
        self.selector.observe(s, l, name, idx, D_part, received)
        order = forecast_order(action)
        if not order:
            return cache
        out = self.taylor[(l, m)].predict(s, order)
        out[rows, idx] = D_part
        return out
