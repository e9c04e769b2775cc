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
from soda.blocks import COMPUTE, COMPUTED_ONLY, GIVEN, KEPT, PRUNED, Block, layer_code
from soda.schedule import FORECAST, FULL, PRUNE, REUSE, Schedule, forecast_order, kept_tokens, parse_action
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
        self.xp = None  # the array namespace of the backend's arrays, from its first step
        self.reset()

    def reset(self) -> None:
        """Forget caches and counters; call between independent generations."""
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        self.taylor = {(l, m): TaylorState(o) for l, row in enumerate(self.orders) for m, o in enumerate(row) if o}
        self.last_tokens: np.ndarray | None = None
        self.context: dict | None = None
        self.flops_done = 0.0
        self.selector.reset()
        self._pre: dict[tuple[int, int], np.ndarray] = {}  # this step's token choices made at its start

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
        whole = None if check else self._step_graph_for(s)
        if whole is not None:
            return self._run_step_graph(s, whole, x, t)
        tokens, step = b.embed(x, t, self.context)
        self.xp = self.xp or namespace(tokens)
        if check:
            check("embed", tokens, *step)
        self.flops_done += self.flops.embed(B)
        if self.schedule.is_skip(s):
            if self.last_tokens is None:
                raise ValueError(f"step {s} is a skip step but no earlier step ran the blocks")
            tokens = self.last_tokens
        else:
            self._pre = self._preselect(s, tokens)
            upto = 0  # layers before this one ran inside a block graph
            for l in range(b.num_layers):
                block = None if check or l < upto else self._block_for(s, l)
                if block is not None:
                    tokens, upto = self._run_block(s, block, tokens, step), block.last + 1
                if l < upto:
                    continue
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
        idx = self._select(s, l, m, k, tokens)  # [B, k]
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

    # --- token choices made at the start of a step --------------------------------------------
    def _preselect(self, s: int, tokens: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        """The token choices of step `s`'s pruned modules that cannot depend on anything this step
        computes (`TokenSelector.reads`: neither the token values nor a same-layer module computed
        before it), made now: in one call where the selector batches them (`select_many`), and
        so that a block graph over several layers can take them before it runs."""
        reads = getattr(self.selector, "reads", None)
        if reads is None:
            return {}
        B, N = tokens.shape[:2]
        wanted = []
        for l, row in enumerate(self.schedule.steps[s]):
            for m, action in enumerate(row):
                kind, rate = parse_action(action)
                if kind != PRUNE:
                    continue
                needs = reads(self.backend.modules[m])
                if "tokens" in needs or any((self.backend.modules[j] in needs or "*" in needs)
                                            and parse_action(row[j])[0] not in (REUSE, FORECAST) for j in range(m)):
                    continue
                wanted.append((l, m, kept_tokens(rate, N)))
        if not wanted:
            return {}
        many = getattr(self.selector, "select_many", None)
        if many is not None:
            chosen = many(s, [(l, self.backend.modules[m], k) for l, m, k in wanted], B, N)
        else:
            chosen = [self.selector.select(s, l, self.backend.modules[m], k, tokens, self.cache[(l, m)])
                      for l, m, k in wanted]
        return {(l, m): idx for (l, m, _), idx in zip(wanted, chosen)}

    def _select(self, s: int, l: int, m: int, k: int, tokens: np.ndarray) -> np.ndarray:
        idx = self._pre.pop((l, m), None)
        if idx is None:
            idx = self.selector.select(s, l, self.backend.modules[m], k, tokens, self.cache[(l, m)])
        return idx

    # --- block graphs (soda.blocks): one backend call for a layer, a run of layers, or a step --
    def _block_for(self, s: int, l: int) -> Block | None:
        """The longest block graph of the backend that starts at layer `l` and covers step `s`'s
        actions there, with every pruned module's token choice makeable before the call."""
        if not hasattr(self, "_starts"):
            self._index_blocks()
        for block in self._starts.get(l, ()):
            if block.last < self.backend.num_layers and self._covers(s, block):
                return block
        return None

    def _step_graph_for(self, s: int) -> Block | None:
        """The step graph (`Block.step`) that runs all of step `s` in one call, if any (the
        schedule, selector and recorder are fixed: decided once per step index)."""
        if not hasattr(self, "_starts"):
            self._index_blocks()
        if s not in self._whole_at:
            self._whole_at[s] = None if self.schedule.is_skip(s) else next(
                (bl for bl in self._whole if self._covers(s, bl)), None)
        return self._whole_at[s]

    def _covers(self, s: int, block: Block) -> bool:
        lean = s >= self._lean_from and self.recorder is None
        per_layer = self._codes.get(s)
        if per_layer is None:
            per_layer = self._codes[s] = [layer_code(row) for row in self.schedule.steps[s]]
        codes = set(per_layer[block.first:block.last + 1])
        # Full modules may also run as "c" (lean: nothing kept) or "k" (no scores read); the
        # blocks are tried in that order of preference (`_index_blocks`).
        covered = codes == {block.code} or (lean and {c.replace(COMPUTE, COMPUTED_ONLY) for c in codes} == {block.code}) \
            or (s not in self._scored and {c and c.replace(COMPUTE, KEPT) for c in codes} == {block.code})
        return covered and self._ready(block)

    def _index_blocks(self) -> None:
        """Blocks by first layer, longest first (the one emitting nothing first among equals), the
        step graphs over every layer (lean first), and the step from which every step is full or
        skipped: no later step reads a cache, forecast or selector state, so full modules need
        not emit their outputs (pattern letter "c")."""
        self._starts: dict[int, list[Block]] = {}
        self._whole: list[Block] = []
        self._whole_at: dict[int, Block | None] = {}
        self._lean_flops: dict[tuple, list[float]] = {}
        L = self.backend.num_layers
        self._codes: dict[int, list[str | None]] = {}  # per step, each layer's pattern
        for bl in sorted(getattr(self.backend, "blocks", ()), key=lambda bl: (-bl.last, COMPUTED_ONLY not in bl.code, KEPT not in bl.code)):
            if not bl.step:
                self._starts.setdefault(bl.first, []).append(bl)
            elif (bl.first, bl.last) == (0, L - 1) and PRUNED not in bl.code:  # a pruned choice needs tokens first
                self._whole.append(bl)
        steps = self.schedule.steps
        self._lean_from = next(s0 for s0 in range(len(steps) + 1) if all(
            st == "skip" or all(a == FULL for row in st for a in row) for st in steps[s0:]))
        self._scored = self._scores_read()

    def _scores_read(self) -> set[int]:
        """The steps whose modules' scores (the attention each token receives, ...) a later step
        reads: none when the selector reads no scores (`TokenSelector.reads_scores`); else those
        followed by a pruning step before the next all-full step, which replaces every score. The
        others may run their full modules in graphs without scores ("k", soda.blocks)."""
        if not getattr(self.selector, "reads_scores", True):
            return set()
        steps, read, pruned_later = self.schedule.steps, set(), False
        for s in reversed(range(len(steps))):
            if steps[s] == "skip":
                continue
            kinds = {parse_action(a)[0] for row in steps[s] for a in row}
            if pruned_later:
                read.add(s)
            if kinds == {FULL}:
                pruned_later = False
            if PRUNE in kinds:
                pruned_later = True
        return read

    def _ready(self, block: Block) -> bool:
        """Every pruned module of `block` has its tokens chosen before the call: at the step's
        start (`_preselect`), or, for a one-layer block, by a selector that reads nothing of the
        layer computed before the module."""
        reads = getattr(self.selector, "reads", None)
        for m, (name, c) in enumerate(zip(self.backend.modules, block.code)):
            if c != PRUNED or all((l, m) in self._pre for l in block.layers):
                continue
            if reads is None or block.first != block.last:
                if m == 0 and block.first == block.last:  # unknown needs: only a layer's first module
                    continue
                return False
            needs = reads(name)
            if ("tokens" in needs and m > 0) or any(
                    (self.backend.modules[j] in needs or "*" in needs) and block.code[j] != GIVEN for j in range(m)):
                return False
        return True

    def _run_block(self, s: int, block: Block, tokens: np.ndarray, step: tuple) -> np.ndarray:
        """What the layer loop does for `block`'s layers, in one backend call: the given outputs,
        caches and token choices go in; caches, forecasts, selectors and FLOPs are updated from
        what comes out, in the loop's order."""
        B, N, _ = tokens.shape
        feeds, kept = self._block_feeds(s, block, tokens)
        out = self.backend.block(block, tokens, step, feeds, self.context)
        self._absorb(s, block, out, feeds, kept, B, N)
        return out["tokens_out"]

    def _run_step_graph(self, s: int, block: Block, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """A whole step in one backend call (embed, every layer, final), accounted as the loop
        would: embed, the layers, final; its last tokens are kept for later skip steps."""
        B = x.shape[0]
        feeds, kept = self._block_feeds(s, block, None)
        out = self.backend.step_graph(block, x, t, feeds, self.context)
        tokens = self.last_tokens = out["tokens_out"]
        self.xp = self.xp or namespace(tokens)
        self.flops_done += self.flops.embed(B)
        self._absorb(s, block, out, feeds, kept, B, tokens.shape[1])
        self.flops_done += self.flops.final(B)
        return out["out"]

    def _block_feeds(self, s: int, block: Block, tokens) -> tuple[dict, dict]:
        """The given outputs (cache or forecast), and for pruned modules the cache and the chosen
        token indices (with their count), by graph input name."""
        feeds, kept = {}, {}
        if GIVEN not in block.code and PRUNED not in block.code:
            return feeds, kept
        for l in block.layers:
            for m, (name, c) in enumerate(zip(self.backend.modules, block.code)):
                action, key = self.schedule.action(s, l, m), f"{name}.{l}"
                if c == GIVEN:
                    order = forecast_order(action)
                    feeds[f"D.{key}"] = self.taylor[(l, m)].predict(s, order) if order else self.cache[(l, m)]
                elif c == PRUNED:
                    k = kept_tokens(parse_action(action)[1], tokens.shape[1])
                    idx = self._select(s, l, m, k, tokens)
                    feeds[f"cache.{key}"], feeds[f"idx.{key}"], kept[(l, m)] = self.cache[(l, m)], idx, k
        return feeds, kept

    def _absorb(self, s: int, block: Block, out: dict, feeds: dict, kept: dict, B: int, N: int) -> None:
        """Caches, forecasts, selectors and FLOPs from a block's outputs, in the loop's order."""
        if set(block.code) == {COMPUTED_ONLY}:  # nothing to keep: only the FLOPs, added in the loop's order
            key = (id(block), B, N)  # the backend's blocks live as long as this executor
            if key not in self._lean_flops:
                self._lean_flops[key] = [v for l in block.layers for v in (
                    self.flops.modulation(B), *(self.flops.module(spec.name, B, N, l) for spec in self.backend.specs))]
            for v in self._lean_flops[key]:
                self.flops_done += v
            return
        for l in block.layers:
            self.flops_done += self.flops.modulation(B)
            for m, (spec, c) in enumerate(zip(self.backend.specs, block.code)):
                key = f"{spec.name}.{l}"
                score = out[f"{spec.score}.{key}"] if spec.score and c in (COMPUTE, PRUNED) else None
                if c == COMPUTED_ONLY:
                    self.flops_done += self.flops.module(spec.name, B, N, l)
                elif c in (COMPUTE, KEPT):
                    D = self.cache[(l, m)] = out[f"out.{key}"]
                    self.flops_done += self.flops.module(spec.name, B, N, l)
                    if (l, m) in self.taylor:
                        self.taylor[(l, m)].update(s, D)
                    self.selector.observe(s, l, spec.name, None, D, score)
                    if self.recorder is not None:
                        self.recorder(s, l, spec.name, D)
                elif c == PRUNED:
                    self.cache[(l, m)] = out[f"cache_out.{key}"]
                    self.flops_done += self.flops.module(spec.name, B, kept[(l, m)], l)
                    self.selector.observe(s, l, spec.name, feeds[f"idx.{key}"], out[f"out.{key}"], score)
