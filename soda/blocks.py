"""Block graphs: one exported graph per (layers, pattern) instead of one call per module.

A block graph runs a layer's modulation, its modules and the residual updates `x + gate * D`
for one *pattern* of actions, one letter per module:

- "f" full: the module is computed on every token; its pre-gate output (and score) comes out
  for the cache, the forecast and the selectors;
- "r" given: the loop supplies D (the cached output for `reuse`, the Taylor prediction for
  `forecast@O`) and the graph only adds it with the current gate;
- "p" pruned: the loop supplies the cache and the indices of the tokens to recompute; the
  graph gathers them, computes the module on them, scatters them into the cache (out comes
  the new cache and the recomputed part) and adds the result;
- "c" computed, nothing kept: like "f" without outputs, for full computations no later step
  reads (a full schedule, or the full steps after a schedule's last reuse), where emitting
  the outputs (and the attention score) is work the monolithic model does not do;
- "k" computed, output kept, no score: like "f" without the score, for full steps whose scores
  no later step reads (FORA, TaylorSeer, SODA's feature mean read none; ToCa none from a full
  step followed by another before any pruning): the attention each token receives is a
  reduction over the whole attention map, 2-3% of a DiT-S/2 full step (docs/runtime.md).

`prune@a+forecast@O` has no letter: such a layer runs module by module. A block may span a
run of consecutive layers with the same pattern. A *step graph* (`Block.step`, named
"step.0-{L-1}.<code>") is a block over every layer with the step's embedding (latents,
timestep, conditioning -> tokens and step entries) before and the final layer after: a whole
step in one call, out come the model output, the last tokens (for later skip steps) and the
modules' outputs as its letters say. Its letters are "f", "k", "c" and "r" only: a pruned module's
tokens are chosen on the tokens entering its layer, which exist only inside the graph. Torch-free:
the exporter (`export.graphs`) builds the graphs from these names, the runtime feeds them,
and the executor (`soda.executor`) decides per step and layer which block covers what.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from soda.schedule import FORECAST, FULL, PRUNE, REUSE, forecast_order, parse_action

GIVEN, COMPUTE, PRUNED, COMPUTED_ONLY, KEPT = "r", "f", "p", "c", "k"
FORMAT = 2  # the manifest's "blocks" section (2: step graphs)
READABLE_FORMATS = (1, 2)  # 1: block graphs only, still run


def module_code(action: str) -> str | None:
    """The pattern letter of one action; None when no block graph covers it."""
    kind, _ = parse_action(action)
    if kind in (REUSE, FORECAST):
        return GIVEN
    if kind == FULL:
        return COMPUTE
    if kind == PRUNE and not forecast_order(action):
        return PRUNED
    return None


def layer_code(row) -> str | None:
    """The pattern of one layer's actions ("fr", "rp", ...), or None."""
    codes = [module_code(a) for a in row]
    return None if None in codes else "".join(codes)


@dataclass(frozen=True)
class Block:
    """Layers first..last (inclusive), each with the same pattern `code`; `step`: a whole step
    (embed, then every layer, then the final layer; first = 0, last = depth - 1)."""

    first: int
    last: int
    code: str
    step: bool = False

    @property
    def name(self) -> str:
        span = f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"
        return f"{'step' if self.step else 'block'}.{span}.{self.code}"

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    def io(self, interface) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Input and output names, in graph order (see `tensors`)."""
        ins, outs = self.tensors(interface)
        return tuple(n for n, _ in ins), tuple(n for n, _ in outs)

    def tensors(self, interface) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """[(name, role)] of the inputs and outputs. Roles: "tokens", "step", "given" [B, N, D],
        "cache" [B, N, D], "idx" [B, n], "context" (a conditioning or per-generation entry),
        "out" (D of all tokens, or the recomputed part for a pruned module), "score",
        "cache_out"; a step graph's: "latent" (x), "timestep" (t), "model" (the model output)."""
        if self.step:
            ins = [("x", "latent"), ("t", "timestep")] + [(n, "context") for n in interface.embed_context]
            outs = [("out", "model"), ("tokens_out", "tokens")]
        else:
            ins = [("tokens", "tokens")] + [(n, "step") for n in interface.modulation_reads]
            outs = [("tokens_out", "tokens")]
        seen = {n for n, _ in ins}
        for l in self.layers:
            for spec, c in zip(interface.modules, self.code):
                key = f"{spec.name}.{l}"
                if c == GIVEN:
                    ins.append((f"D.{key}", "given"))
                    continue
                if c == PRUNED:
                    ins += [(f"cache.{key}", "cache"), (f"idx.{key}", "idx")]
                    outs.append((f"cache_out.{key}", "cache_out"))
                for n in spec.context:
                    name = context_name(interface, n, l)
                    if name not in seen:
                        seen.add(name)
                        ins.append((name, "context"))
                if c == COMPUTED_ONLY:
                    continue
                outs.append((f"out.{key}", "out"))
                if spec.score and c != KEPT:
                    outs.append((f"{spec.score}.{key}", "score"))
        return ins, outs


def context_name(interface, name: str, layer: int) -> str:
    """Graph input name of a module's context entry: per-layer ones carry the layer."""
    return f"{name}.{layer}" if name in interface.per_layer else name


_NAME = re.compile(r"^(block|step)\.(\d+)(?:-(\d+))?\.([a-z]+)$")


def parse_name(name: str) -> Block | None:
    m = _NAME.match(name)
    if not m:
        return None
    first = int(m.group(2))
    return Block(first, int(m.group(3) or first), m.group(4), m.group(1) == "step")


def default_blocks(interface, depth: int, schedule=None) -> list[Block]:
    """The block graphs an export writes, per layer: all-full, all-given, the last module (the
    MLP) pruned with the others given (the baselines' pattern: ToCa and DuCa on DiT reuse the
    attention and prune the MLP), and every pattern `schedule` uses (SODA's, fixed at export);
    the baselines' pattern also over every layer at once, their pruned steps' layers in one call
    (about 5% faster than one call per layer on DiT-S/2, docs/runtime.md "Where it stands");
    plus step graphs (`Block.step`) for a whole full step, with its outputs but no scores ("k";
    a full step whose scores a later step reads runs its layers' "ff" blocks) and without ("c":
    full steps no later step reads), and for a whole all-given step (FORA's and SODA's
    reuse steps, TaylorSeer's forecast ones). Chosen by measurement (docs/runtime.md): all 9 DiT
    patterns per layer made dit-digits' folder 1.2x its raw weights, for patterns the baselines
    never run; a pattern without a graph runs module by module at a cost of about 1% of that
    layer; a step graph saves the embed and final calls (7% of a dit-digits step)."""
    M = len(interface.modules)
    chosen = [COMPUTE * M, GIVEN * M]
    if interface.modules[-1].prunable:
        chosen.append(GIVEN * (M - 1) + PRUNED)
    for step in (schedule.steps if schedule is not None else ()):
        if step == "skip":
            continue
        for row in step:
            code = layer_code(row)
            if code is not None and code not in chosen:
                chosen.append(code)
    blocks = [Block(l, l, c) for l in range(depth) for c in chosen]
    if interface.modules[-1].prunable and depth > 1:
        blocks.append(Block(0, depth - 1, GIVEN * (M - 1) + PRUNED))
    return blocks + [Block(0, depth - 1, c * M, step=True) for c in STEP_CODES]


STEP_CODES = (KEPT, COMPUTED_ONLY, GIVEN)  # the step graphs default_blocks writes, one letter for every module
