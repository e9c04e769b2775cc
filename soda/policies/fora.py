"""FORA (prathebaselva/FORA): full compute every N steps, every attn/MLP output reused in between.

Official rule ('boost_infer_static'): a step computes everything when `step == S-1` or
`step % N == 0`, with `step` counting down (step = S-1-s); on the other steps every layer adds
its cached attn and MLP outputs with the current adaLN gates. Published: N = 3 for DDIM-50
(18 full steps), N = 4 for DDPM-250 (64 full steps).

Scaled to a target FLOPs speedup, FORA keeps its nature (whole-step reuse) but its anchors are
N_s steps spread as evenly as possible, s_i = floor(i*S/N_s) (step 0 always an anchor), with N_s
the count whose speedup is nearest the target (round(S/speedup) up to the per-step overhead of
embedding, modulation and final layer).
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


def steps_for(spec: ScheduleSpec, anchors: list[int]) -> list:
    L, M = spec.num_layers, len(spec.modules)
    anchor_set = set(anchors)
    return [full_grid(L, M) if s in anchor_set else [[REUSE] * M for _ in range(L)] for s in range(spec.num_steps)]


def make(spec: ScheduleSpec, speedup: float | None = None, flops=None, N: int | None = None) -> Schedule:
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
        anchors = even_anchors(S, count)
        return base_schedule(spec, "fora", steps_for(spec, anchors), "none", {"anchor_count": count, "anchors": anchors})

    hi = scaling.speedup_of(build(1), spec, fm)
    if speedup > hi * (1 + scaling.TOLERANCE):
        raise scaling.out_of_reach("FORA", speedup, 1.0, hi)
    # Speedup falls as anchors are added; the nearest count is next to round(S / speedup).
    guess = max(1, min(S, round(S / speedup)))
    counts = range(max(1, guess - 3), min(S, guess + 3) + 1)
    best = min(counts, key=lambda c: (abs(scaling.speedup_of(build(c), spec, fm) - speedup), -c))
    return scaling.record(build(best), spec, fm, speedup)
