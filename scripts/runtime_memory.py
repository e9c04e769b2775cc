"""Process memory of the onnxruntime runtime, weights shared or not (docs/runtime.md "Memory").

    python scripts/runtime_memory.py ENGINES_DIR --policy toca --rounds 3

Each entry runs in a fresh process: open `OrtBackend` on the folder (CPU), run two generations
of the policy (the first opens the block sessions the schedule uses), and report the resident
set after opening and after the generations, the peak, the second generation's seconds and a
hash of the samples. "own": every session loads its own weights (`share_weights=False`) and
keeps its own arena (before issue 17's memory work); "shared, no prepacking": one copy of the raw
weights (`runtime.shared_weights`), no packed copies, own arenas (the default until 1587524);
"shared": the same with a packed copy per session up to `PREPACK_MAX_BYTES` of weights;
"shared, one arena": the default now, the sessions' working memory from one CPU arena
(`register_shared_cpu_arena`); "shared, no prepacking, one arena": the least memory. The entries alternate for
`--rounds` rounds (RSS from the first round, seconds the median). Resident sizes are read from
/proc/self/status after `malloc_trim(0)` (glibc keeps freed memory otherwise); Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # soda from this checkout, as the children get it (PYTHONPATH)
VARIANTS = ("own", "shared, no prepacking", "shared", "shared, one arena", "shared, no prepacking, one arena")


def _memory() -> dict[str, int]:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) // 1024  # MiB
    return fields


def child(folder: str, policy: str, variant: str, labels: str) -> dict:
    import hashlib
    import time

    import numpy as np

    import runtime.ort_backend as ort_backend
    from runtime.engines import open_engines, resolve_schedule
    from soda.generate import generate, make_conditioning

    engines = open_engines(folder, verify="size")
    sampler = engines.sampler_with()
    ys = make_conditioning(engines.config, labels, None, engines.null_caption(), sampler)
    schedule = resolve_schedule(engines, sampler, None if policy == "exported" else policy)
    backend = ort_backend.OrtBackend(engines, device="cpu", share_weights=variant.startswith("shared"),
                                     prepack=False if "no prepacking" in variant else None,
                                     shared_arena="one arena" in variant)
    opened = _memory()
    generate(backend, engines.config, sampler, schedule, ys, 0)
    t = time.perf_counter()
    x, _ = generate(backend, engines.config, sampler, schedule, ys, 0)
    seconds = time.perf_counter() - t
    after = _memory()
    return {"variant": variant, "prepacked": backend.prepack, "one_arena": backend.shared_arena, "sessions": len(backend.sessions), "rss_open_mib": opened["VmRSS"],
            "rss_after_mib": after["VmRSS"], "anon_after_mib": after["RssAnon"], "file_after_mib": after["RssFile"],
            "peak_mib": after["VmHWM"], "seconds": round(seconds, 3),
            "samples_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]}


def main() -> None:
    from soda.errors import UserError, positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--policy", default="toca", help="full | fora | toca | duca | taylorseer | exported")
    ap.add_argument("--labels", default="1,2")
    ap.add_argument("--rounds", type=positive_int, default=1)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, args.policy, args.child, args.labels)))
        return
    from runtime.engines import open_engines

    open_engines(args.folder, verify="size")  # a wrong folder: one line here, not a child's traceback
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, args.folder, "--policy", args.policy, "--labels",
                                  args.labels, "--child", v], cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:  # a wrong policy or labels: the child's own last line
                last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                raise UserError(f"the {v} child failed: {last.removeprefix('error: ')}")
            runs[v].append(json.loads(out.stdout.splitlines()[-1]))
    for v, rs in runs.items():
        row = dict(rs[0], seconds=statistics.median(r["seconds"] for r in rs), rounds=len(rs))
        print(json.dumps(row))


if __name__ == "__main__":
    from soda.errors import main_or_exit

    main_or_exit(main)  # a wrong folder, model or policy: one line, not a traceback
