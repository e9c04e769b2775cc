"""GPU check (issue 13): stitched vs monolithic wall time, and wall vs FLOPs speedup per policy,
on every backend this machine has, in one run; one JSON out.

    python scripts/gpu_check.py --json gpu_check.json            # DiT-XL/2 256 px, DDIM-50, 8 images + CFG
    python scripts/gpu_check.py --tiny --json /tmp/gpu_tiny.json  # the same code on a small model, CPU, < 1 min

Weights are RANDOM (no checkpoint is downloaded): the figures are timings of the toolchain, not
image quality. Backends (each skipped with its reason where this machine lacks it):
  torch-cuda, torch-cuda-bf16   the PyTorch backend with every loop array on the GPU; monolithic =
                                the model's own forward, same device and precision
  ort-cuda                      onnxruntime CUDA on CuPy arrays (IO binding); monolithic = one ONNX
  trt-fp16                      TensorRT engines (built and checked against ONNX fp32 here, minutes);
                                monolithic = one engine of the whole model
  torch-cpu, torch-cpu-bf16,    the same on the CPU (--tiny runs these, so the script cannot rot;
  ort-cpu                       torch-cpu-bf16 is there for the bf16 code path, not for its speed)
Every policy is scheduled at the same FLOPs speedup (--speedup, 2.5); SODA is profiled on
--profile-samples generations first. Entries of a backend are timed in interleaved rounds
after one warm-up run; seconds are medians, a wall speedup is the median of per-round ratios
to the stitched full entry (`soda.timing.wall_speedup`), the stitched overhead the median of
per-round stitched full / monolithic.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_BACKENDS = ("torch-cuda", "torch-cuda-bf16", "ort-cuda", "trt-fp16")
CPU_BACKENDS = ("torch-cpu", "torch-cpu-bf16", "ort-cpu")
TARGETS = {"soda_wall_speedup_min": 2.3, "stitched_overhead_max": 0.03}  # issue 13, torch-cuda


def unavailable(name: str) -> str:
    """Why backend `name` cannot run here ("" when it can)."""
    if name.startswith("torch-cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"no CUDA device for torch (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        return ""
    if name.startswith("ort"):
        import onnxruntime as ort

        if name == "ort-cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return f"onnxruntime {ort.__version__} has no CUDA provider (pip install onnxruntime-gpu)"
            from runtime.device import cuda_availability

            return cuda_availability()[1]
        return ""
    if name.startswith("trt"):
        from export.trt import availability
        from runtime.device import cuda_availability

        trt, gpu, why = availability()
        if trt is None or gpu is None:
            return why
        return cuda_availability()[1]
    if name in ("torch-cpu", "torch-cpu-bf16"):
        return ""
    return f"unknown backend {name!r}"


def torch_monolithic(model, device: str, dtype, config, sampler_cfg, labels):
    """The whole model's forward per step on `device`, same sampler loop and noise as generate."""
    import torch

    from soda.generate import full_flops
    from soda.sampling import Diffusion, initial_noise, sample_loop

    diffusion = Diffusion(sampler_cfg, learn_sigma=config.learn_sigma)

    # The same precision as TorchBackend(device, dtype): float32 weights and inputs, matmuls under
    # autocast (casting the input alone would meet float32 weights in the first convolution).
    @torch.no_grad()
    def model_fn(s, x, t, y):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device),
                        torch.from_numpy(y["y"]).to(device))
        return out.float().cpu().numpy()

    def loop():
        z, rng = initial_noise(len(labels), config.latent_shape, 0)
        x = sample_loop(model_fn, diffusion, z, labels, config.null_label, config.in_channels, rng)
        return x, full_flops(config, sampler_cfg, len(labels))

    return loop


