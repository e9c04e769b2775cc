"""`cli.py demo`: the whole toolchain on one model, into one folder, with a Markdown report.

profile -> SODA schedule -> ONNX export -> onnxruntime run of every policy (same noise) ->
table, sample grid, sensitivity heatmap, schedule picture, fidelity-vs-speedup plot.
Each stage writes a file the next one reads, and a stage whose file already fits (same
model, weights, sampler) is reused, so a second demo run only re-measures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from soda.errors import UserError
from soda.outputs import atomic_output


@dataclass
class DemoConfig:
    out: Path
    speedup: float = 2.5
    frontier: list[float] = field(default_factory=lambda: [1.5, 3.0, 4.0])
    samples: int = 100
    profile_samples: int = 32
    grid_per_policy: int = 10
    seed: int = 0
    policies: tuple[str, ...] = ("full", "fora", "toca", "duca", "soda")


class Stages:
    """Numbered stage banners with their durations, kept for the report."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.done, self._t = total, echo, [], None

    def start(self, name: str) -> None:
        self._finish()
        self._name, self._t = name, time.perf_counter()
        self.echo(f"[{len(self.done) + 1}/{self.total}] {name}")

    def _finish(self) -> None:
        if self._t is not None:
            self.done.append((self._name, time.perf_counter() - self._t))
            self._t = None

    def close(self) -> list[tuple[str, float]]:
        self._finish()
        return self.done


def run_demo(model, weights: str, sampler, cfg: DemoConfig, echo: Callable[[str], None] = print,
             progress: Callable | None = None) -> Path:
    """Run every stage; returns the report path."""
    from export.onnx_export import export_model, summary
    from soda.bench import BenchSetup, bench
    from soda.pipeline import load_or_profile, resolve_schedule
    from soda.plots import frontier_plot, random_note, schedule_picture, sensitivity_heatmap

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(5, echo)

    stages.start(f"profile: {cfg.profile_samples} calibration generations ({sampler.kind}-{sampler.steps})")
    profile_path = out / "profile.json"
    prof = _reusable_profile(profile_path, model, weights, sampler, cfg.profile_samples, echo)
    if prof is None:
        prof = load_or_profile(model, weights, sampler, None, echo, cfg.profile_samples, seed=cfg.seed + 10_000,
                               progress=progress, hint=f" (kept in {profile_path} and reused by the next demo run)")
        prof.save(profile_path)
    sensitivity_heatmap(prof, out / "sensitivity.png")

    stages.start(f"schedule: SODA at {cfg.speedup}x FLOPs")
    schedule = resolve_schedule(model, weights, sampler, "soda", speedup=cfg.speedup, profile_file=profile_path, echo=echo)
    schedule.save(out / "schedule.json")
    schedule_picture(schedule, out / "schedule.png")
    echo(f"  step kinds: {schedule.count_kinds()}")

    stages.start("export: ONNX subgraphs + one weights file")
    res = export_model(model, weights, schedule, sampler, out / "engines", progress=progress is not None, echo=echo,
                       replace=True)
    echo(f"  {len(res.rows)} ONNX graphs sharing one weights file")
    for line in summary(res)[len(res.rows) + 2:]:  # the totals, not the per-graph table
        echo("  " + line)

    stages.start(f"run + bench on onnxruntime: {', '.join(cfg.policies)} x {cfg.samples} samples")
    setup = BenchSetup(policies=list(cfg.policies), speedup=cfg.speedup, samples=cfg.samples, seed=cfg.seed,
                       frontier=cfg.frontier, backend="ort", engines_dir=str(out / "engines"),
                       profile_file=str(profile_path), profile_samples=cfg.profile_samples,
                       keep_samples=cfg.grid_per_policy, tune=False)  # the demo shows the toolchain; bench tunes
    report = bench(model, weights, sampler, setup, echo=echo, progress=progress)
    from soda.schedule import write_json_atomic

    kept = report.pop("kept_samples")
    write_json_atomic(out / "bench.json", report)
    frontier_plot(report["results"] + report["frontier"], out / "frontier.png",
                  title=f"{model.config.name}, {sampler.kind}-{sampler.steps}, onnxruntime" + random_note(weights))

    from soda.bench import format_table
    from soda.bench_runtime import runtime_lines

    echo(format_table(report["results"]))
    if report.get("runtime"):
        echo("\n".join(runtime_lines(report["runtime"])))

    stages.start("report: sample grid and report.md")
    from soda.pictures import policy_grid_png

    policy_grid_png(kept, model.config, report["results"], out / "samples.png", weights.startswith("random-init"))
    timings = stages.close()
    path = out / "report.md"
    with atomic_output(path) as tmp:
        tmp.write_text(_report_md(model.config, weights, sampler, cfg, prof, schedule, res, report, timings))
    return path


