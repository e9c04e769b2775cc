"""Full compute: every step, layer and module computed. The reference for every fidelity number."""
from __future__ import annotations

from soda.policies import ScheduleSpec
from soda.schedule import Schedule, full_grid


def base_schedule(spec: ScheduleSpec, policy: str, steps: list, selector: str = "none", params: dict | None = None) -> Schedule:
    return Schedule(
        policy=policy, model=spec.model, model_hash=spec.model_hash, sampler=spec.sampler,
        num_steps=spec.num_steps, modules=list(spec.modules), num_layers=spec.num_layers,
        steps=steps, selector=selector, params=params or {},
    ).validate()


def full_schedule(spec: ScheduleSpec) -> Schedule:
    return base_schedule(spec, "full", [full_grid(spec.num_layers, len(spec.modules)) for _ in range(spec.num_steps)])
