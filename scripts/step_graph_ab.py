"""Step graphs against the whole-step layer blocks they replaced, and against one monolithic ONNX
(issue 17, docs/runtime.md "Block graphs"), in one process and the same interleaved rounds.

    python scripts/step_graph_ab.py --model dit-digits --steps 50 --rounds 30 --out /tmp/ab-dd
    python scripts/step_graph_ab.py --model dit-s-2 --random-init --steps 20 --rounds 5 --out /tmp/ab-s2

One export holds both the step graphs (`default_blocks`) and export version 3's `block.0-{L-1}.ff`
/ `.cc`; the entries differ only in which of them the backend offers the executor:
  step        what an export writes now: a full step is one call (`step.*.cc`, or `.ff` while a later
              step reads the outputs), a whole reuse step one call (`step.*.rr`)
  v3          version 3: embed + `block.0-{L-1}.cc|ff` + final; reuse steps layer by layer
  no-step.rr  step graphs without `.rr`: reuse steps as embed + L x `block.<l>.rr` + final
  step-ff     step graphs without `.cc`: full steps emit every module's output
Full compute and FORA (at --speedup) on 2 images with CFG. Each round runs every entry once, the
order reversed every other round; the ratios are medians of per-round ratios (load that changes
between rounds cancels). Weights are the model's checkpoint, or random with --random-init.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.bench_runtime import monolithic_loop, monolithic_session, schedule_loop
    from soda.blocks import COMPUTE, COMPUTED_ONLY, Block, default_blocks
    from soda.models.loading import load_model
    from soda.policies import ScheduleSpec, make_schedule
    from soda.errors import positive_int
    from soda.sampling import SamplerConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-digits")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--steps", type=positive_int, default=50)
    ap.add_argument("--rounds", type=positive_int, default=30)
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--out", required=True, help="export folder (reused when this script made it)")
    args = ap.parse_args(argv)

    model, weights = load_model(args.model, random_init=args.random_init)
    cfg = model.config
    L, M = cfg.depth, len(cfg.interface.modules)
    sampler = SamplerConfig("ddim", args.steps, 4.0, None)
    spec = ScheduleSpec.for_model(cfg, "ddim", args.steps)
    full = make_schedule("full", spec)
    fora = make_schedule("fora", spec, speedup=args.speedup)
    blocks = default_blocks(cfg.interface, L, full) + [Block(0, L - 1, c * M) for c in (COMPUTE, COMPUTED_ONLY)]
    v3_there = (Path(args.out) / f"{Block(0, L - 1, COMPUTE * M).name}.onnx").is_file()
    export_model(model, weights, full, sampler, args.out, blocks=blocks, replace=True, force=not v3_there,
                 progress=False, echo=lambda *a: None)
    engines = open_engines(args.out)

    def backend(keep) -> OrtBackend:
        b = OrtBackend(engines)
        b.blocks = tuple(bl for bl in b.blocks if keep(bl))
        return b

    layers = lambda bl: bl.first == bl.last  # noqa: E731 (a one-layer block)
    offers = {
        "step": lambda bl: layers(bl) or bl.step,
        "v3": lambda bl: not bl.step,
        "no-step.rr": lambda bl: layers(bl) or (bl.step and "r" not in bl.code),
        "step-ff": lambda bl: layers(bl) or (bl.step and "c" not in bl.code),
    }
    labels = np.array([1, 7])
    with tempfile.TemporaryDirectory() as tmp:
        mono = monolithic_session(model, Path(tmp))
        loops = {"mono full": monolithic_loop(mono, cfg, sampler, labels)}
        for name, keep in offers.items():  # full compute never uses .rr, FORA's full steps need .kk (.ff before export version 6)
            b = backend(keep)
            if name != "no-step.rr":
                loops[f"{name} full"] = schedule_loop(b, cfg, sampler, full, labels)
            if name != "step-ff":
                loops[f"{name} fora"] = schedule_loop(b, cfg, sampler, fora, labels)
        for loop in loops.values():
            loop()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in loops}
        keys = list(loops)
        for r in range(args.rounds):
            for k in keys if r % 2 else keys[::-1]:
                t0 = time.perf_counter()
                loops[k]()
                times[k].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    out = {"model": args.model, "steps": args.steps, "rounds": args.rounds,
           "seconds": {k: statistics.median(v) for k, v in times.items()},
           "full_over_mono": {k: ratio(f"{k} full", "mono full") for k in offers if k != "no-step.rr"},
           "fora_over_step_fora": {k: ratio(f"{k} fora", "step fora") for k in offers if k != "step-ff"}}
    print(f"{args.model}, ddim-{args.steps}, 2 images + CFG, {args.rounds} interleaved rounds (medians of per-round ratios)")
    for k, v in out["full_over_mono"].items():
        print(f"  full compute, {k:10s} / monolithic = {v:.3f}   ({out['seconds'][f'{k} full']:.3f} s)")
    for k, v in out["fora_over_step_fora"].items():
        print(f"  FORA {args.speedup}x,   {k:10s} / step      = {v:.3f}   ({out['seconds'][f'{k} fora']:.3f} s)")
    return out


if __name__ == "__main__":
    from soda.errors import main_or_exit

    main_or_exit(main)  # a wrong folder, model or policy: one line, not a traceback