def _reusable_profile(path: Path, model, weights: str, sampler, samples: int, echo):
    """The profile an earlier demo left in `path`, if it was made for exactly this run."""
    from soda.profile import Profile

    if not path.is_file():
        return None
    try:
        prof = Profile.load(path)
        config = model.config
        prof.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
    except UserError as e:
        echo(f"  not reusing {path}: {e}")
        return None
    if prof.weights != weights or prof.samples != samples or prof.sampler != sampler.to_dict():
        echo(f"  not reusing {path}: made for other weights, sample count or sampler settings")
        return None
    echo(f"  reusing {path} ({prof.samples} generations)")
    return prof


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _runtime_md(rt: dict | None) -> list[str]:
    """The deploy runtime's overhead, measured by the bench in this run."""
    if not rt:
        return []
    lines = ["## Runtime overhead",
             f"Stitched full compute takes {rt['stitched_over_monolithic']:.3f}x the time of one monolithic ONNX "
             f"of the same model ({rt['images']} images, median of {rt['repeats']} interleaved rounds); "
             "wall speedup per FLOPs speedup:", "",
             "| entry | FLOPs speedup | wall speedup | wall / FLOPs |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['flops_speedup']:.2f} | {r['wall_speedup']:.2f} | {r['efficiency']:.2f} |"
              for r in rt["rows"]]
    return lines + [""]


def _report_md(config, weights, sampler, cfg: DemoConfig, prof, schedule, export_res, report, timings) -> str:
    random = weights.startswith("random-init")
    lines = [
        f"# SODA demo: {config.name}",
        "",
        f"Weights: `{weights}`" + (" (**random weights: numbers show the toolchain, not a model**)" if random else ""),
        f"Sampler: {sampler.kind}-{sampler.steps}, CFG {sampler.cfg_scale}. Policies tuned to {cfg.speedup}x FLOPs; "
        f"{cfg.samples} samples per policy from the same noise (seed {cfg.seed}), run by the deploy runtime "
        f"({report['backend']}). Every number below was computed by the run that wrote this file.",
        "",
        "| policy | variant | FLOPs speedup | wall speedup | PSNR vs full (dB), mean [95% CI] | cosine | class accuracy | Frechet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ci = r.get("psnr_ci95")
        psnr = _fmt(r['psnr_db'], 2) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r['policy']} | {r.get('variant', '-')} | {_fmt(r['flops_speedup'], 2)} | {_fmt(r['wall_speedup'], 2)} | "
                     f"{psnr} | {_fmt(r['cosine'], 4)} | {_fmt(r['class_accuracy'], 2)} | "
                     f"{_fmt(r['frechet'], 2)} |")
    kinds = schedule.count_kinds()
    lines += [
        "",
        "## Samples (one row per policy)",
        "![samples](samples.png)",
        "",
        "## Sensitivity (OFS)",
        f"Cache error E_c for a 1-step-old cache, per step and layer, from {prof.samples} calibration generations "
        f"({prof.cost.get('seconds', 0):.1f} s).",
        "![sensitivity](sensitivity.png)",
        "",
        "## SODA schedule",
        f"{kinds['full']} full steps, {kinds['partial']} partial steps (cache reuse and pruning), {kinds['skip']} skipped; "
        f"prune rates {schedule.prune_rates() or 'none'}.",
        "![schedule](schedule.png)",
        "",
        "## Fidelity vs speedup",
        "![frontier](frontier.png)",
        "",
        "## Export",
        f"{len(export_res.rows)} ONNX graphs sharing one weights file in `engines/`: "
        f"{export_res.total_bytes / 2**20:.1f} MiB on disk for {export_res.raw_fp32_bytes / 2**20:.1f} MiB of fp32 weights, "
        f"worst parity error vs PyTorch {max(r.parity_max_abs for r in export_res.rows):.1e} "
        f"({'reused from an earlier run' if export_res.reused else 'exported by this run'}).",
        "",
        *_runtime_md(report.get("runtime")),
        "## Stages",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in timings],
    ]
    return "\n".join(lines) + "\n"