def trt_monolithic(onnx_path: Path, rows: int, config, sampler_cfg, labels, precision: str, workdir: Path):
    """One TensorRT engine of the whole model (batch fixed to the rows sampled), run on CuPy."""
    import tensorrt as trt

    from export.trt import _build_one
    from runtime.device import CupyArrays
    from runtime.trt_backend import TrtEngine
    from soda.arrays import to_numpy
    from soda.generate import full_flops
    from soda.sampling import Diffusion, initial_noise, sample_loop

    shapes = {"x": [rows, *config.latent_shape], "t": [rows], "y": [rows]}
    profile = {"n": None, "shapes": {k: [v, v, v] for k, v in shapes.items()}}
    logger = trt.Logger(trt.Logger.WARNING)
    plan = _build_one(trt, trt.Builder(logger), logger, onnx_path, [profile], precision, workdir / "mono.cache")
    (workdir / "mono.plan").write_bytes(plan)
    arrays = CupyArrays()
    engine = TrtEngine(trt, trt.Runtime(logger), workdir / "mono.plan", [profile], arrays)
    scratch = arrays.empty((max(engine.scratch_bytes, 1),), np.uint8)
    engine.use_scratch(arrays.ptr(scratch), engine.scratch_bytes)
    diffusion = Diffusion(sampler_cfg, learn_sigma=config.learn_sigma)

    def model_fn(s, x, t, y):
        return to_numpy(engine({"x": x, "t": t, "y": y["y"]}, ("out",))[0])

    def loop():
        z, rng = initial_noise(len(labels), config.latent_shape, 0)
        x = sample_loop(model_fn, diffusion, z, labels, config.null_label, config.in_channels, rng)
        return x, full_flops(config, sampler_cfg, len(labels))

    loop.keep = (engine, scratch)
    return loop


def ort_monolithic(onnx_path: Path, device: str, config, sampler_cfg, labels):
    import onnxruntime as ort

    from runtime.ort_backend import choose_providers, session_options
    from soda.bench_runtime import monolithic_loop

    session = ort.InferenceSession(str(onnx_path), session_options(), providers=choose_providers(device))
    return monolithic_loop(session, config, sampler_cfg, labels)


def measure(name: str, mono, backend, config, sampler_cfg, schedules: dict, labels, repeats: int, echo) -> dict:
    """Interleaved rounds of the monolithic entry and every stitched schedule on one backend."""
    from soda.bench_runtime import interleaved, rows_from, schedule_loop
    from soda.errors import UserError
    from soda.generate import full_flops

    skipped = {}
    runnable = {}
    rows = len(labels) * (2 if sampler_cfg.uses_cfg else 1)
    for p, s in schedules.items():
        try:
            if hasattr(backend, "check_schedule"):
                backend.check_schedule(s, rows)
            runnable[p] = s
        except UserError as e:
            skipped[p] = str(e)
    loops = {"monolithic": mono}
    loops.update({f"stitched {p}": schedule_loop(backend, config, sampler_cfg, s, labels) for p, s in runnable.items()})
    t0 = time.perf_counter()
    for loop in loops.values():
        loop()  # warm-up: allocations, kernel selection, cuDNN/cuBLAS heuristics
    echo(f"{name}: warm-up {time.perf_counter() - t0:.1f} s; timing {len(loops)} entries x {repeats} rounds")
    results = interleaved(loops, repeats, echo)
    rows_ = rows_from(results, "stitched full", full_flops(config, sampler_cfg, len(labels)))
    mono_x, full_x = results["monolithic"][1], results["stitched full"][1]
    overhead = statistics.median(s / m for s, m in zip(results["stitched full"][0], results["monolithic"][0]))
    out = {
        "describe": getattr(backend, "describe", lambda: name)(),
        "monolithic_seconds": statistics.median(results["monolithic"][0]),
        "stitched_full_over_monolithic": overhead,
        "samples_max_rel_diff_vs_monolithic": float(np.abs(full_x - mono_x).max() / np.abs(mono_x).max()),
        "policies": {r.name.removeprefix("stitched "): {"seconds": r.seconds, "rounds": r.rounds,
                                                         "flops_speedup": r.flops_speedup,
                                                         "wall_speedup": r.wall_speedup, "wall_over_flops": r.efficiency}
                     for r in rows_ if r.name != "monolithic"},
        "policies_skipped": skipped,
    }
    return out


