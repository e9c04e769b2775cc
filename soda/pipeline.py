"""From user flags to a Schedule: a file, or a policy (profiling first for SODA when needed)."""
from __future__ import annotations

from soda.errors import UserError
from soda.policies import POLICIES, ScheduleSpec, make_schedule
from soda.schedule import Schedule


def resolve_schedule(model, weights: str, sampler, policy: str, schedule_file=None, speedup=None,
                     profile_file=None, echo=print) -> Schedule:
    config = model.config
    spec = ScheduleSpec.for_model(config, sampler.kind, sampler.steps, tuple(model.blocks[0].modules_order))
    if schedule_file:
        schedule = Schedule.load(schedule_file)
        schedule.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
        return schedule
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if policy == "full":
        return make_schedule("full", spec)
    raise UserError(f"policy {policy!r} is not available yet")
