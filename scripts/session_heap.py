"""Does what a process did before an onnxruntime session was made change the session's speed?
(docs/runtime.md "Timing in one process".)

    python scripts/session_heap.py --engines /tmp/ddf --model dit-digits --calls 1000

One process makes five runtime backends of an engines folder (their per-module sessions), then
opens the step graph `step.0-{L-1}.cc` in four of them and one monolithic ONNX of the same model,
in this order:
  before         opened first
  after-profile  opened right after `soda.profile.profile` ran in the process (what `cli.py bench`
                 does between opening its backend and the first generation that opens the graph)
  after-another  opened after the profile and after the fifth backend opened the same graph
  last           opened after the monolithic session
Then it calls each of them and the monolithic session on the same inputs (2 images with CFG),
the order rotating every call; ratios are medians of per-call ratios to the monolithic call.
Weights are the model's own (dit-digits ships them); the times say nothing of image quality.
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


def main() -> None:
    from soda.errors import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", required=True, help="an engines folder made by `cli.py export`")
    ap.add_argument("--model", default="dit-digits", help="the model the folder was exported from")
    ap.add_argument("--calls", type=positive_int, default=1000)
    ap.add_argument("--profile-samples", type=positive_int, default=2)
    args = ap.parse_args()

    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.bench_runtime import monolithic_session
    from soda.models.loading import load_model
    from soda.profile import profile

    engines = open_engines(args.engines)
    config = engines.config
    model, _ = load_model(args.model)
    if model.config.hash() != config.hash():
        sys.exit(f"error: {args.engines} was not exported from {args.model}")
    step = f"step.0-{config.depth - 1}.cc"
    if step not in engines.manifest.artefacts:
        sys.exit(f"error: {args.engines} has no {step} (export it with `cli.py export`)")

    # Every backend (its per-module sessions) is made first, as bench makes its backend before the
    # profile; only the step graph's session is opened at the point each entry names.
    backends = {name: OrtBackend(engines, device="cpu") for name in ("before", "after-profile", "thrown away",
                                                                       "after-another", "last")}
    keep = {"before": backends["before"]._session(step)}
    profile(model, engines.sampler, samples=args.profile_samples, batch_size=args.profile_samples)
    keep["after-profile"] = backends["after-profile"]._session(step)
    backends["thrown away"]._session(step)
    keep["after-another"] = backends["after-another"]._session(step)
    mono = monolithic_session(model, Path(tempfile.mkdtemp()))
    keep["last"] = backends["last"]._session(step)

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, *config.latent_shape)).astype(np.float32),
             "t": np.full(4, 500, dtype=np.int64), "y": np.array([1, 7, config.num_classes, config.num_classes])}
    calls = {"monolithic": lambda: mono.run(["out"], feeds)}
    calls.update({name: (lambda s=session: s.run(None, feeds)) for name, session in keep.items()})
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for i in range(args.calls):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    mono_times = times["monolithic"]
    print(f"{step} per call, {args.calls} calls each, order rotating; median, and median of per-call ratios:")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, mono_times))
        print(f"  {name:<14} {statistics.median(ts) * 1e3:7.3f} ms  {ratio:.3f}x monolithic")


if __name__ == "__main__":
    from soda.errors import main_or_exit

    main_or_exit(main)  # a wrong folder, policy or model: one line, not a traceback
