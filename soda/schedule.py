"""The Schedule: one action per (step, layer, module), as versioned JSON.

Actions: "full" (compute every token, refresh the cache), "reuse" (serve the cached pre-gate
output with the current gate), "prune@a" (recompute a fraction a of the tokens, take the rest
from the cache, write the recomputed ones back). A step may instead be "skip" (DuCa's
aggressive step: reuse the previous step's last-block tokens, re-apply only the final layer).

Format 2 adds forecasting (TaylorSeer): "forecast@O" serves a Taylor extrapolation of order O,
in sampler steps, from the module's last full computations instead of the frozen cache, and
"prune@a+forecast@O" recomputes a fraction a of the tokens on top of that forecast. Format-1
files still load (they cannot hold forecast actions).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from soda.errors import UserError
from soda.outputs import write_json_atomic  # noqa: F401  (lives in soda.outputs; importable from here too)

FORMAT = 2
SUPPORTED_FORMATS = (1, 2)  # 1: no forecast actions
FULL, REUSE, SKIP, PRUNE, FORECAST = "full", "reuse", "skip", "prune", "forecast"
MAX_ORDER = 4  # TaylorSeer's published DiT setting uses max_order 4


def prune(rate: float, order: int = 0) -> str:
    """prune@a, on top of a forecast of `order` when order > 0."""
    return f"prune@{rate:g}" + (f"+{forecast(order)}" if order else "")


def forecast(order: int) -> str:
    return f"forecast@{order}"


def kept_tokens(rate: float, num_tokens: int) -> int:
    """Tokens recomputed by prune@rate: round(rate * N), at least 1."""
    return max(1, int(round(rate * num_tokens)))


def parse_action(action: str) -> tuple[str, float]:
    """("full", 1.0) | ("reuse", 0.0) | ("forecast", 0.0) | ("prune", a), forecast base or not."""
    if action == FULL:
        return FULL, 1.0
    if action == REUSE:
        return REUSE, 0.0
    if action.startswith("forecast@"):
        forecast_order(action)
        return FORECAST, 0.0
    if action.startswith("prune@"):
        try:
            a = float(action[6:].split("+", 1)[0])
        except ValueError:
            raise UserError(f"unknown action {action!r}") from None
        if not 0.0 < a < 1.0:
            raise UserError(f"prune rate must be in (0, 1), got {action!r}")
        forecast_order(action)
        return PRUNE, a
    raise UserError(f"unknown action {action!r}")


def forecast_order(action: str) -> int:
    """Taylor order of an action's non-recomputed values: 0 for the frozen cache."""
    tail = action.split("+", 1)[1] if action.startswith("prune@") and "+" in action else action
    if not tail.startswith("forecast@"):
        return 0
    try:
        order = int(tail[9:])
    except ValueError:
        order = -1
    if not 1 <= order <= MAX_ORDER:
        raise UserError(f"forecast order must be an integer in 1..{MAX_ORDER}, got {action!r}")
    return order


