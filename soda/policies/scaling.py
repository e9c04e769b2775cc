"""Scale a baseline to a target FLOPs speedup, so every policy is compared at equal compute.

Speedup = FLOPs of the full schedule / FLOPs of the policy's schedule, both counted by
`soda.flops.schedule_flops` (the executor's own accounting). The ratio does not depend on the
batch size (every term is linear in it), so batch 1 is used.

The FLOPs model comes from the `flops` argument when given, else from the registered config of
`spec.model` (checked against `spec.model_hash`, trying the input size implied by the token
count for non-default resolutions).
"""
from __future__ import annotations

import math
from typing import Callable

from soda.errors import UserError
from soda.flops import FlopsModel, schedule_flops
from soda.policies import ScheduleSpec
from soda.schedule import Schedule

TOLERANCE = 0.03  # every policy lands in [target, (1 + TOLERANCE) * target]
R_STEP = 0.001  # grid of ToCa/DuCa's fresh ratio R
R_MAX = 8.0  # beyond this every partial MLP rate is clamped at 1 for the published weights
INTERVALS = range(2, 17)  # ToCa/DuCa's N searched


def flops_model(spec: ScheduleSpec, flops: FlopsModel | None = None) -> FlopsModel | None:
    """The FLOPs model for `spec`, or None when it cannot be inferred from the registry."""
    if flops is not None:
        return flops
    from soda.models.config import REGISTRY, get_config

    if spec.model not in REGISTRY:
        return None
    cfg = get_config(spec.model)
    if cfg.hash() != spec.model_hash:
        side = math.isqrt(spec.num_tokens) * cfg.patch_size
        cfg = get_config(spec.model, input_size=side)
        if cfg.hash() != spec.model_hash:
            return None
    return FlopsModel.for_config(cfg)


def require_flops_model(spec: ScheduleSpec, flops: FlopsModel | None) -> FlopsModel:
    fm = flops_model(spec, flops)
    if fm is None:
        raise UserError(f"cannot infer the FLOPs model of {spec.model} ({spec.model_hash}) to scale to a speedup")
    return fm


def speedup_of(schedule: Schedule, spec: ScheduleSpec, fm: FlopsModel) -> float:
    from soda.policies.full import full_schedule

    return schedule_flops(full_schedule(spec), fm, 1) / schedule_flops(schedule, fm, 1)


def record(schedule: Schedule, spec: ScheduleSpec, flops: FlopsModel | None, target: float | None) -> Schedule:
    """Write target and achieved speedup into schedule.params (achieved None if no FLOPs model)."""
    fm = flops_model(spec, flops)
    schedule.params["target_speedup"] = target
    schedule.params["achieved_speedup"] = None if fm is None else round(speedup_of(schedule, spec, fm), 6)
    return schedule


def check_target(policy: str, target: float) -> None:
    if not (isinstance(target, (int, float)) and math.isfinite(target)) or target < 1.0:
        raise UserError(f"{policy}: --speedup must be a number >= 1, got {target}")


def out_of_reach(policy: str, target: float, lo: float, hi: float) -> UserError:
    return UserError(f"{policy} cannot reach a {target:g}x FLOPs speedup on this model and sampler "
                     f"(reachable: {lo:.2f}x to {hi:.2f}x)")


def in_window(speedup: float, target: float) -> bool:
    """The bench's tolerance, the same for every policy: target <= speedup <= (1 + TOLERANCE) target."""
    return target * (1 - 1e-9) <= speedup <= target * (1 + TOLERANCE) * (1 + 1e-9)


def ratio_for_target(spec: ScheduleSpec, cost: Callable[[FlopsModel, int, float], float], fm: FlopsModel,
                     N: int, target: float) -> float | None:
    """For interval N, the largest R on the 0.001 grid whose speedup still reaches `target`
    (bisection: speedup falls as R grows), or None when no R puts N inside the window."""
    from soda.policies.full import full_schedule

    full = schedule_flops(full_schedule(spec), fm, 1)
    speed = _memo(lambda j: full / cost(fm, N, j * R_STEP))
    j_hi = int(round(R_MAX / R_STEP))
    if speed(0) < target * (1 - 1e-9):
        return None
    if speed(j_hi) >= target:
        j = j_hi
    else:  # invariant: speed(lo) >= target > speed(hi)
        lo, hi = 0, j_hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if speed(mid) >= target else (lo, mid)
        j = lo
    return round(j * R_STEP, 6) if in_window(speed(j), target) else None


def search_interval_ratio(policy: str, spec: ScheduleSpec, build: Callable[[int, float], Schedule],
                          cost: Callable[[FlopsModel, int, float], float], flops: FlopsModel | None,
                          target: float, R_pub: float) -> Schedule:
    """ToCa/DuCa at a target speedup by the published rule, scaled.

    For each interval N in 2..16, bisection over R on a 0.001 grid (speedup falls as R grows)
    finds the largest R whose speedup still reaches the target; among the (N, R) inside the
    window [target, 1.03 target], the one whose R is nearest the published R (ratio scale) wins,
    so the method keeps its token-refresh share and moves its interval. `cost(fm, N, R)` must
    equal schedule_flops of build(N, R).
    """
    check_target(policy, target)
    fm = require_flops_model(spec, flops)
    from soda.policies.full import full_schedule

    full = schedule_flops(full_schedule(spec), fm, 1)
    candidates, lo_all, hi_all = [], math.inf, 0.0
    for N in INTERVALS:
        if N > max(spec.num_steps, 2):
            break
        lo_all = min(lo_all, full / cost(fm, N, R_MAX))
        hi_all = max(hi_all, full / cost(fm, N, 0.0))
        R = ratio_for_target(spec, cost, fm, N, target)
        if R is not None:
            candidates.append((round(abs(math.log(max(R, R_STEP / 2) / R_pub)), 9), N, R))
    if not candidates:
        raise out_of_reach(policy, target, lo_all, hi_all)
    _, N, R = min(candidates)
    return record(build(N, R), spec, fm, target)


def fixed_interval(spec: ScheduleSpec, policy: str, build: Callable[[int, float], Schedule],
                   cost: Callable[[FlopsModel, int, float], float], flops: FlopsModel | None, target: float,
                   N: int) -> Schedule:
    """ToCa/DuCa with interval N fixed (a tuned setting): R solved so the speedup is in the window."""
    check_target(policy, target)
    fm = require_flops_model(spec, flops)
    if not isinstance(N, int) or N < 2:
        raise UserError(f"{policy} interval N must be an integer >= 2, got {N}")
    R = ratio_for_target(spec, cost, fm, N, target)
    if R is None:
        raise UserError(f"{policy} with N={N} cannot land in [{target:g}x, {target * (1 + TOLERANCE):.3g}x] FLOPs")
    return record(build(N, R), spec, fm, target)


def _memo(fn):
    cache: dict = {}

    def wrapped(j):
        if j not in cache:
            cache[j] = fn(j)
        return cache[j]

    return wrapped
