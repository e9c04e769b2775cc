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

PixArt-alpha (Shenyi-Z/ToCa `PixArt-alpha-ToCa`, sampler dpm-solver; `code: "pixart"` below) differs:
- `step` counts UP (step = s); full when `step == 0` or `step % I == 0`, and each full step sets
  I = round(N / (1 - 0.2 + 2*0.2*step/S)) (float32, half-to-even); no sensitive-range rule.
- Partial step: self-attention reused whole; cross-attention and MLP refreshed token-wise, with
  module factors 1 - (1-0.6)*1.0 = 0.6 (cross-attention) and 1 + 0.6*1.0 = 1.6 (MLP), step factor
  1 - (-0.9) + 2*(-0.9)*step/S and layer factor 1 + 0.6 - 1.2*l/(L-1) ('ToCa' ratio schedule).
- Tokens scored by the cross-attention entropy ("toca-cross-entropy"), bonus 0.4 on 4x4 grids.
Published (scripts/inference.py defaults, the paper's setting): N = 3, R = 0.30, 20 steps, CFG 4.5.
Which modules are refreshed is the module list of the setting; every other module (a token-mixing
one) is reused whole on partial steps.

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
    # PixArt-alpha-ToCa: 'ToCa' ratio schedule, step_weight -0.9 in its "1 - w + 2w step/S" form
    # (= 1 + 0.9 - 2*0.9*step/S, bit for bit), layer_weight 0.6.
    "dpm-solver": {"N": 3, "R": 0.30, "step_weight": 0.9, "layer_weight": 0.6, "code": "pixart"},
}
PIXART_INTERVAL_WEIGHT = 0.2  # PixArt-alpha-ToCa force_scheduler's linear_step_weight
PIXART_MODULE_FACTORS = {"cross_attn": 1 - (1 - 0.6) * 1.0, "mlp": 1 + 0.6 * 1.0}
PIXART_BONUS = (0.4, 4)  # local_selection_with_bonus(score, 0.4, 4)
INTERVAL_WEIGHT = 0.4  # force_scheduler's linear_step_weight for ToCa (0 would be FORA)
MODULE_WEIGHT, MODULE_TIME_WEIGHT = 2.5, 0.6
STALENESS_WEIGHT = 0.25  # soft_fresh_weight (lambda_3)
BONUS_RATIO = 0.6  # local_selection_with_bonus(score, 0.6, 2)

FULL_STEP, PARTIAL_STEP, AGGRESSIVE_STEP = "full", "partial", "aggressive"


def interval_after_full(N: int, step: int, S: int, code: str = "dit", weight: float | None = None) -> int:
    """force_scheduler: the interval set by a full step at `step` (float32, half-to-even rounding).

    `code` "pixart": PixArt-alpha-ToCa's rule, `weight` its linear_step_weight (DuCa: 0, I = N)."""
    if code == "pixart":
        w = PIXART_INTERVAL_WEIGHT if weight is None else weight
        return int(np.round(np.float32(N) / np.float32(1 - w + 2 * w * step / S)))
    factor = np.float32(1 + INTERVAL_WEIGHT - 2 * INTERVAL_WEIGHT * step / S)
    interval = int(np.round(np.float32(N) / factor))
    if step in range(int(S * 0.2), int(S * 0.4)):
        interval = 2  # "the model is extremely sensitive for cache" in these steps
    return interval


def _official_step(s: int, S: int, code: str) -> int:
    """The official loop's `step` at our step index s (DiT counts down, PixArt up)."""
    return s if code == "pixart" else S - 1 - s


def _kind(step: int, S: int, N: int, interval: int | None, dual: bool, code: str = "dit") -> str:
    first = step == (0 if code == "pixart" else S - 1)
    rest = step % (N if first else interval)
    if first or rest == 0:
        return FULL_STEP
    if dual and rest % 2 == 0:  # DuCa's cal_type: odd remainder -> ToCa step, even -> aggressive
        return AGGRESSIVE_STEP
    return PARTIAL_STEP