@dataclass
class Schedule:
    policy: str
    model: str  # config name
    model_hash: str  # ModelConfig.hash(): architecture identity
    sampler: str
    num_steps: int
    modules: list[str]
    num_layers: int
    # steps[s] is "skip" or a list of layers, each a list of one action per module.
    steps: list = field(default_factory=list)
    selector: str = "none"
    params: dict = field(default_factory=dict)
    format: int = FORMAT

    # --- queries ------------------------------------------------------------------------------
    def is_skip(self, s: int) -> bool:
        return self.steps[s] == SKIP

    def action(self, s: int, layer: int, module: int) -> str:
        return self.steps[s][layer][module]

    def step_kind(self, s: int) -> str:
        """"full" (every action full), "skip", or "partial"."""
        if self.is_skip(s):
            return SKIP
        if all(a == FULL for row in self.steps[s] for a in row):
            return FULL
        return "partial"

    def count_kinds(self) -> dict[str, int]:
        out = {FULL: 0, "partial": 0, SKIP: 0}
        for s in range(self.num_steps):
            out[self.step_kind(s)] += 1
        return out

    def token_counts(self, num_tokens: int) -> list[int]:
        """N and every pruned k this schedule runs module graphs with, largest first: the counts
        export checks parity at and TensorRT builds one optimization profile for."""
        return sorted({num_tokens, *(kept_tokens(a, num_tokens) for a in self.prune_rates())}, reverse=True)

    def forecast_orders(self) -> list[list[int]]:
        """[L][M]: the highest forecast order each (layer, module) uses (0: none). A module
        forecast at order O keeps O arrays of its output's shape beyond the cache."""
        out = [[0] * len(self.modules) for _ in range(self.num_layers)]
        for step in self.steps:
            if step != SKIP:
                for l, row in enumerate(step):
                    for m, a in enumerate(row):
                        out[l][m] = max(out[l][m], forecast_order(a))
        return out

    def prune_rates(self) -> list[float]:
        rates = set()
        for s in range(self.num_steps):
            if not self.is_skip(s):
                rates.update(parse_action(a)[1] for row in self.steps[s] for a in row if a.startswith("prune@"))
        return sorted(rates)

    # --- validation and identity --------------------------------------------------------------
    def validate(self) -> "Schedule":
        if self.format not in SUPPORTED_FORMATS:
            raise UserError(f"schedule format {self.format} is not supported (expected one of {SUPPORTED_FORMATS})")
        if len(self.steps) != self.num_steps:
            raise UserError(f"schedule has {len(self.steps)} steps but says num_steps={self.num_steps}")
        if self.num_steps and self.step_kind(0) != FULL:
            raise UserError("step 0 of a schedule must compute everything (the cache starts empty)")
        seen_full = set()
        for s, step in enumerate(self.steps):
            if step == SKIP:
                continue
            if len(step) != self.num_layers or any(len(row) != len(self.modules) for row in step):
                raise UserError(f"step {s} is not a {self.num_layers} x {len(self.modules)} grid of actions")
            for l, row in enumerate(step):
                for m, a in enumerate(row):
                    kind, _ = parse_action(a)
                    if self.format < 2 and forecast_order(a):
                        raise UserError(f"step {s} layer {l}: {a} needs schedule format 2, the file says {self.format}")
                    if kind == FULL:
                        seen_full.add((l, m))
                    elif (l, m) not in seen_full:
                        raise UserError(f"step {s} layer {l} {self.modules[m]}: {a} before any full compute")
        return self

    def check_fits(self, model: str, model_hash: str, sampler: str, num_steps: int) -> None:
        """One clear error when a schedule is used with a model or sampler it was not made for."""
        if self.model_hash != model_hash:
            raise UserError(f"schedule was made for model {self.model} ({self.model_hash}), not {model} ({model_hash})")
        if self.num_steps != num_steps or self.sampler != sampler:
            raise UserError(
                f"schedule was made for {self.sampler}-{self.num_steps}, not {sampler}-{num_steps}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict) or d.get("format") not in SUPPORTED_FORMATS:
            raise UserError(f"not a schedule of format {' or '.join(map(str, SUPPORTED_FORMATS))} "
                            f"(got format {d.get('format') if isinstance(d, dict) else None})")
        from dataclasses import MISSING, fields

        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        extra, missing = sorted(set(d) - known), sorted(required - set(d))
        if extra or missing:
            said = [f"unexpected {', '.join(extra)}"] if extra else []
            said += [f"missing {', '.join(missing)}"] if missing else []
            raise UserError(f"not a schedule ({'; '.join(said)})")
        try:
            return cls(**d).validate()
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"malformed schedule: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        data = read_json(path, "schedule")
        if isinstance(data, dict) and "E_c" in data:
            raise UserError(f"{path} is a sensitivity profile, not a schedule; make a schedule from it with "
                            f"`cli.py schedule --profile {path} --speedup X`, or pass it as --profile")
        try:
            return cls.from_dict(data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None


def full_grid(num_layers: int, num_modules: int) -> list[list[str]]:
    return [[FULL] * num_modules for _ in range(num_layers)]


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
