"""ToCa and DuCa on Open-Sora 1.2 (Shenyi-Z/ToCa `Open-Sora/`, Shenyi-Z/DuCa `DuCa-Open-Sora/`).

The video code differs from the DiT one (soda/policies/toca.py): every module has its own force
cycle, the step index counts UP (`current['step'] = i`, i = 0 noisiest, which is our s), and the
first three steps are always computed ("for OpenSora series models, the first 3 steps is with great
importance"). Official settings (`scripts/inference.py`): fresh_ratio R = 0.1, fresh_threshold 3,
ratio scheduler 'ToCa', force_fresh 'global', soft_fresh_weight 0.25; `force_scheduler` sets the
cycles spatial attn 3, temporal attn 3, cross-attn 6, mlp 3 (= N, N, 2N, N with N = 3).

ToCa (`global_force_fresh`): a module is computed in full when s <= 2 or s % cycle == 0. Otherwise
attention is reused whole; cross-attention and the MLP are refreshed for int(float32(clamp(r, 0, 1))
* N_tokens) tokens with r = R * module_factor, module_factor = 1 + 0.33 * 1.5 for the MLP and
1 - (1 - 0.33) * 1.5 < 0 for cross-attention, so cross-attention is in effect always reused.
DuCa (`cal_type`, lists_ToCa_CN): the same full rule; on other steps s % N odd is a ToCa step (attn
and cross-attn reused, MLP refreshed as above) and s % N even an aggressive one, where every module
of every block is skipped and the last block's output of the previous step is used: a "skip" step.
(For N = 3 this is exactly the official lists, cross-attention's 6-cycle included.)

Scaled to a target speedup (`--speedup`), N and R are searched as for DiT (cross-attention keeps
the cycle 2N). Token choice, the official scores (`cache_type` of each `scripts/inference.py`):
ToCa 'attention', the entropy of the block's cross-attention map averaged over the CFG halves
("toca-cross-entropy"); DuCa 'kv-norm', the self-attention values' norms ("duca-value-norm");
both plus 0.25 x staleness / N, no spatial bonus (the Open-Sora code has it off). The modules
emit what the scores need (soda/models/opensora.py), in PyTorch and in the exported graphs.
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError
from soda.policies import ScheduleSpec
from soda.schedule import FULL, REUSE, SKIP, Schedule, prune

PUBLISHED = {"N": 3, "R": 0.1}
FIRST_FULL = 3  # steps 0, 1, 2
MODULE_WEIGHT, MODULE_TIME_WEIGHT = 1.5, 0.33
STALENESS_WEIGHT = 0.25
MODULES = ("attn", "cross_attn", "mlp")
SELECTORS = {"toca": "toca-cross-entropy", "duca": "duca-value-norm"}  # cache_type 'attention' / 'kv-norm'


def module_factor(module: str) -> float:
    """fresh_ratio_scheduler 'ToCa' (layer, step and type weights are 0 in the Open-Sora code)."""
    if module == "cross_attn":
        return 1 - (1 - MODULE_TIME_WEIGHT) * MODULE_WEIGHT
    return 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT


def refreshed_tokens(R: float, module: str, num_tokens: int, s: int = 0, S: int = 1, block: int = 0,
                     blocks: int = 28, step_weight: float = 0.0, layer_weight: float = 0.0) -> int:
    """fresh_ratio_scheduler 'ToCa' then cache_cutfresh: R * layer_factor * step_factor *
    module_factor (type factor 1), clamped into a float32 tensor, int(rate * N) (truncation).
    The official step and layer weights are 0; they are the knobs `bench --tune` turns. `block`
    is the index within the spatial (or temporal) stack; the official code divides by 27."""
    layer_factor = 1 + layer_weight - 2 * layer_weight * block / max(blocks - 1, 1)
    step_factor = 1 + step_weight - 2 * step_weight * s / S
    rate = R * layer_factor * step_factor * module_factor(module) * 1.0
    return int(np.float32(min(max(rate, 0.0), 1.0)) * np.float32(num_tokens))


def cycle(module: str, N: int) -> int:
    return 2 * N if module == "cross_attn" else N


def is_full(s: int, module: str, N: int) -> bool:
    return s < FIRST_FULL or s % cycle(module, N) == 0


def is_aggressive(s: int, N: int) -> bool:
    """DuCa: every module of the step is aggressive (s % N even and non-zero, after the first three)."""
    return s >= FIRST_FULL and s % N != 0 and (s % N) % 2 == 0


def _action(spec: ScheduleSpec, s: int, layer: int, module: str, N: int, R: float, sw: float = 0.0,
            lw: float = 0.0) -> str:
    if is_full(s, module, N):
        return FULL
    if module == "attn":
        return REUSE
    n = spec.num_tokens
    k = refreshed_tokens(R, module, n, s, spec.num_steps, layer // 2, spec.num_layers // 2, sw, lw)
    return REUSE if k <= 0 else FULL if k >= n else prune(k / n)


def check(spec: ScheduleSpec, N: int) -> None:
    if tuple(spec.modules) != MODULES:
        raise UserError(f"the Open-Sora ToCa/DuCa settings are for modules {', '.join(MODULES)}; "
                        f"this model has {', '.join(spec.modules)}")
    if N < 2:
        raise UserError(f"ToCa/DuCa interval N must be at least 2, got {N}")


def build_steps(spec: ScheduleSpec, N: int, R: float, dual: bool = False, sw: float = 0.0, lw: float = 0.0) -> list:
    check(spec, N)
    steps = []
    for s in range(spec.num_steps):
        if dual and is_aggressive(s, N):
            steps.append(SKIP)
            continue
        steps.append([[_action(spec, s, l, m, N, R, sw, lw) for m in spec.modules] for l in range(spec.num_layers)])
    return steps


def fast_flops(spec: ScheduleSpec, fm, N: int, R: float, dual: bool = False, sw: float = 0.0,
               lw: float = 0.0) -> float:
    """schedule_flops(build_steps(...), fm, 1), with each (module, tokens, layer parity) costed once."""
    from soda.schedule import kept_tokens, parse_action

    n, L = spec.num_tokens, spec.num_layers
    costs: dict[tuple[str, int, int], float] = {}

    def cost(module: str, tokens: int, layer: int) -> float:
        key = (module, tokens, layer % 2)  # spatial (even) and temporal (odd) layers cost alike among themselves
        if key not in costs:
            costs[key] = fm.module(module, 1, tokens, layer)
        return costs[key]

    total = fm.condition(1)
    for s in range(spec.num_steps):
        total += fm.embed(1) + fm.final(1)
        if dual and is_aggressive(s, N):
            continue
        total += L * fm.modulation(1)
        rows: dict[int, list[str]] = {}  # a step row per block index (one for all when the layer weight is 0)
        for l in range(L):
            b = l // 2 if lw else 0
            if b not in rows:
                rows[b] = [_action(spec, s, 2 * b, m, N, R, sw, lw) for m in spec.modules]
            for m, action in zip(spec.modules, rows[b]):
                kind, rate = parse_action(action)
                if kind == FULL:
                    total += cost(m, n, l)
                elif kind == "prune":
                    total += cost(m, kept_tokens(rate, n), l)
    return total


def make(policy: str, spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None,
         R: float | None = None, seed: int = 0, step_weight: float | None = None,
         layer_weight: float | None = None, selector: str | None = None) -> Schedule:
    """The official setting, or (N, R) searched to hit `speedup`; with `speedup` and N (and
    optionally the weights: a tuned setting), R alone fills the budget. `selector`: the official
    score (default), or "duca-random" (DuCa's FlashAttention-free choice, drawn from `seed`)."""
    from soda.policies import scaling
    from soda.policies.toca import to_schedule

    dual = policy == "duca"
    name = "DuCa" if dual else "ToCa"
    name_sel = SELECTORS[policy] if selector in (None, SELECTORS[policy]) else selector
    if name_sel not in (SELECTORS[policy], "duca-random"):
        raise UserError(f"{name} on Open-Sora scores tokens with {SELECTORS[policy]} (official) or duca-random, "
                        f"not {selector}")
    sw, lw = step_weight or 0.0, layer_weight or 0.0

    def build(n_: int, r_: float) -> Schedule:
        steps = build_steps(spec, n_, r_, dual, sw, lw)
        sel = {"interval": n_, "staleness_weight": STALENESS_WEIGHT, "bonus_ratio": 0.0,
               "skip_steps": [s for s, step in enumerate(steps) if step == SKIP]}
        if name_sel == "duca-random":
            sel["seed"] = seed
        schedule = to_schedule(spec, policy, steps, n_, r_, sw, lw, sel, name_sel)
        schedule.params.update({
            "family": "open-sora", "cycles": {m: cycle(m, n_) for m in spec.modules}, "first_full": FIRST_FULL,
            "module_factor_mlp": 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT,
            "module_factor_cross_attn": module_factor("cross_attn"),
        })
        return schedule

    if speedup is None:
        return scaling.record(build(N or PUBLISHED["N"], PUBLISHED["R"] if R is None else R), spec, flops, None)
    if R is not None:
        raise UserError(f"give either a target --speedup or {name}'s R, not both (R is solved for the speedup)")
    check(spec, N or PUBLISHED["N"])
    cost = lambda fm, n_, r_: fast_flops(spec, fm, n_, r_, dual, sw, lw)  # noqa: E731
    if N is not None:  # a tuned setting: N (and the weights) fixed, R fills the budget
        return scaling.fixed_interval(spec, name, build, cost, flops, speedup, N)
    return scaling.search_interval_ratio(name, spec, build, cost, flops, speedup, PUBLISHED["R"])
