"""Block graphs against module by module on a text-to-video engines folder (`bench --backend ort
--timing-per-module` times label-conditioned models only): every policy through
`OrtBackend(blocks=True)` and `OrtBackend(blocks=False)` in interleaved rounds (the order of the
two paths alternating), graph calls per step counted; medians, and the median of per-round
ratios (docs/runtime.md, "Open-Sora").

    python cli.py export --model opensora-tiny --random-init --policy toca --out /tmp/osb_eng
    python scripts/video_blocks_timing.py --engines /tmp/osb_eng --prompt-embeds t2v8.npz --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.bench_runtime import CallCounter
    from soda.captions import caption_conditioning, load_prompt_embeds
    from soda.errors import UserError, positive_int
    from soda.generate import generate, with_video
    from soda.models.loading import load_model
    from soda.models.opensora import apply_video
    from soda.pipeline import resolve_schedule
    from soda.policies import PROFILED
    from soda.profile import profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--prompt-embeds", required=True, help="npz: the first 2 captions calibrate SODA, the next 2 are timed")
    ap.add_argument("--policies", default="full,fora,toca,duca,soda")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args()

    engines = open_engines(args.engines)
    model, weights = load_model(engines.config.name, random_init=True)  # the random-init model of the export
    apply_video(model, *engines.sampler.video)
    sampler = engines.sampler
    prompts = load_prompt_embeds(args.prompt_embeds, model.config.caption_channels)
    if len(prompts.embeds) < 4:
        raise UserError(f"{args.prompt_embeds} holds {len(prompts.embeds)} captions; give at least 4 "
                        f"(2 calibrate SODA, 2 are timed)")
    cap = caption_conditioning(prompts, model.null_caption_table())
    cond = with_video(cap, model.config, sampler)
    calib, timed = cond.rows(slice(0, 2)), cond.rows(slice(2, 4))
    prof = profile(model, sampler, samples=2, seed=0, batch_size=2, conditioning=calib, weights=weights)
    schedules = {pol: resolve_schedule(model, weights, sampler, pol, speedup=None if pol == "full" else args.speedup,
                                       profile_file=prof if pol in PROFILED else None, echo=lambda *a: None)
                 for pol in args.policies.split(",")}
    paths = {"blocks": OrtBackend(engines), "per-module": OrtBackend(engines, blocks=False)}
    counters = {k: CallCounter(b) for k, b in paths.items()}
    times: dict = {}
    calls: dict = {}
    for b in paths.values():
        generate(b, engines.config, sampler, schedules["full"], timed, seed=1)  # warm-up
    for r in range(args.rounds):
        for pol, schedule in schedules.items():
            for k, b in (list(paths.items()) if r % 2 == 0 else list(paths.items())[::-1]):
                n0 = counters[k].n
                t = time.perf_counter()
                generate(b, engines.config, sampler, schedule, timed, seed=1)
                times.setdefault((pol, k), []).append(time.perf_counter() - t)
                calls[(pol, k)] = (counters[k].n - n0) / sampler.steps
    print(f"{engines.config.name} {sampler.kind}-{sampler.steps} CFG {sampler.cfg_scale:g}, 2 captions (4 rows), "
          f"{args.rounds} interleaved rounds, medians")
    print(f"{'policy':<14} {'calls/step blocks':>17} {'per-module':>10} {'s blocks':>9} {'s per-module':>12} "
          f"{'blocks / per-module':>19}")
    for pol in schedules:
        tb, tm = times[(pol, "blocks")], times[(pol, "per-module")]
        ratio = statistics.median(a / b for a, b in zip(tb, tm))
        print(f"{pol:<14} {calls[(pol, 'blocks')]:>17.2f} {calls[(pol, 'per-module')]:>10.2f} "
              f"{statistics.median(tb):>9.3f} {statistics.median(tm):>12.3f} {ratio:>19.3f}")


if __name__ == "__main__":
    from soda.errors import main_or_exit

    main_or_exit(main)  # a wrong folder, model or policy: one line, not a traceback
