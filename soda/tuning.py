"""Tune a baseline's free parameters on calibration seeds, by the bench's own fidelity.

SODA chooses its anchors and lambda on calibration data (its profile); a fair comparison gives
every baseline the same chance. Each baseline declares its search space ONCE, in `SPACES`:
the coarse grid of its `make_schedule` keywords (everything but the speedup). The budget knob
that makes a setting land in the window [target, 1.03 target] is solved by the policy itself
(FORA: the anchor count; ToCa/DuCa: the fresh ratio R, by bisection), so every candidate runs
at the same FLOPs as every other policy. A new baseline (e.g. `taylorseer`) is tuned the same
way by adding one entry here.

The procedure, identical for every policy:
1. candidates: the published rule's own setting (so tuned can only match or beat the rule on
   calibration), then every point of the coarse grid; a point that cannot reach the window is
   dropped (counted in `tried`, not in `evaluated`);
2. refine around the best coarse point: for each numeric parameter the midpoints to its grid
   neighbours (integers rounded, values already tried skipped), for each other parameter its
   other values, at most REFINE new points;
3. every distinct schedule among them is scored once by `evaluate(schedule)`: the bench runs it
   on the calibration set (`soda.seeds` calibration stream, never an evaluation seed) and returns
   PSNR against full compute on the same set; the highest wins (ties: first built).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from soda.errors import UserError

REFINE = 4


@dataclass(frozen=True)
class Space:
    """A policy's coarse grid: parameter -> values in increasing order (numbers) or choices."""

    grid: dict

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]

    def refine(self, best: dict, tried: list[dict]) -> list[dict]:
        out = []
        for key, values in self.grid.items():
            moves = []
            v = best.get(key)
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)
            if numeric and isinstance(v, (int, float)):
                line = sorted(set(values) | {v})  # the best may be off the grid (the rule's own setting)
                i = line.index(v)
                for j in (i - 1, i + 1):
                    if 0 <= j < len(line):
                        mid = (v + line[j]) / 2
                        if all(isinstance(x, int) for x in values):
                            mid = int(round(mid))
                        if mid != v:
                            moves.append(mid)
            elif not numeric:
                moves = [x for x in values if x != v]
            for m in moves:
                p = {**best, key: m}
                if p not in tried and p not in out:
                    out.append(p)
        return out[:REFINE]


# One place per baseline. Grids are sized so every policy gets 16 coarse points (+ its rule
# setting + up to REFINE refinements): the same tuning effort for each.
SPACES: dict[str, Space] = {
    "fora": Space({"warp": (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0), "end": (True, False)}),
    "toca": Space({"N": (2, 4, 7, 12), "step_weight": (0.0, 2.0), "layer_weight": (-0.2, 0.8)}),
    "duca": Space({"N": (2, 4, 7, 12), "step_weight": (0.0, 2.0), "layer_weight": (-0.2, 0.8)}),
    "taylorseer": Space({"order": (1, 2, 3, 4), "warp": (0.7, 1.0, 1.5, 2.0)}),
}


@dataclass
class Tuned:
    policy: str
    target: float
    params: dict  # the winning setting (rule setting: {})
    schedule: object
    calibration_psnr: float
    tried: int = 0  # settings built
    evaluated: int = 0  # distinct schedules scored on the calibration set
    seconds: float = 0.0
    log: list = field(default_factory=list)  # [(params, calibration PSNR or None)]

    def summary(self) -> dict:
        return {"params": self.params, "calibration_psnr_db": round(self.calibration_psnr, 4), "tried": self.tried,
                "evaluated": self.evaluated, "seconds": round(self.seconds, 2),
                "schedule_params": {k: v for k, v in self.schedule.params.items() if k not in ("anchors", "selector_params")}}


def tunable(policy: str) -> bool:
    return policy in SPACES


def _key(schedule) -> str:
    """Two settings that build the same schedule are the same candidate."""
    return json.dumps([schedule.steps, schedule.selector, schedule.params.get("selector_params")], sort_keys=True)


def tune(policy: str, build: Callable[..., object], evaluate: Callable[[object], float], target: float,
         progress: Callable | None = None) -> Tuned:
    """Best setting of `policy` at `target`: `build(**params)` makes a schedule at the target (it
    raises UserError when the setting cannot reach the window), `evaluate(schedule)` scores it."""
    if policy not in SPACES:
        raise UserError(f"no tuning space declared for {policy!r} (soda.tuning.SPACES)")
    space = SPACES[policy]
    t0 = time.perf_counter()
    scores: dict[str, float] = {}
    result = Tuned(policy, target, {}, None, float("-inf"))
    bar = progress(f"tune {policy} {target:g}x", 1 + len(space.points()) + REFINE) if progress else None

    def consider(params: dict) -> None:
        result.tried += 1
        try:
            sched = build(**params)
        except UserError:
            result.log.append((params, None))
            return
        key = _key(sched)
        if key not in scores:
            scores[key] = float(evaluate(sched))
            result.evaluated += 1
        score = scores[key]
        result.log.append((params, score))
        if score > result.calibration_psnr:
            result.params, result.schedule, result.calibration_psnr = params, sched, score

    try:
        tried = []
        for params in [{}] + space.points():
            consider(params)
            tried.append(params)
            if bar is not None:
                bar.update()
        if result.schedule is None:
            raise UserError(f"{policy}: no setting reaches {target:g}x FLOPs within the window")
        start = result.params or {k: v for k, v in result.schedule.params.items() if k in space.grid}
        for params in space.refine(start, tried):
            consider(params)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result
