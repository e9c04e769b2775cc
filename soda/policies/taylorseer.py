"""TaylorSeer (Shenyi-Z/TaylorSeer, TaylorSeer-DiT): full steps on a fixed interval, Taylor forecasts between.

Official rule (`cal_type`, `step` counting down from S-1): the first `first_enhance` = 2 steps
are full, then a full step whenever `cache_counter == interval - 1` (the counter resets at every
full step), so full steps are s = 0, 1, 1 + N, 1 + 2N, ... in our order. Every other step serves
each layer's attn and MLP output as a Taylor forecast of order `max_order` from the finite
differences of the last full steps (soda/forecast.py). Published DiT setting (TaylorSeer-DiT.md,
DDIM-50): interval 4, max_order 4 -> 14 full steps, 3.57x.

Scaled to a target FLOPs speedup it keeps its nature (two first full steps, one fixed order, a
fixed interval after them): the remaining anchors are spread over steps 1..S-1 by FORA's
placement (soda/policies/fora.py; `warp` 1 = even, the last anchor at S-1 as the official rule
ends), their count the most whose speedup still reaches the target, as FORA is scaled. The bench
tunes `order` and `warp` on calibration data like every baseline (soda/tuning.py).
"""
from __future__ import annotations

from soda.errors import UserError
from soda.policies import ScheduleSpec
from soda.schedule import MAX_ORDER, Schedule, forecast, full_grid

PUBLISHED = {"interval": 4, "order": 4}  # TaylorSeer-DiT.md: DDIM-50, --interval 4 --max-order 4
FIRST_ENHANCE = 2  # cache_init: cache_dic['first_enhance']


def official_full_steps(S: int, N: int) -> list[int]:
    """Full steps of `cal_type` in our order (s = S-1-step)."""
    if N < 1:
        raise UserError(f"TaylorSeer interval N must be at least 1, got {N}")
    full, counter = [], 0
    for step in range(S - 1, -1, -1):
        if step > S - FIRST_ENHANCE - 1 or counter == N - 1:
            counter = 0
            full.append(S - 1 - step)
        else:
            counter += 1
    return full


def scaled_full_steps(S: int, count: int, warp: float = 1.0) -> list[int]:
    """Step 0, then `count` - 1 anchors from step 1 to S-1 placed like FORA's (first_enhance = 2 kept)."""
    from soda.policies.fora import placement

    if not 1 <= count <= S:
        raise UserError(f"TaylorSeer needs 1..{S} full steps, got {count}")
    return [0] if count == 1 else [0, *(1 + p for p in placement(S - 1, count - 1, warp, True))]


def steps_for(spec: ScheduleSpec, full_steps: list[int], order: int) -> list:
    L, M = spec.num_layers, len(spec.modules)
    full = set(full_steps)
    return [full_grid(L, M) if s in full else [[forecast(order)] * M for _ in range(L)] for s in range(spec.num_steps)]


def make(spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None,
         order: int | None = None, warp: float = 1.0) -> Schedule:
    from soda.policies import scaling
    from soda.policies.full import base_schedule

    order = PUBLISHED["order"] if order is None else order
    if not (isinstance(order, int) and 1 <= order <= MAX_ORDER):
        raise UserError(f"TaylorSeer order must be an integer in 1..{MAX_ORDER}, got {order}")
    S = spec.num_steps

    def build(full_steps: list[int], params: dict) -> Schedule:
        return base_schedule(spec, "taylorseer", steps_for(spec, full_steps, order), "none",
                             {**params, "order": order, "first_enhance": FIRST_ENHANCE, "full_steps": full_steps})

    if speedup is None:
        N = PUBLISHED["interval"] if N is None else N
        return _memory(scaling.record(build(official_full_steps(S, N), {"N": N}), spec, flops, None), spec, flops)
    if N is not None:
        raise UserError("give either a target --speedup or TaylorSeer's N, not both")
    scaling.check_target("TaylorSeer", speedup)
    fm = scaling.require_flops_model(spec, flops)
    by_count = lambda c: build(scaled_full_steps(S, c, warp), {"anchor_count": c, "warp": warp})  # noqa: E731
    hi = scaling.speedup_of(by_count(1), spec, fm)
    if speedup > hi * (1 + scaling.TOLERANCE):
        raise scaling.out_of_reach("TaylorSeer", speedup, 1.0, hi)
    # Speedup falls as anchors are added (placement does not change the count's FLOPs).
    ok = [c for c in range(1, S + 1) if scaling.speedup_of(by_count(c), spec, fm) >= speedup * (1 - 1e-9)]
    schedule = scaling.record(by_count(max(ok) if ok else 1), spec, fm, speedup)
    schedule.params["in_window"] = scaling.in_window(schedule.params["achieved_speedup"], speedup)
    return _memory(schedule, spec, fm)


def _memory(schedule: Schedule, spec: ScheduleSpec, flops) -> Schedule:
    """Record the forecast factors' extra memory (needs the hidden size, from the FLOPs model)."""
    from soda.forecast import forecast_cache
    from soda.policies import scaling

    fm = scaling.flops_model(spec, flops)
    if fm is not None:
        schedule.params["forecast_cache"] = forecast_cache(schedule.forecast_orders(), fm.num_tokens, fm.hidden)
    return schedule
