"""Runtime benchmark, measured in one run on one machine:

1. stitched full compute (one ONNX graph per module, the numpy loop) against ONE monolithic
   ONNX graph of the whole model, exported here with torch.onnx the same way (exporter,
   opset) the subgraphs are; same session options, same sampler loop, same noise;
2. every policy's wall speedup against its FLOPs speedup, on the stitched runtime.

Runs are interleaved (round r times every entry once) and the median of the rounds is
reported, so a burst of load from other processes hits all entries alike.

    python -m soda.bench_runtime --model dit-s-2 --images 2 --steps 20 --repeats 3

`runtime_report` is the part `cli.py bench --backend ort` calls with its own schedules.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from soda.flops import FlopsModel
from soda.generate import full_flops
from soda.sampling import Diffusion, SamplerConfig, initial_noise, sample_loop
from soda.schedule import Schedule

Loop = Callable[[], tuple[np.ndarray, float]]  # one generation -> (samples, FLOPs executed)


@dataclass
class Row:
    name: str
    seconds: float  # median over rounds
    rounds: list[float]
    flops_speedup: float
    wall_speedup: float  # against the reference entry of the same run
    efficiency: float  # wall_speedup / flops_speedup
    calls_per_step: float | None = None  # graph calls per sampler step (a graph backend)


@dataclass
class Report:
    command: str
    model: str
    sampler: str
    images: int
    threads: int | None
    provider: str
    repeats: int
    rows: list[Row] = field(default_factory=list)
    stitched_vs_monolithic: float | None = None  # stitched seconds / monolithic seconds
    paired_step_ratio: float | None = None  # median over steps of stitched / monolithic, back to back
    paired_steps: int = 0
    monolithic_max_rel_diff: float | None = None  # final samples, stitched vs monolithic
    per_module_vs_monolithic: float | None = None  # the same engines module by module (--per-module)
    block_graphs: int = 0

    def lines(self) -> list[str]:
        out = [f"command: {self.command}",
               f"{self.model}, {self.sampler}, {self.images} images (CFG rows doubled), {self.provider}, "
               f"threads {self.threads or 'default'}, {self.repeats} interleaved rounds; seconds = median, "
               f"wall x = median of per-round ratios to stitched full",
               f"{self.block_graphs} block graphs; per-module rows: the same engines module by module, their "
               f"wall x against per-module full",
               f"{'entry':<24} {'seconds':>8} {'FLOPs x':>8} {'wall x':>8} {'wall/FLOPs':>10} {'calls/step':>10}  rounds"]
        for r in self.rows:
            calls = "-" if r.calls_per_step is None else f"{r.calls_per_step:.1f}"
            out.append(f"{r.name:<24} {r.seconds:8.2f} {r.flops_speedup:8.2f} {r.wall_speedup:8.2f} "
                       f"{r.efficiency:10.2f} {calls:>10}  {' '.join(f'{v:.2f}' for v in r.rounds)}")
        if self.stitched_vs_monolithic is not None:
            out.append(f"stitched full / monolithic (median of per-round ratios) = {self.stitched_vs_monolithic:.3f} "
                       f"({(self.stitched_vs_monolithic - 1) * 100:+.1f}%); samples differ by "
                       f"{self.monolithic_max_rel_diff:.1e} of their max")
        if self.per_module_vs_monolithic is not None:
            out.append(f"per-module full / monolithic (median of per-round ratios) = {self.per_module_vs_monolithic:.3f} "
                       f"({(self.per_module_vs_monolithic - 1) * 100:+.1f}%)")
        if self.paired_step_ratio is not None:
            out.append(f"paired per step (same inputs, back to back, order alternating): stitched / monolithic = "
                       f"{self.paired_step_ratio:.3f} (median of {self.paired_steps} steps)")
        return out


def interleaved(loops: dict[str, Loop], repeats: int, echo: Callable[[str], None] = lambda s: None,
                progress: Callable | None = None, cpu: dict | None = None, what: str = "timing") -> dict:
    """{name: (seconds per round, samples, flops)}: every round runs every loop once.
    `progress(desc, total)`: a progress bar with one tick per timed run (`what` names it). `cpu`:
    filled with {name: CPU seconds of this process per round} (all its threads; time spent
    waiting for a core that other processes hold is not counted, so it moves less with their load)."""
    times: dict[str, list[float]] = {k: [] for k in loops}
    last: dict[str, tuple[np.ndarray, float]] = {}
    bar = progress(f"{what} {len(loops)} entries x {repeats} rounds", repeats * len(loops)) if progress else None
    try:
        for r in range(repeats):
            for name, loop in loops.items():
                c0 = time.process_time() if cpu is not None else 0.0
                t0 = time.perf_counter()
                last[name] = loop()
                times[name].append(time.perf_counter() - t0)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - c0)
                if bar is not None:
                    bar.update()
                else:
                    echo(f"  round {r + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    finally:
        if bar is not None:
            bar.close()
    return {k: (times[k], *last[k]) for k in loops}


def schedule_loop(backend, config, sampler_cfg: SamplerConfig, schedule: Schedule, labels: np.ndarray,
                  seed: int = 0) -> Loop:
    """One generation with `schedule` on `backend` through the shared executor (one for every
    round, as a caller generating batch after batch would keep it)."""
    from soda.generate import generate, make_executor

    executor = make_executor(backend, config, schedule)

    def loop():
        x, stats = generate(backend, config, sampler_cfg, schedule, labels, seed, executor=executor)
        return x, stats.flops

    return loop


def rows_from(results: dict, reference: str, full: float) -> list[Row]:
    """Wall speedup as `soda.timing.wall_speedup` defines it (also the bench's)."""
    from soda.timing import wall_speedup

    ref_rounds = results[reference][0]
    rows = []
    for name, (rounds, _, flops) in results.items():
        fx = full / flops if flops else float("nan")
        wx = wall_speedup(ref_rounds, rounds)
        rows.append(Row(name, statistics.median(rounds), [round(v, 3) for v in rounds], fx, wx, wx / fx))
    return rows


def monolithic_session(model, folder: Path, threads: int | None = None):
    """One onnxruntime session over the whole model, exported into `folder`."""
    import onnxruntime as ort

    from runtime.ort_backend import choose_providers, session_options

    path = export_monolithic(model, folder / "monolithic.onnx")
    return ort.InferenceSession(str(path), session_options(threads), providers=choose_providers())


class CallCounter:
    """Counts a graph backend's graph calls (`_run`), so a report can say how many a step makes."""

    def __init__(self, backend):
        self.n = 0
        run = backend._run

        def counted(name, inputs):
            self.n += 1
            return run(name, inputs)

        backend._run = counted


def counted_loop(loop: Loop, counter: CallCounter | None, steps: int, calls: dict, name: str) -> Loop:
    """`loop`, recording its graph calls per sampler step into calls[name]."""
    if counter is None:
        return loop

    def run():
        before = counter.n
        out = loop()
        calls[name] = round((counter.n - before) / steps, 2)
        return out

    return run


def runtime_report(model, backend, sampler_cfg: SamplerConfig, schedules: dict[str, Schedule], labels: np.ndarray,
                   repeats: int = 3, threads: int | None = None, echo: Callable[[str], None] = lambda s: None,
                   mono=None, progress: Callable | None = None, module_backend=None) -> dict:
    """Measured in one run on `backend` (an OrtBackend): stitched full compute against one
    monolithic ONNX of `model` (`mono`, a session, or exported here), and each schedule's wall
    speedup against its FLOPs speedup, in interleaved rounds. `schedules` must include "full".
    Give a backend opened just before, as the monolithic session is: a session's speed depends on
    what the process did before it was made (docs/runtime.md "Timing in one process").
    `module_backend` (the same engines run module by module, no block graphs): every schedule
    is also timed on it, in the same rounds ("per-module <name>" rows), the before of docs/runtime.md."""
    config = model.config
    calls: dict[str, float] = {"monolithic full": 1.0}
    steps = sampler_cfg.steps
    with tempfile.TemporaryDirectory() as tmp:
        mono = mono or monolithic_session(model, Path(tmp), threads)
        loops = {"monolithic full": monolithic_loop(mono, config, sampler_cfg, labels)}
        for prefix, b in (("stitched", backend), ("per-module", module_backend)):
            if b is None:
                continue
            counter = CallCounter(b) if hasattr(b, "_run") else None
            loops.update({f"{prefix} {n}": counted_loop(schedule_loop(b, config, sampler_cfg, s, labels), counter, steps,
                                                        calls, f"{prefix} {n}") for n, s in schedules.items()})
        # Warm-up, not counted: every loop once (a schedule's block graphs open on their first
        # call; first-run allocations and kernel selection).
        interleaved(loops, 1, progress=progress, what="warm-up:")
        cpu: dict[str, list[float]] = {}
        results = interleaved(loops, repeats, echo, progress, cpu)
    rows = rows_from(results, "stitched full", full_flops(config, sampler_cfg, len(labels), tuple(schedules["full"].modules)))
    if module_backend is not None:  # per-module rows against per-module full, as before block graphs
        ref = {k: v for k, v in results.items() if k.startswith("per-module")}
        per_module = {r.name: r for r in rows_from(ref, "per-module full", full_flops(
            config, sampler_cfg, len(labels), tuple(schedules["full"].modules)))}
        rows = [per_module.get(r.name, r) for r in rows]
    mono_x, stitched_x = results["monolithic full"][1], results["stitched full"][1]

    def over_mono(name: str, times: dict | None = None) -> float:
        times = times or {k: v[0] for k, v in results.items()}
        return statistics.median(s / m for s, m in zip(times[name], times["monolithic full"]))

    out = {
        "images": len(labels),
        "repeats": repeats,
        "stitched_over_monolithic": over_mono("stitched full"),
        "stitched_over_monolithic_cpu": over_mono("stitched full", cpu),  # the same ratio in CPU seconds
        "monolithic_max_rel_diff": float(np.abs(stitched_x - mono_x).max() / np.abs(mono_x).max()),
        "rows": [dict(asdict(r), calls_per_step=calls.get(r.name)) for r in rows],
        "block_graphs": len(getattr(backend, "blocks", ())),
    }
    if module_backend is not None:
        out["per_module_over_monolithic"] = over_mono("per-module full")
        out["per_module_over_monolithic_cpu"] = over_mono("per-module full", cpu)
    return out


def runtime_lines(rt: dict) -> list[str]:
    out = [f"runtime timing ({rt['images']} images, {rt['repeats']} interleaved rounds, medians; "
           f"{rt.get('block_graphs', 0)} block graphs):",
           f"  stitched full / one monolithic ONNX = {rt['stitched_over_monolithic']:.3f} "
           f"({(rt['stitched_over_monolithic'] - 1) * 100:+.1f}%; samples differ by {rt['monolithic_max_rel_diff']:.1e})"]
    if rt.get("stitched_over_monolithic_cpu") is not None:
        out.append(f"    in CPU seconds of this process (less sensitive to other processes' load): "
                   f"{rt['stitched_over_monolithic_cpu']:.3f}")
    if rt.get("per_module_over_monolithic") is not None:
        out.append(f"  per-module full / one monolithic ONNX = {rt['per_module_over_monolithic']:.3f} (module by module, "
                   f"no block graphs, same rounds); in CPU seconds {rt['per_module_over_monolithic_cpu']:.3f}")
    for r in rt["rows"]:
        calls = f"  calls/step {r['calls_per_step']:5.1f}" if r.get("calls_per_step") is not None else ""
        out.append(f"  {r['name']:<24} FLOPs x {r['flops_speedup']:5.2f}  wall x {r['wall_speedup']:5.2f}  "
                   f"wall/FLOPs {r['efficiency']:.2f}  {r['seconds']:.2f} s{calls}")
    return out


def export_monolithic(model, path: Path, opset: int = 17, exporter: str = "legacy") -> Path:
    """The whole DiT forward (x, t, y) -> out as ONE ONNX graph, dynamic batch, weights inline."""
    import io
    import warnings

    import onnx
    import torch

    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    args = (x, torch.tensor([10, 500]), torch.tensor([0, cfg.num_classes]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buf = io.BytesIO()
            torch.onnx.export(model, args, buf, input_names=["x", "t", "y"], output_names=["out"],
                              dynamic_axes={"x": {0: "B"}, "t": {0: "B"}, "y": {0: "B"}, "out": {0: "B"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
            onnx.save_model(onnx.load_from_string(buf.getvalue()), str(path))
        else:
            B = torch.export.Dim("B", min=1, max=4096)
            prog = torch.onnx.export(model, args, input_names=["x", "t", "y"], output_names=["out"],
                                     dynamic_shapes={"x": {0: B}, "t": {0: B}, "y": {0: B}}, opset_version=opset,
                                     dynamo=True, verbose=False)
            prog.save(str(path))
    return path


def monolithic_loop(session, config, sampler_cfg: SamplerConfig, labels: np.ndarray, seed: int = 0) -> Loop:
    """Same sampler loop and noise as `generate`, the whole model as one session call per step."""
    diffusion = Diffusion(sampler_cfg, learn_sigma=config.learn_sigma)
    shape = config.latent_shape

    def model_fn(s, x, t, y):
        return session.run(["out"], {"x": x, "t": t, **y})[0]

    def loop():
        z, rng = initial_noise(len(labels), shape, seed)
        x = sample_loop(model_fn, diffusion, z, labels, config.null_label, config.in_channels, rng)
        return x, full_flops(config, sampler_cfg, len(labels))

    return loop


def paired_steps(executor, session, config, sampler_cfg: SamplerConfig, labels: np.ndarray, rounds: int = 1,
                 seed: int = 0) -> list[float]:
    """stitched / monolithic time of each step's model call on the same inputs, timed back to back
    (order alternating), so load from other processes hits both sides of each ratio alike."""
    diffusion = Diffusion(sampler_cfg, learn_sigma=config.learn_sigma)
    shape = config.latent_shape
    ratios = []

    def model_fn(s, x, t, y):
        feeds = {"x": x, "t": t, **y}
        calls = [lambda: executor(s, x, t, y), lambda: session.run(["out"], feeds)[0]]
        if s % 2:
            calls.reverse()
        times, outs = [], []
        for call in calls:
            t0 = time.perf_counter()
            outs.append(call())
            times.append(time.perf_counter() - t0)
        if s % 2:
            times.reverse()
            outs.reverse()
        ratios.append(times[0] / times[1])
        return outs[0]

    for _ in range(rounds):
        executor.reset()
        z, rng = initial_noise(len(labels), shape, seed)
        sample_loop(model_fn, diffusion, z, labels, config.null_label, config.in_channels, rng)
    return ratios


def bench_runtime(model_name: str = "dit-s-2", images: int = 2, steps: int = 20, sampler: str = "ddim",
                  cfg_scale: float = 4.0, repeats: int = 3, threads: int | None = None,
                  policies: tuple[str, ...] = ("full", "fora", "toca", "duca", "soda"), soda_speedup: float = 2.5,
                  profile_samples: int = 2, workdir: str | None = None, command: str = "",
                  echo: Callable[[str], None] = print, per_module: bool = False) -> Report:
    """Export a random-init model (stitched graphs + one monolithic graph) and time everything;
    `per_module`: also every schedule module by module (no block graphs), in the same rounds."""
    import torch

    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.run import make_backend
    from soda.models.loading import load_model
    from soda.policies import ScheduleSpec, make_schedule

    torch.set_num_threads(1)  # set-up only (profile for soda, export): one thread is fastest on a shared box
    model, weights = load_model(model_name, random_init=True)
    config = model.config
    sampler_cfg = SamplerConfig(sampler, steps, cfg_scale, 3 if config.in_channels == 4 else None)
    spec = ScheduleSpec.for_model(config, sampler, steps)
    labels = np.arange(images, dtype=np.int64) % config.num_classes
    schedules = {}
    for p in policies:
        if p == "soda":
            from soda.profile import profile

            echo(f"profiling {profile_samples} generations for soda (torch) ...")
            prof = profile(model, sampler_cfg, profile_samples, seed=1, weights=weights)
            schedules[p] = make_schedule("soda", spec, speedup=soda_speedup, profile=prof)
        else:
            schedules[p] = make_schedule(p, spec)
    if "full" not in schedules:
        schedules = {"full": make_schedule("full", spec), **schedules}
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    folder = Path(tmp.name)
    echo(f"exporting {model_name} subgraphs into {folder} ...")
    export_model(model, weights, schedules["full"], sampler_cfg, folder / "engines", progress=False, echo=echo)
    engines = open_engines(folder / "engines")
    backend = make_backend(engines, "ort", threads=threads)
    module_backend = make_backend(engines, "ort", threads=threads, blocks=False) if per_module else None
    mono = monolithic_session(model, folder, threads)
    echo(f"timing {len(schedules) * (2 if per_module else 1) + 1} entries (with one monolithic ONNX) x {repeats} rounds ...")
    rt = runtime_report(model, backend, sampler_cfg, schedules, labels, repeats, threads, echo, mono,
                        module_backend=module_backend)
    report = Report(command, model_name, f"{sampler}-{steps} cfg {cfg_scale:g}", images, threads, backend.describe(),
                    repeats, [Row(**r) for r in rt["rows"]])
    report.per_module_vs_monolithic = rt.get("per_module_over_monolithic")
    report.block_graphs = rt["block_graphs"]
    report.stitched_vs_monolithic = rt["stitched_over_monolithic"]
    report.monolithic_max_rel_diff = rt["monolithic_max_rel_diff"]
    echo("paired per-step comparison ...")
    from soda.executor import Executor

    ratios = paired_steps(Executor(backend, schedules["full"], FlopsModel.for_config(config)), mono, config,
                          sampler_cfg, labels, rounds=max(1, repeats // 2))
    report.paired_step_ratio, report.paired_steps = statistics.median(ratios), len(ratios)
    del model
    tmp.cleanup()
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m soda.bench_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-s-2")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--policies", default="full,fora,toca,duca,soda")
    ap.add_argument("--soda-speedup", type=float, default=2.5)
    ap.add_argument("--per-module", action="store_true",
                    help="Also time every schedule module by module (no block graphs): before/after in one run.")
    ap.add_argument("--json", default=None, help="Also write the report here.")
    args = ap.parse_args(argv)
    command = "python -m soda.bench_runtime " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = bench_runtime(args.model, args.images, args.steps, args.sampler, args.cfg_scale, args.repeats,
                           args.threads, tuple(p for p in args.policies.split(",") if p), args.soda_speedup,
                           command=command, per_module=args.per_module)
    print("\n".join(report.lines()))
    if args.json:
        from soda.schedule import write_json_atomic

        write_json_atomic(args.json, {"format": 1, **asdict(report)})


if __name__ == "__main__":
    main()
