"""bench: every policy on the same noise and labels, against full compute, at equal FLOPs.

Fidelity is measured against the full model's samples from the same initial noise (PSNR and
cosine, `soda.metrics`); for `dit-digits` the digit classifier adds accuracy on the requested
labels and a Frechet distance to held-out real digits. Wall speedup is measured in the same
run against full compute on the same backend, the two timed back to back on the first batch
(so the drifting load of a shared machine cancels). The backend is pluggable: `backend_for("torch",
...)` is the PyTorch reference; `"ort"` runs an exported engines folder through the runtime's
`make_backend` (imported lazily, so bench works without the runtime package).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from soda.errors import UserError

FORMAT = 1
BACKENDS = ("torch", "ort")
FIELDS = ("policy", "flops_speedup", "wall_speedup", "psnr_db", "cosine", "class_accuracy", "frechet")


def backend_for(kind: str, model, engines_dir: str | None = None):
    """The backend the bench runs: "torch" (the reference) or "ort" (an exported engines folder,
    opened by the runtime's own `make_backend`, so bench measures exactly what `run` runs)."""
    if kind == "torch":
        from soda.torch_backend import TorchBackend

        return TorchBackend(model)
    if kind == "ort":
        if not engines_dir:
            raise UserError("--backend ort needs --engines DIR (made by `cli.py export`)")
        try:
            from runtime.engines import open_engines
            from runtime.run import make_backend
        except ImportError as e:
            raise UserError(f"--backend ort needs the runtime package ({e})") from None
        engines = open_engines(engines_dir)
        if engines.config.hash() != model.config.hash():
            raise UserError(f"{engines_dir} was exported from {engines.config.name}, not {model.config.name}")
        return make_backend(engines, "ort")
    raise UserError(f"unknown backend {kind!r}; choose one of: {', '.join(BACKENDS)}")


@dataclass
class BenchSetup:
    policies: list[str]
    speedup: float
    samples: int = 100
    seed: int = 0
    frontier: list[float] = field(default_factory=list)
    backend: str = "torch"
    engines_dir: str | None = None
    profile_file: str | None = None
    profile_samples: int = 32
    batch_size: int = 50
    timing_images: int = 2  # --backend ort: images for the interleaved runtime timing
    timing_repeats: int = 3
    keep_samples: int = 0  # > 0: report["kept_samples"] = {policy: first n samples at `speedup`} (arrays, not JSON)


def parse_policies(text: str) -> list[str]:
    from soda.policies import POLICIES

    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise UserError("--policies is empty")
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise UserError(f"unknown policy {', '.join(bad)}; choose from: {', '.join(POLICIES)}")
    return names


def parse_speedups(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--frontier must be comma-separated numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"--frontier speedups must be at least 1, got {text}")
    return values


class Runner:
    """Runs schedules in batches over fixed noise and labels; the full run is the reference."""

    def __init__(self, backend, model, sampler, setup: BenchSetup, progress: Callable | None = None):
        from soda.sampling import initial_noise

        self.backend, self.model, self.sampler, self.setup = backend, model, sampler, setup
        cfg = model.config
        self.labels = np.arange(setup.samples) % cfg.num_classes
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.noise, _ = initial_noise(setup.samples, shape, setup.seed)
        self.progress = progress

    def time_first_batch(self, schedule) -> float:
        """Seconds for `schedule` on the first batch alone (for back-to-back wall comparisons)."""
        from soda.generate import generate

        sl = slice(0, self.setup.batch_size)
        _, stats = generate(self.backend, self.model.config, self.sampler, schedule, self.labels[sl], self.setup.seed,
                            self.noise[sl])
        return stats.seconds

    def run(self, schedule, desc: str) -> tuple[np.ndarray, float, float]:
        """(samples, FLOPs, seconds) for `schedule` over all bench samples."""
        from soda.generate import generate

        outs, flops, seconds = [], 0.0, 0.0
        bs = self.setup.batch_size
        steps = self.sampler.steps * math.ceil(self.setup.samples / bs)
        tick = self.progress(desc, steps) if self.progress else None
        try:
            for c, start in enumerate(range(0, self.setup.samples, bs)):
                sl = slice(start, start + bs)
                x, stats = generate(self.backend, self.model.config, self.sampler, schedule, self.labels[sl],
                                    self.setup.seed + c, self.noise[sl], tick and (lambda s: tick.update()))
                outs.append(x)
                flops += stats.flops
                seconds += stats.seconds
        finally:
            if tick is not None:
                tick.close()
        return np.concatenate(outs), flops, seconds


def _scores(model_name: str, echo):
    """(metrics module, classifier or None)."""
    try:
        from soda import metrics
    except ImportError:
        raise UserError("bench needs soda/metrics.py (psnr, cosine), which this checkout lacks") from None
    classifier = None
    if model_name == "dit-digits":
        try:
            from soda.digits.classifier import DigitClassifier

            classifier = DigitClassifier.load_default()
        except (ImportError, UserError, FileNotFoundError) as e:
            echo(f"note: no digit classifier ({e}); accuracy and Frechet are null")
    return metrics, classifier


def bench(model, weights: str, sampler, setup: BenchSetup, echo: Callable = print,
          progress: Callable | None = None) -> dict:
    """All policies at `setup.speedup` (plus the frontier speedups) -> the bench report dict."""
    from soda.pipeline import load_or_profile, resolve_schedule

    config = model.config
    metrics, classifier = _scores(config.name, echo)
    backend = backend_for(setup.backend, model, setup.engines_dir)
    runner = Runner(backend, model, sampler, setup, progress)
    prof = None
    if "soda" in setup.policies:
        # Calibration seeds stay clear of the evaluation noise (seed + 10000).
        prof = load_or_profile(model, weights, sampler, setup.profile_file, echo, setup.profile_samples,
                               seed=setup.seed + 10_000, progress=progress)

    full_schedule = resolve_schedule(model, weights, sampler, "full")
    full_x, full_flops, full_seconds = runner.run(full_schedule, "full")

    kept: dict[str, np.ndarray] = {}
    main_schedules = {"full": full_schedule}  # what the --backend ort runtime timing replays

    def measure(policy: str, target: float | None) -> dict | None:
        if policy == "full":
            x, flops, seconds = full_x, full_flops, full_seconds
            wall = 1.0
        else:
            try:
                sched = resolve_schedule(model, weights, sampler, policy, speedup=target, profile_file=prof, echo=echo)
            except UserError as e:
                echo(f"skipped {policy} at {target}x: {e}")
                return None
            # Wall speedup: full and this policy timed back to back on the first batch, so the
            # drifting load of a shared machine cancels out.
            wall = runner.time_first_batch(full_schedule) / runner.time_first_batch(sched)
            x, flops, seconds = runner.run(sched, f"{policy} {target}x")
        if target == setup.speedup and policy != "full":
            main_schedules[policy] = sched
        if setup.keep_samples > 0 and target == setup.speedup:
            kept[policy] = x[:setup.keep_samples]
        images = np.clip(x, -1, 1)
        # Pixel models are judged on what a person sees (clipped to [-1, 1]); latents as they are.
        pixels = config.in_channels in (1, 3)
        view, ref = (images, np.clip(full_x, -1, 1)) if pixels else (x, full_x)
        row = {
            "policy": policy,
            "target_speedup": None if policy == "full" else target,
            "flops_speedup": round(full_flops / flops, 4),
            "wall_speedup": round(wall, 4),
            "psnr_db": None if policy == "full" else round(float(metrics.psnr(view, ref)), 4),
            "cosine": round(float(metrics.cosine(view, ref)), 6),
            "class_accuracy": None if classifier is None else round(float(classifier.accuracy(images, runner.labels)), 4),
            "frechet": None if classifier is None else round(float(classifier.frechet(images)), 4),
            "seconds": round(seconds, 3),
        }
        return row

    results = [r for p in setup.policies if (r := measure(p, setup.speedup)) is not None]
    if len(results) == 1 and len(setup.policies) > 1:
        raise UserError(f"no policy reaches {setup.speedup:g}x FLOPs on {config.name}; lower --speedup")
    frontier = []
    for target in setup.frontier:
        for p in setup.policies:
            if p == "full":
                continue
            same = next((r for r in results if r["policy"] == p and r["target_speedup"] == target), None)
            row = same or measure(p, target)
            if row is not None:
                frontier.append(row)
    report = {
        "format": FORMAT,
        "model": config.name,
        "weights": weights,
        "sampler": sampler.to_dict(),
        "samples": setup.samples,
        "seed": setup.seed,
        "backend": getattr(backend, "describe", lambda: setup.backend)(),
        "speedup": setup.speedup,
        "profile": None if prof is None else {"samples": prof.samples, "seconds": prof.cost.get("seconds"),
                                              "weights": prof.weights},
        "results": results,
        "frontier": frontier,
    }
    if setup.backend == "ort":
        # The deploy runtime's own claims, measured in this run: stitched vs one monolithic ONNX,
        # and wall vs FLOPs speedup over interleaved rounds (steadier than one back-to-back pair).
        from soda.bench_runtime import runtime_report

        echo(f"runtime timing: {setup.timing_images} images x {setup.timing_repeats} interleaved rounds, "
             f"against one monolithic ONNX of the model ...")
        report["runtime"] = runtime_report(model, backend, sampler, main_schedules, runner.labels[:setup.timing_images],
                                           setup.timing_repeats)
    if setup.keep_samples > 0:
        report["kept_samples"] = kept
    return report


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the bench rows (None shown as '-')."""
    cols = ("policy", "target_speedup", "flops_speedup", "wall_speedup", "psnr_db", "cosine", "class_accuracy", "frechet")
    heads = ("policy", "target", "FLOPs x", "wall x", "PSNR dB", "cosine", "accuracy", "Frechet")

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    table = [heads] + [tuple(cell(r.get(c)) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in table)