@lru_cache(maxsize=256)
def step_kinds(S: int, N: int, dual: bool = False, code: str = "dit", weight: float | None = None) -> tuple[str, ...]:
    """Kind of each step in OUR order (s = 0 noisiest), decided once per step."""
    kinds, interval = [], None
    for s in range(S):
        step = _official_step(s, S, code)
        kind = _kind(step, S, N, interval, dual, code)
        if kind == FULL_STEP:
            interval = interval_after_full(N, step, S, code, weight)
        kinds.append(kind)
    return tuple(kinds)


def layer_kinds_official(S: int, N: int, L: int, dual: bool = False, code: str = "dit",
                         weight: float | None = None) -> list[list[str]]:
    """The literal official loop: the interval is updated inside the layer loop, so after a full
    layer 0 the remaining layers of the same step test `step % I_new` (see docs/baselines.md)."""
    rows, interval = [], None
    for s in range(S):
        step = _official_step(s, S, code)
        row = []
        for _ in range(L):
            kind = _kind(step, S, N, interval, dual, code)
            if kind == FULL_STEP:
                interval = interval_after_full(N, step, S, code, weight)
            row.append(kind)
        rows.append(row)
    return rows


def mlp_token_table(R: float, step_weight: float, layer_weight: float, S: int, L: int, num_tokens: int,
                    module_factor: float | None = None, code: str = "dit") -> np.ndarray:
    """Tokens the official code recomputes for a module of each (s, layer) at a partial step, [S, L].

    `fresh_ratio_scheduler` multiplies in double precision in this order; `cache_cutfresh`
    clamps into a float32 tensor and takes int(rate * N) in float32 (truncation). The module
    factor defaults to DiT-ToCa's MLP one."""
    s = np.arange(S, dtype=np.float64)
    step = (s if code == "pixart" else S - 1 - s)[:, None]
    layer = np.arange(L, dtype=np.float64)[None, :]
    step_factor = 1 + step_weight - 2 * step_weight * step / S
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / max(L - 1, 1)
    if module_factor is None:
        module_factor = 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT
    rate = np.clip(R * layer_factor * step_factor * module_factor, 0.0, 1.0).astype(np.float32)
    return (rate * np.float32(num_tokens)).astype(np.int64)


def _mlp_action(k: int, num_tokens: int) -> str:
    if k <= 0:
        return REUSE
    if k >= num_tokens:
        return FULL
    return prune(k / num_tokens)


def module_factors(code: str = "dit") -> dict[str, float]:
    """The modules a partial step refreshes token-wise, with their fresh-ratio factors."""
    return dict(PIXART_MODULE_FACTORS) if code == "pixart" else {"mlp": 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT}


def _check_modules(spec: ScheduleSpec, code: str = "dit") -> None:
    missing = [m for m in module_factors(code) if m not in spec.modules]
    if missing:
        raise UserError(f"this ToCa/DuCa setting refreshes {', '.join(module_factors(code))}; this model has "
                        f"{', '.join(spec.modules)}")


def build_steps(spec: ScheduleSpec, N: int, R: float, step_weight: float, layer_weight: float,
                dual: bool = False, layer_quirk: bool = False, code: str = "dit",
                interval_weight: float | None = None) -> list:
    """Schedule steps for ToCa (dual=False) or DuCa (dual=True)."""
    _check_modules(spec, code)
    if N < 2:
        raise UserError(f"ToCa/DuCa interval N must be at least 2, got {N}")
    S, L, n = spec.num_steps, spec.num_layers, spec.num_tokens
    if layer_quirk:
        kinds = layer_kinds_official(S, N, L, dual, code, interval_weight)
    else:
        kinds = [[k] * L for k in step_kinds(S, N, dual, code, interval_weight)]
    tables = {m: mlp_token_table(R, step_weight, layer_weight, S, L, n, f, code) for m, f in module_factors(code).items()}
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
                grid[l] = [_mlp_action(int(tables[m][s, l]), n) if m in tables else REUSE for m in spec.modules]
        steps.append(grid)
    return steps