def machine() -> dict:
    import onnxruntime as ort
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        from export.trt import gpu_name

        info["gpu"] = gpu_name()
    for mod in ("tensorrt", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def run(args, echo=print, save=lambda report: None) -> dict:
    """The report; `save(report)` is called after each backend, so a run stopped at a time limit
    keeps what it measured."""
    import torch

    from soda.bench_runtime import export_monolithic
    from soda.flops import FlopsModel
    from soda.models.config import get_config
    from soda.models.loading import build_model
    from soda.policies import ScheduleSpec, make_schedule
    from soda.sampling import SamplerConfig

    backends = [b for b in args.backends.split(",") if b]
    reasons = {b: unavailable(b) for b in backends}
    report = {"format": 1, "command": args.command, "tiny": args.tiny, "machine": machine(),
              "model": args.model + (f" (depth {args.depth})" if args.depth else ""),
              "weights": "RANDOM (random-init-0): timings of the toolchain, not image quality",
              "sampler": f"{args.sampler}-{args.steps} cfg {args.cfg_scale:g}", "images": args.images,
              "rows": args.images * 2, "speedup": args.speedup, "repeats": args.repeats,
              "statistics": "seconds: median of interleaved rounds; wall speedup: median of per-round ratios to "
                            "stitched full; stitched_full_over_monolithic: median of per-round ratios",
              "targets": TARGETS, "backends": {b: {"skipped": r} for b, r in reasons.items() if r}}
    todo = [b for b in backends if not reasons[b]]
    for b, r in reasons.items():
        if r:
            echo(f"{b}: skipped ({r})")
    # With nothing to time here, only a --profile still to be made is worth the model: profile on
    # this machine's CPU now, so a GPU session reads it instead of spending its minutes on it.
    profile_here = bool(args.profile) and not Path(args.profile).exists() and any(
        p.startswith("soda") for p in args.policies.split(","))
    if not todo and not profile_here:
        return report
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_config(args.model, **({"depth": args.depth} if args.depth else {}))
    torch.manual_seed(0)
    model = build_model(config)
    model.randomize_zero_init(0)
    model, weights = model.eval(), "random-init-0"
    with torch.no_grad():  # the same seed gives the same weights on any machine; this shows it did
        report["weights_sum"] = float(sum(p.double().sum() for p in model.parameters()))
    sampler_cfg = SamplerConfig(args.sampler, args.steps, args.cfg_scale, 3 if config.in_channels == 4 else None)
    spec = ScheduleSpec.for_model(config, args.sampler, args.steps)
    fm = FlopsModel.for_config(config)
    labels = (np.arange(args.images, dtype=np.int64) * 97) % config.num_classes
    policies = [p for p in args.policies.split(",") if p]
    schedules = {"full": make_schedule("full", spec)}
    for p in policies:
        if p == "full":
            continue
        if p.startswith("soda"):
            prof = soda_profile(args, p, model, sampler_cfg, weights, echo)
            schedules[p] = make_schedule(p, spec, speedup=args.speedup, profile=prof)
        else:
            schedules[p] = make_schedule(p, spec, speedup=args.speedup, flops=fm)
    if profile_here:
        report["soda_profile_written"] = args.profile
    if not todo:
        return report
    exported = next((schedules[p] for p in ("soda", "soda-forecast") if p in schedules), schedules["full"])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if any(b.startswith(("ort", "trt")) for b in todo):
            from export.onnx_export import export_model
            from runtime.engine_check import check_trt_engines

            echo(f"exporting {args.model} subgraphs (the {exported.policy} schedule's token counts) and one "
                 "monolithic ONNX ...")
            export_model(model, weights, exported, sampler_cfg, tmp / "engines", progress=False, echo=lambda s: None,
                         trt_precision="fp16" if "trt-fp16" in todo else None, check_engines=check_trt_engines)
            export_monolithic(model, tmp / "monolithic.onnx")
        for b in todo:
            t0 = time.perf_counter()
            try:
                report["backends"][b] = one_backend(b, model, config, sampler_cfg, schedules, labels, tmp, args, echo)
            except Exception as e:  # one backend failing must not lose the others' figures
                report["backends"][b] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                echo(f"{b}: FAILED {report['backends'][b]['failed']}")
            report["backends"][b]["backend_seconds"] = round(time.perf_counter() - t0, 1)
            echo(summary(b, report["backends"][b]))
            save(report)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    tc = report["backends"].get("torch-cuda", {})
    if "policies" in tc and "soda" in tc["policies"]:
        report["targets_met"] = {
            "soda_wall_speedup": tc["policies"]["soda"]["wall_speedup"] >= TARGETS["soda_wall_speedup_min"],
            "stitched_overhead": tc["stitched_full_over_monolithic"] - 1 <= TARGETS["stitched_overhead_max"]}
    return report


def soda_profile(args, policy: str, model, sampler_cfg, weights: str, echo):
    """SODA's profile: read from --profile when that file exists (made by an earlier run for the same
    model, weights and sampler), else computed here (on the CPU: DiT-XL/2 at DDIM-50 took 6 of a
    GPU session's 15 minutes) and written there when --profile names a file."""
    from soda.errors import UserError
    from soda.profile import Profile, profile

    orders = (1, 2) if policy == "soda-forecast" else ()
    path = Path(args.profile) if args.profile else None
    if path is not None and path.exists():
        prof = Profile.load(path)
        made = (prof.weights, prof.samples, prof.seed, prof.sampler)
        wanted = (weights, args.profile_samples, 1, sampler_cfg.to_dict())
        # A profile with more forecast orders serves too: E_c and E_p do not depend on them.
        if made != wanted or not set(orders) <= set(prof.orders):
            made, wanted = (*made, f"orders {prof.orders}"), (*wanted, f"orders {list(orders)}")
            raise UserError(f"--profile {path}: made for {made}, this run needs {wanted} "
                            "(delete it to profile again)")
        echo(f"{policy}: profile read from {path}")
        return prof
    echo(f"profiling {args.profile_samples} generation(s) for {policy} (torch, CPU) ...")
    prof = profile(model, sampler_cfg, args.profile_samples, seed=1, weights=weights, orders=orders)
    if path is not None:
        prof.save(path)
        echo(f"{policy}: profile written to {path} (--profile {path} reuses it)")
    return prof


def summary(name: str, r: dict) -> str:
    """One line per backend: its figures, or why it has none."""
    if "policies" in r:
        return f"{name}: stitched full / monolithic = {r['stitched_full_over_monolithic']:.3f}; " + ", ".join(
            f"{p} {v['wall_speedup']:.2f}x wall / {v['flops_speedup']:.2f}x FLOPs" for p, v in r["policies"].items())
    return f"{name}: {'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped') or r.get('failed')}"


def one_backend(name, model, config, sampler_cfg, schedules, labels, tmp: Path, args, echo) -> dict:
    import torch

    if name.startswith("torch"):
        from soda.torch_backend import DTYPES, TorchBackend

        device = "cpu" if name.startswith("torch-cpu") else "cuda"
        dtype = DTYPES["bf16"] if name.endswith("bf16") else torch.float32
        backend = TorchBackend(model, device=device, dtype=dtype)  # a copy of the model there, in this precision
        mono = torch_monolithic(backend.model, device, dtype, config, sampler_cfg, labels)
        out = measure(name, mono, backend, config, sampler_cfg, schedules, labels, args.repeats, echo)
        del backend, mono
        if device == "cuda":
            torch.cuda.empty_cache()
        return out
    from runtime.engines import open_engines
    from runtime.run import make_backend

    engines = open_engines(tmp / "engines")
    if name.startswith("ort"):
        device = "cuda" if name == "ort-cuda" else "cpu"
        backend = make_backend(engines, "ort", device=device)
        mono = ort_monolithic(tmp / "monolithic.onnx", device, config, sampler_cfg, labels)
    else:
        backend = make_backend(engines, "trt")
        mono = trt_monolithic(tmp / "monolithic.onnx", len(labels) * 2, config, sampler_cfg, labels, "fp16", tmp)
    out = measure(name, mono, backend, config, sampler_cfg, schedules, labels, args.repeats, echo)
    if name.startswith("trt"):
        out["engine_check"] = engines.manifest.trt.get("check")
    return out


def parse(argv):
    ap = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="Write the report here.")
    ap.add_argument("--tiny", action="store_true", help="A small model on whatever backends exist (CPU too).")
    ap.add_argument("--model", default=None, help="[dit-xl-2; --tiny: dit-s-8]")
    ap.add_argument("--depth", type=int, default=None, help="Override the model's depth [--tiny: 2].")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default; --tiny: 1].")
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    ap.add_argument("--steps", type=int, default=None, help="[50; --tiny: 10]")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--images", type=int, default=None, help="Images per generation; CFG doubles the rows [8; --tiny: 1].")
    ap.add_argument("--policies", default="full,fora,toca,duca,soda")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--repeats", type=int, default=None, help="Interleaved timing rounds [3; --tiny: 1].")
    ap.add_argument("--profile-samples", type=int, default=1)
    ap.add_argument("--profile", default=None, help="SODA's profile: read from this file when it exists, "
                    "else computed and written there, even on a machine with no backend to time (so a GPU "
                    "session can read it instead of profiling on its clock).")
    ap.add_argument("--backends", default=None,
                    help=f"[{','.join(GPU_BACKENDS)}; --tiny adds {','.join(CPU_BACKENDS)}]")
    ap.add_argument("--workdir", default=None, help="Where the temporary export goes [system temp].")
    args = ap.parse_args(argv)
    tiny = args.tiny

    def default(value, small, large):  # None means "not given"; 0 is a value, checked below
        return (small if tiny else large) if value is None else value

    args.model = args.model or ("dit-s-8" if tiny else "dit-xl-2")
    args.depth = default(args.depth, 2, None)
    args.threads = default(args.threads, 1, None)
    args.steps = default(args.steps, 10, 50)
    args.images = default(args.images, 1, 8)
    args.repeats = default(args.repeats, 1, 3)
    args.backends = args.backends or ",".join(GPU_BACKENDS + (CPU_BACKENDS if tiny else ()))
    for flag in ("depth", "threads", "steps", "images", "repeats", "profile_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    from soda.policies import POLICIES

    bad = [p for p in args.policies.split(",") if p and p not in POLICIES]
    if bad or not args.policies.strip(","):
        ap.error(f"--policies: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(POLICIES)}")
    unknown = [b for b in args.backends.split(",") if b and b not in GPU_BACKENDS + CPU_BACKENDS]
    if unknown or not args.backends.strip(","):
        ap.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(GPU_BACKENDS + CPU_BACKENDS)}")
    args.command = "python scripts/gpu_check.py " + shlex.join(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    out = Path(args.json)
    if out.suffix != ".json":
        print(f"error: --json {out}: use a .json file", file=sys.stderr)
        return 2
    from soda.errors import UserError
    from soda.schedule import write_json_atomic

    try:
        report = run(args, echo=lambda s: print(s, flush=True), save=lambda r: write_json_atomic(out, r))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(out, report)
    for b, r in report["backends"].items():
        print(summary(b, r))
    print(f"report -> {out}")
    # A GPU session must not pass with nothing measured: a failed backend, or none that ran, is exit 1.
    failed = [b for b, r in report["backends"].items() if "failed" in r]
    measured = [b for b, r in report["backends"].items() if "policies" in r]
    if not failed and not measured and report.get("soda_profile_written"):
        print(f"nothing to time here; SODA's profile is in {report['soda_profile_written']} for a GPU run to read")
        return 0
    if failed or not measured:
        print(f"error: {'failed: ' + ', '.join(failed) if failed else 'no backend could be measured here'} "
              f"(reasons in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
