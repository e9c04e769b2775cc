"""ToCa (Shenyi-Z/ToCa, DiT-ToCa): full steps on an adaptive interval, token-wise MLP refresh between.

What the official DiT code does, transcribed (`step` counts DOWN: step = S-1-s, s = 0 noisiest):
- Full step when `step == S-1` or `step % I == 0`. I is recomputed at every full step
  (`force_scheduler`): I = round(N / (1 + w - 2w*step/S)) with w = 0.4, computed in float32 and
  rounded half-to-even like `torch.round`; I = 2 while step is in range(int(0.2S), int(0.4S)).
- Partial step: every attention output is reused; the MLP of layer l is recomputed for
  k = int(float32(clamp(r, 0, 1)) * N_tokens) tokens (truncation, as `cache_cutfresh` does), with
  r = R * (1 + wl - 2wl*l/(L-1)) * (1 + wt - 2wt*step/S) * (1 + 0.6*2.5)
  (`fresh_ratio_scheduler`, schedules 'ToCa-ddim50' / 'ToCa-ddpm250'; the official code divides
  by 27, i.e. L-1 for DiT-XL's 28 layers).
The schedule stores k exactly as `prune@(k/N_tokens)` (so `kept_tokens` gives back k), "reuse"
when k == 0 and "full" when k == N_tokens. Token choice: the "toca-attention" selector.

DuCa (soda/policies/duca.py) reuses this generator with its alternating aggressive steps.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from soda.errors import UserError
from soda.policies import ScheduleSpec
from soda.schedule import FULL, REUSE, SKIP, Schedule, full_grid, prune

# Published defaults per sampler: interval N, fresh ratio R, step weight wt, layer weight wl.
PUBLISHED = {
    "ddim": {"N": 3, "R": 0.07, "step_weight": 2.0, "layer_weight": -0.2},  # 'ToCa-ddim50'
    "ddpm": {"N": 4, "R": 0.07, "step_weight": 0.4, "layer_weight": 0.8},  # 'ToCa-ddpm250'
}
INTERVAL_WEIGHT = 0.4  # force_scheduler's linear_step_weight for ToCa (0 would be FORA)
MODULE_WEIGHT, MODULE_TIME_WEIGHT = 2.5, 0.6
STALENESS_WEIGHT = 0.25  # soft_fresh_weight (lambda_3)
BONUS_RATIO = 0.6  # local_selection_with_bonus(score, 0.6, 2)

FULL_STEP, PARTIAL_STEP, AGGRESSIVE_STEP = "full", "partial", "aggressive"


def interval_after_full(N: int, step: int, S: int) -> int:
    """force_scheduler: the interval set by a full step at `step` (float32, half-to-even rounding)."""
    factor = np.float32(1 + INTERVAL_WEIGHT - 2 * INTERVAL_WEIGHT * step / S)
    interval = int(np.round(np.float32(N) / factor))
    if step in range(int(S * 0.2), int(S * 0.4)):
        interval = 2  # "the model is extremely sensitive for cache" in these steps
    return interval


def _kind(step: int, S: int, N: int, interval: int | None, dual: bool) -> str:
    first = step == S - 1
    rest = step % (N if first else interval)
    if first or rest == 0:
        return FULL_STEP
    if dual and rest % 2 == 0:  # DuCa's cal_type: odd remainder -> ToCa step, even -> aggressive
        return AGGRESSIVE_STEP
    return PARTIAL_STEP


@lru_cache(maxsize=256)
def step_kinds(S: int, N: int, dual: bool = False) -> tuple[str, ...]:
    """Kind of each step in OUR order (index s = S-1-step), decided once per step."""
    kinds, interval = [], None
    for step in range(S - 1, -1, -1):
        kind = _kind(step, S, N, interval, dual)
        if kind == FULL_STEP:
            interval = interval_after_full(N, step, S)
        kinds.append(kind)
    return tuple(kinds)


def layer_kinds_official(S: int, N: int, L: int, dual: bool = False) -> list[list[str]]:
    """The literal official loop: the interval is updated inside the layer loop, so after a full
    layer 0 the remaining layers of the same step test `step % I_new` (see docs/baselines.md)."""
    rows, interval = [], None
    for step in range(S - 1, -1, -1):
        row = []
        for _ in range(L):
            kind = _kind(step, S, N, interval, dual)
            if kind == FULL_STEP:
                interval = interval_after_full(N, step, S)
            row.append(kind)
        rows.append(row)
    return rows


def mlp_token_table(R: float, step_weight: float, layer_weight: float, S: int, L: int, num_tokens: int) -> np.ndarray:
    """Tokens the official code recomputes for the MLP of each (s, layer) at a partial step, [S, L].

    `fresh_ratio_scheduler` multiplies in double precision in this order; `cache_cutfresh`
    clamps into a float32 tensor and takes int(rate * N) in float32 (truncation)."""
    step = (S - 1 - np.arange(S, dtype=np.float64))[:, None]
    layer = np.arange(L, dtype=np.float64)[None, :]
    step_factor = 1 + step_weight - 2 * step_weight * step / S
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / max(L - 1, 1)
    module_factor = 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT
    rate = np.clip(R * layer_factor * step_factor * module_factor, 0.0, 1.0).astype(np.float32)
    return (rate * np.float32(num_tokens)).astype(np.int64)


def _mlp_action(k: int, num_tokens: int) -> str:
    if k <= 0:
        return REUSE
    if k >= num_tokens:
        return FULL
    return prune(k / num_tokens)


def _check_modules(spec: ScheduleSpec) -> None:
    if "mlp" not in spec.modules:
        raise UserError(f"ToCa/DuCa need an 'mlp' module; this model has {', '.join(spec.modules)}")


def build_steps(spec: ScheduleSpec, N: int, R: float, step_weight: float, layer_weight: float,
                dual: bool = False, layer_quirk: bool = False) -> list:
    """Schedule steps for ToCa (dual=False) or DuCa (dual=True)."""
    _check_modules(spec)
    if N < 2:
        raise UserError(f"ToCa/DuCa interval N must be at least 2, got {N}")
    S, L, n = spec.num_steps, spec.num_layers, spec.num_tokens
    if layer_quirk:
        kinds = layer_kinds_official(S, N, L, dual)
    else:
        kinds = [[k] * L for k in step_kinds(S, N, dual)]
    tokens = mlp_token_table(R, step_weight, layer_weight, S, L, n)
    steps = []
    for s, row_kinds in enumerate(kinds):
        if all(k == AGGRESSIVE_STEP for k in row_kinds):
            steps.append(SKIP)
            continue
        if AGGRESSIVE_STEP in row_kinds:
            raise UserError(f"step {s} mixes full and aggressive layers; a schedule cannot express that")
        grid = full_grid(L, len(spec.modules))
        for l, kind in enumerate(row_kinds):
            if kind == PARTIAL_STEP:
                grid[l] = [_mlp_action(int(tokens[s, l]), n) if m == "mlp" else REUSE for m in spec.modules]
        steps.append(grid)
    return steps


def fast_flops(spec: ScheduleSpec, fm, N: int, R: float, step_weight: float, layer_weight: float,
               dual: bool = False) -> float:
    """schedule_flops(build_steps(...), fm, 1) without building the schedule (for the search)."""
    S, L, n = spec.num_steps, spec.num_layers, spec.num_tokens
    kinds = np.array(step_kinds(S, N, dual))
    tokens = np.clip(mlp_token_table(R, step_weight, layer_weight, S, L, n)[kinds == PARTIAL_STEP], 0, n)
    per_token_mlp = fm.module("mlp", 1, n) / n  # linear in the token count
    full_layer = sum(fm.module(m, 1, n) for m in spec.modules)
    computed = (kinds != AGGRESSIVE_STEP).sum()
    return (fm.condition(1) + S * (fm.embed(1) + fm.final(1)) + computed * L * fm.modulation(1)
            + (kinds == FULL_STEP).sum() * L * full_layer + per_token_mlp * float(tokens.sum()))


def published(spec: ScheduleSpec) -> dict:
    if spec.sampler not in PUBLISHED:
        raise UserError(f"ToCa has no published setting for sampler {spec.sampler!r}")
    return dict(PUBLISHED[spec.sampler])


def make(spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None,
         R: float | None = None, step_weight: float | None = None, layer_weight: float | None = None,
         layer_quirk: bool = False) -> Schedule:
    """ToCa schedule: published setting for the sampler, or (N, R) searched to hit `speedup` by the
    scaling rule; with `speedup` and N (and optionally the weights), R alone is solved."""
    from soda.policies import scaling

    p = published(spec)
    for key, value in (("N", N), ("R", R), ("step_weight", step_weight), ("layer_weight", layer_weight)):
        if value is not None:
            p[key] = value
    wt, wl = p["step_weight"], p["layer_weight"]

    def build(n_: int, r_: float) -> Schedule:
        return to_schedule(spec, "toca", build_steps(spec, n_, r_, wt, wl, False, layer_quirk), n_, r_, wt, wl,
                         {"interval": n_, "staleness_weight": STALENESS_WEIGHT, "bonus_ratio": BONUS_RATIO},
                         "toca-attention")

    if speedup is None:
        schedule = build(p["N"], p["R"])
        return scaling.record(schedule, spec, flops, None)
    if R is not None:
        raise UserError("give either a target --speedup or ToCa's R, not both (R is solved for the speedup)")
    if layer_quirk:
        raise UserError("layer_quirk reproduces the published setting only; it cannot be combined with --speedup")
    _check_modules(spec)
    cost = lambda fm, n_, r_: fast_flops(spec, fm, n_, r_, wt, wl, False)  # noqa: E731
    if N is not None:  # a tuned setting: N (and the weights) fixed, R fills the budget
        return scaling.fixed_interval(spec, "ToCa", build, cost, flops, speedup, N)
    return scaling.search_interval_ratio("ToCa", spec, build, cost, flops, speedup, p["N"], p["R"])


def to_schedule(spec, policy, steps, N, R, wt, wl, selector_params, selector) -> Schedule:
    """The Schedule with ToCa/DuCa's parameters recorded in `params`."""
    from soda.policies.full import base_schedule

    params = {
        "N": N, "R": R, "step_weight": wt, "layer_weight": wl, "interval_weight": INTERVAL_WEIGHT,
        "module_factor_mlp": 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT,
        "token_count": "int(float32(clamp(r,0,1)) * num_tokens), stored as prune@(k/num_tokens)",
        "selector_params": selector_params,
    }
    return base_schedule(spec, policy, steps, selector, params)
