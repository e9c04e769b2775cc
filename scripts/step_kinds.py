"""Where a policy's generation spends its time, by kind of step: full, reuse, pruned
(docs/runtime.md "Where it stands").

    python scripts/step_kinds.py --engines /tmp/s2f --policy toca --rounds 3

One backend with block and step graphs, one module by module (`OrtBackend(blocks=False)`) or,
with `--versus DIR2`, the block graphs of another export of the same model, weights and sampler
(an A/B of two graph sets; --engines is opened first, so run it both ways round), the same
schedule (a baseline made for the exported sampler at --speedup); generations alternate
between them after one warm-up each. Per step: the median over the rounds of the executor call
(the model output of that step, CFG rows included); per kind of step: the sum over its steps,
and its share of the policy's FLOPs. "prune+reuse" is a step whose layers prune some modules
and reuse the others.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from soda.errors import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--policy", default="toca", help="full | fora | toca | duca | taylorseer")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--labels", default="1,7")
    ap.add_argument("--versus", help="a second engines folder of the same model, timed in place of the per-module path")
    args = ap.parse_args()

    from runtime.engines import open_engines, resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.errors import UserError
    from soda.generate import make_conditioning, make_executor
    from soda.sampling import initial_noise, make_diffusion, sample_loop
    from soda.schedule import parse_action

    engines = open_engines(args.engines)
    config, sampler = engines.config, engines.sampler_with()
    schedule = resolve_schedule(engines, sampler, args.policy, None, None if args.policy == "full" else args.speedup)
    cond = make_conditioning(config, args.labels, None, engines.null_caption(), sampler)
    kinds = ["skip" if st == "skip" else "+".join(sorted({parse_action(a)[0] for row in st for a in row}))
             for st in schedule.steps]
    times: dict[str, dict[int, list[float]]] = {}
    flops: dict[int, float] = {}
    entries = {}
    if args.versus:  # the same model, weights and sampler, or the A/B compares more than graph sets
        second = open_engines(args.versus)
        mine, theirs = ((e.manifest.model_hash, e.manifest.weights, e.sampler_with().to_dict()) for e in (engines, second))
        if mine != theirs:
            raise UserError(f"--versus {args.versus} holds another model, weights or sampler than {args.engines}")
    # opened in this order, --engines first: in A/Bs of identical graph sets here the two backends
    # differed by 1-4% with the open order (docs/runtime.md), so run an A/B both ways round
    first = OrtBackend(engines)
    other = ("versus", OrtBackend(second)) if args.versus else ("per-module", OrtBackend(engines, blocks=False))
    for name, backend in (("blocks", first), other):
        executor = make_executor(backend, config, schedule)
        times[name] = collections.defaultdict(list)

        def timed(s, x, t, c, executor=executor, into=times[name]):
            t0, f0 = time.perf_counter(), executor.flops_done
            out = executor(s, x, t, c)
            into[s].append(time.perf_counter() - t0)
            flops[s] = executor.flops_done - f0
            return out

        entries[name] = (executor, timed)
    diffusion = make_diffusion(sampler, config.learn_sigma)
    for r in range(args.rounds + 1):
        for name, (executor, timed) in entries.items():
            executor.reset()
            z, rng = initial_noise(len(cond), config.latent_shape, 0)
            sample_loop(executor if r == 0 else timed, diffusion, z, cond, None, config.in_channels, rng)
            if r == 0:
                times[name].clear()
    total = sum(flops.values())
    print(f"{config.name} {args.policy} at {args.speedup}x ({sampler.kind}-{sampler.steps}, {len(cond)} images), "
          f"{args.rounds} rounds, medians per step summed per kind:")
    per_flop = {}  # seconds per FLOP of each kind, on the block path
    for kind in dict.fromkeys(kinds):
        steps = [s for s, k in enumerate(kinds) if k == kind]
        sums = {name: sum(statistics.median(times[name][s]) for s in steps) for name in times}
        kind_flops = sum(flops[s] for s in steps)
        per_flop[kind] = sums["blocks"] / kind_flops if kind_flops else float("nan")
        versus = f", per FLOP {per_flop[kind] / per_flop['full']:.2f}x the full steps'" if "full" in per_flop else ""
        print(f"  {kind:<14} {len(steps):2d} steps, {kind_flops / total:6.1%} of the FLOPs: "
              + "  ".join(f"{name} {v * 1e3:8.1f} ms" for name, v in sums.items())
              + f"  blocks / {other[0]} {sums['blocks'] / sums[other[0]]:.3f}{versus}")
    all_ms = {name: sum(statistics.median(v) for v in times[name].values()) for name in times}
    print("  all steps:     " + "  ".join(f"{name} {v * 1e3:8.1f} ms" for name, v in all_ms.items()))


if __name__ == "__main__":
    from soda.errors import main_or_exit

    main_or_exit(main)  # a wrong folder, policy or model: one line, not a traceback
