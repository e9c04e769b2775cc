"""FORA (prathebaselva/FORA): full compute every N steps, every attn/MLP output reused in between.

Official rule ('boost_infer_static'): a step computes everything when `step == S-1` or
`step % N == 0`, with `step` counting down (step = S-1-s); on the other steps every layer adds
its cached attn and MLP outputs with the current adaLN gates. Published: N = 3 for DDIM-50
(18 full steps), N = 4 for DDPM-250 (64 full steps).

Scaled to a target FLOPs speedup (the "rule" row of the bench), FORA keeps its nature (whole-step
reuse) and the official rule's shape: N_s anchors spread evenly from step 0 to the final step
S-1 (the official rule always computes the final step), with N_s the largest count whose speedup
still reaches the target. Anchors are whole steps, so on a short schedule no count may land in
the bench's window [target, 1.03 target]; then the nearest count above the target is used and
the schedule says so (`params["in_window"]`).

Tuned placement (`placement(S, count, warp, end)`): s_i = round((S-1) * (i/(N_s-1))^warp) when
`end` (the final step an anchor), s_i = floor(S * (i/N_s)^warp) otherwise; warp > 1 crowds the
anchors toward the noisy first steps, warp < 1 toward the last ones.
"""
from __future__ import annotations

from soda.errors import UserError
from soda.policies import ScheduleSpec
from soda.schedule import REUSE, Schedule, full_grid

PUBLISHED_N = {"ddim": 3, "ddpm": 4}


def official_anchors(S: int, N: int) -> list[int]:
    """Full steps of the official rule, in our order (s = 0 noisiest)."""
    if N < 1:
        raise UserError(f"FORA interval N must be at least 1, got {N}")
    return [s for s in range(S) if s == 0 or (S - 1 - s) % N == 0]  # step = S-1-s


def even_anchors(S: int, count: int) -> list[int]:
    """`count` anchors spread as evenly as possible over S steps, step 0 first."""
    return sorted({(i * S) // count for i in range(count)})


def placement(S: int, count: int, warp: float = 1.0, end: bool = True) -> list[int]:
    """`count` distinct anchors, step 0 first, spread by `warp`, the last at S-1 when `end`."""
    if not 1 <= count <= S:
        raise UserError(f"FORA needs 1..{S} anchors, got {count}")
    if warp <= 0:
        raise UserError(f"FORA warp must be positive, got {warp}")
    if count == 1:
        return [0]
    if end:
        raw = [int(round((S - 1) * (i / (count - 1)) ** warp)) for i in range(count)]
    else:
        raw = [int((S * (i / count) ** warp) // 1) for i in range(count)]
    out = []
    for i, s in enumerate(raw):  # distinct and in range: push forward, then back from the end
        out.append(max(s, out[-1] + 1) if out else 0)
    for i in range(count - 1, 0, -1):
        out[i] = min(out[i], S - (count - i))
        out[i - 1] = min(out[i - 1], out[i] - 1)
    return out


def steps_for(spec: ScheduleSpec, anchors: list[int]) -> list:
    L, M = spec.num_layers, len(spec.modules)
    anchor_set = set(anchors)
    return [full_grid(L, M) if s in anchor_set else [[REUSE] * M for _ in range(L)] for s in range(spec.num_steps)]


def make(spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None,
         warp: float = 1.0, end: bool = True) -> Schedule:
    from soda.policies import scaling
    from soda.policies.full import base_schedule

    S = spec.num_steps
    if speedup is None:
        N = N if N is not None else PUBLISHED_N.get(spec.sampler, 3)
        anchors = official_anchors(S, N)
        schedule = base_schedule(spec, "fora", steps_for(spec, anchors), "none", {"N": N, "anchors": anchors})
        return scaling.record(schedule, spec, flops, None)
    if N is not None:
        raise UserError("give either a target --speedup or FORA's N, not both")
    scaling.check_target("FORA", speedup)
    fm = scaling.require_flops_model(spec, flops)

    def build(count: int) -> Schedule:
        anchors = placement(S, count, warp, end)
        return base_schedule(spec, "fora", steps_for(spec, anchors), "none",
                             {"anchor_count": count, "anchors": anchors, "warp": warp, "end": end})

    hi = scaling.speedup_of(build(1), spec, fm)
    if speedup > hi * (1 + 1e-9):  # one anchor is the fastest FORA: a target above it is not reached
        raise scaling.out_of_reach("FORA", speedup, 1.0, hi)
    # Every count with the same number of anchors costs the same; speedup falls as anchors are added.
    count = anchor_count(spec, fm, speedup)
    schedule = scaling.record(build(count), spec, fm, speedup)
    schedule.params["in_window"] = scaling.in_window(schedule.params["achieved_speedup"], speedup)
    return schedule


def anchor_count(spec: ScheduleSpec, fm, target: float) -> int:
    """The most anchors whose speedup still reaches `target` (1 if even one anchor is too slow)."""
    from soda.policies import scaling
    from soda.policies.full import base_schedule

    S = spec.num_steps
    speed = lambda c: scaling.speedup_of(base_schedule(spec, "fora", steps_for(spec, even_anchors(S, c))), spec, fm)  # noqa: E731
    ok = [c for c in range(1, S + 1) if speed(c) >= target * (1 - 1e-9)]
    return max(ok) if ok else 1
