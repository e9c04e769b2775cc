"""The stitching loop's hot array operations on numpy vs torch (CPU), at DiT-XL/2 shapes:
what the namespace costs per call (docs/runtime.md, "Array namespace"). Interleaved rounds,
median per op; prints one line per op.

    python scripts/namespace_ops.py --rows 16 --tokens 256 --hidden 1152 --keep 102
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--keep", type=int, default=102)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    a = ap.parse_args(argv)
    import torch

    from soda.arrays import copy, namespace, rows
    from soda.selectors import top_k
    from soda.selectors.baselines import ToCaAttentionSelector
    from soda.selectors.feature_mean import FeatureMeanSelector

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    B, N, D, k = a.rows, a.tokens, a.hidden, a.keep
    data = {"tokens": rng.standard_normal((B, N, D), dtype=np.float32),
            "D": rng.standard_normal((B, N, D), dtype=np.float32),
            "gate": rng.standard_normal((B, D), dtype=np.float32),
            "received": rng.random((B, N), dtype=np.float32),
            "idx": np.sort(rng.permuted(np.tile(np.arange(N), (B, 1)), axis=1)[:, :k], axis=1)}
    libs = {"numpy": data, "torch": {k_: torch.from_numpy(v) for k_, v in data.items()}}

    def ops(d):
        xp = namespace(d["tokens"])
        r = rows(xp, B, d["tokens"])
        fm = FeatureMeanSelector()
        toca = ToCaAttentionSelector(interval=3, skip_steps=[4, 9])
        toca.observe(0, 0, "attn", None, d["D"], d["received"])
        return {
            "namespace()": lambda: namespace(d["tokens"]),
            "residual x + g*D": lambda: d["tokens"] + d["gate"][:, None, :] * d["D"],
            "gather k tokens": lambda: d["tokens"][r, d["idx"]],
            "cache copy + scatter": lambda: copy(xp, d["D"]).__setitem__((r, d["idx"]), d["D"][r, d["idx"]]),
            "top-k [B, N]": lambda: top_k(d["received"], k),
            "feature-mean select": lambda: fm.select(5, 0, "attn", k, d["tokens"], d["D"]),
            "ToCa score + select": lambda: toca.select(5, 0, "attn", k, d["tokens"], d["D"]),
        }

    table = {lib: ops(d) for lib, d in libs.items()}
    times = {(lib, op): [] for lib in table for op in table[lib]}
    for _ in range(a.rounds):
        for op in table["numpy"]:
            for lib in table:
                fn = table[lib][op]
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    fn()
                times[(lib, op)].append((time.perf_counter() - t0) / a.calls * 1e6)
    print(f"shapes [B={B}, N={N}, D={D}], k={k}; us per call, median of {a.rounds} interleaved rounds x {a.calls} "
          f"calls; 1 thread; load average {os.getloadavg()[0]:.1f}")
    print(f"{'op':<24}{'numpy':>10}{'torch':>10}{'torch/numpy':>13}")
    for op in table["numpy"]:
        n, t = statistics.median(times[("numpy", op)]), statistics.median(times[("torch", op)])
        print(f"{op:<24}{n:10.1f}{t:10.1f}{t / n:13.2f}")


if __name__ == "__main__":
    main()