def fast_flops(spec: ScheduleSpec, fm, N: int, R: float, step_weight: float, layer_weight: float,
               dual: bool = False, code: str = "dit", interval_weight: float | None = None) -> float:
    """schedule_flops(build_steps(...), fm, 1) without building the schedule (for the search).
    The refreshed modules are token-wise, so their cost is linear in the token count."""
    S, L, n = spec.num_steps, spec.num_layers, spec.num_tokens
    kinds = np.array(step_kinds(S, N, dual, code, interval_weight))
    partial = 0.0
    for m, f in module_factors(code).items():
        tokens = np.clip(mlp_token_table(R, step_weight, layer_weight, S, L, n, f, code)[kinds == PARTIAL_STEP], 0, n)
        partial += fm.module(m, 1, n) / n * float(tokens.sum())
    full_layer = sum(fm.module(m, 1, n) for m in spec.modules)
    computed = (kinds != AGGRESSIVE_STEP).sum()
    return (fm.condition(1) + S * (fm.embed(1) + fm.final(1)) + computed * L * fm.modulation(1)
            + (kinds == FULL_STEP).sum() * L * full_layer + partial)


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

    if spec.sampler == "rflow":  # Open-Sora's ToCa: its own per-module control flow
        from soda.policies import toca_video

        if layer_quirk:
            raise UserError("--toca-official-loop is DiT's layer-loop quirk; Open-Sora's ToCa has none")
        return toca_video.make("toca", spec, speedup, flops, N, R, step_weight=step_weight, layer_weight=layer_weight)
    p = published(spec)
    for key, value in (("N", N), ("R", R), ("step_weight", step_weight), ("layer_weight", layer_weight)):
        if value is not None:
            p[key] = value
    wt, wl = p["step_weight"], p["layer_weight"]
    code = p.get("code", "dit")

    def build(n_: int, r_: float) -> Schedule:
        sel, selector = selector_for(code, n_, BONUS_RATIO)
        return to_schedule(spec, "toca", build_steps(spec, n_, r_, wt, wl, False, layer_quirk, code), n_, r_, wt, wl,
                           sel, selector, code)

    if speedup is None:
        schedule = build(p["N"], p["R"])
        return scaling.record(schedule, spec, flops, None)
    if R is not None:
        raise UserError("give either a target --speedup or ToCa's R, not both (R is solved for the speedup)")
    if layer_quirk:
        raise UserError("layer_quirk reproduces the published setting only; it cannot be combined with --speedup")
    _check_modules(spec, code)
    cost = lambda fm, n_, r_: fast_flops(spec, fm, n_, r_, wt, wl, False, code)  # noqa: E731
    if N is not None:  # a tuned setting: N (and the weights) fixed, R fills the budget
        return scaling.fixed_interval(spec, "ToCa", build, cost, flops, speedup, N)
    return scaling.search_interval_ratio("ToCa", spec, build, cost, flops, speedup, p["R"])


def selector_for(code: str, N: int, dit_bonus: float, skip_steps=None) -> tuple[dict, str]:
    """(selector params, selector name) of the official code: DiT's self-attention score, or
    PixArt's cross-attention entropy with its 0.4 bonus on 4x4 grids."""
    sel = {"interval": N, "staleness_weight": STALENESS_WEIGHT}
    if code == "pixart":
        sel.update(bonus_ratio=PIXART_BONUS[0], grid=PIXART_BONUS[1])
        name = "toca-cross-entropy"
    else:
        sel["bonus_ratio"] = dit_bonus
        name = "toca-attention"
    if skip_steps is not None:
        sel["skip_steps"] = skip_steps
    return sel, name


def to_schedule(spec, policy, steps, N, R, wt, wl, selector_params, selector, code: str = "dit",
                interval_weight: float | None = None) -> Schedule:
    """The Schedule with ToCa/DuCa's parameters recorded in `params`."""
    from soda.policies.full import base_schedule

    if interval_weight is None:
        interval_weight = PIXART_INTERVAL_WEIGHT if code == "pixart" else INTERVAL_WEIGHT
    params = {
        "N": N, "R": R, "step_weight": wt, "layer_weight": wl, "interval_weight": interval_weight,
        **({"official_code": code} if code != "dit" else {}),
        **{f"module_factor_{m}": f for m, f in module_factors(code).items()},
        "token_count": "int(float32(clamp(r,0,1)) * num_tokens), stored as prune@(k/num_tokens)",
        "selector_params": selector_params,
    }
    return base_schedule(spec, policy, steps, selector, params)
