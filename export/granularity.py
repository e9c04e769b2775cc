"""Measure the subgraph granularity choice with onnxruntime on the CPU (run once; numbers go to
docs/export.md):

(a) a per-module graph with a dynamic token axis at n = N and n = N/4, vs graphs exported
    with static shapes for exactly those n;
(b) the fixed cost of one tiny session.run (what every extra graph call adds);
(c) one block stitched from per-module graphs (modulation + attn + mlp, residuals in numpy,
    as the runtime does) vs one whole-block graph.

    python -m export.granularity --model dit-s-2 --rows 2
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from export.graphs import ModulationGraph, ModuleGraph
from soda.models.loading import load_model


def _export(module, args, names_in, names_out, dynamic: dict | None) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def _session(blob: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def _time(*fns, repeats: int) -> list[tuple[float, float]]:
    """(min, median) wall ms of each fn, calls interleaved (A, B, A, B, ...) so that load from
    other processes hits every variant alike; 3 warm-up rounds first."""
    times = [[] for _ in fns]
    for r in range(repeats + 3):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            if r >= 3:
                ts.append(time.perf_counter() - t)
    return [(min(ts) * 1000, statistics.median(ts) * 1000) for ts in times]


class _Block(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, tokens, c):
        return self.block(tokens, c)


def measure(model_name: str, rows: int, threads: int, repeats: int) -> list[tuple[str, tuple[float, float]]]:
    model, _ = load_model(model_name, random_init=True)
    cfg = model.config
    N, D = cfg.num_tokens, cfg.hidden_size
    block = model.blocks[0]
    rng = np.random.default_rng(0)
    res = []
    tok = {n: rng.standard_normal((rows, n, D)).astype(np.float32) for n in (N, N // 4)}
    vec = rng.standard_normal((rows, D)).astype(np.float32)
    with torch.no_grad():
        for m in cfg.modules:
            outs = ["D", "received"] if m == "attn" else ["D"]
            args = (torch.from_numpy(tok[N]), torch.from_numpy(vec), torch.from_numpy(vec))
            dyn_axes = {"tokens": {0: "B", 1: "n"}, "shift": {0: "B"}, "scale": {0: "B"}, "D": {0: "B", 1: "n"}}
            dyn = _session(_export(ModuleGraph(model, 0, m), args, ["tokens", "shift", "scale"], outs, dyn_axes), threads)
            for n in (N, N // 4):
                feeds = {"tokens": tok[n], "shift": vec, "scale": vec}
                sargs = (torch.from_numpy(tok[n]), torch.from_numpy(vec), torch.from_numpy(vec))
                static = _session(_export(ModuleGraph(model, 0, m), sargs, ["tokens", "shift", "scale"], outs, None), threads)
                a, b = _time(lambda: dyn.run(None, feeds), lambda: static.run(None, feeds), repeats=repeats)
                res += [(f"(a) {m} n={n}: dynamic-n graph", a), (f"(a) {m} n={n}: static-shape graph", b)]
        # (b) the fixed cost of a call: one Identity on a 1-element tensor
        g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "tiny",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
        tiny = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), threads)
        one = np.zeros(1, np.float32)
        res.append(("(b) session.run of a 1-element Identity graph", _time(lambda: tiny.run(None, {"a": one}),
                                                                           repeats=repeats * 10)[0]))
        # (c) stitched per-module graphs vs one whole-block graph
        c = rng.standard_normal((rows, D)).astype(np.float32)
        args = (torch.from_numpy(tok[N]), torch.from_numpy(c))
        whole = _session(_export(_Block(block), args, ["tokens", "c"], ["out"],
                                 {"tokens": {0: "B", 1: "n"}, "c": {0: "B"}, "out": {0: "B", 1: "n"}}), threads)
        order = cfg.modules
        mod_names = [f"{k}_{m}" for m in order for k in ("shift", "scale", "gate")]
        modg = _session(_export(ModulationGraph(model, 0, ("c",)), (torch.from_numpy(c),), ["c"], mod_names, {"c": {0: "B"}}),
                        threads)
        mods = {}
        for m in order:
            outs = ["D", "received"] if m == "attn" else ["D"]
            a3 = (torch.from_numpy(tok[N]), torch.from_numpy(vec), torch.from_numpy(vec))
            mods[m] = _session(_export(ModuleGraph(model, 0, m), a3, ["tokens", "shift", "scale"], outs,
                                       {"tokens": {0: "B", 1: "n"}, "shift": {0: "B"}, "scale": {0: "B"}}), threads)

        def stitched():
            shift_scale_gate = modg.run(None, {"c": c})
            x = tok[N]
            for i, m in enumerate(order):
                shift, scale, gate = shift_scale_gate[3 * i: 3 * i + 3]
                d = mods[m].run(None, {"tokens": x, "shift": shift, "scale": scale})[0]
                x = x + gate[:, None, :] * d
            return x

        ref = whole.run(None, {"tokens": tok[N], "c": c})[0]
        err = float(np.max(np.abs(stitched() - ref)))
        a, b = _time(lambda: whole.run(None, {"tokens": tok[N], "c": c}), stitched, repeats=repeats)
        res += [("(c) whole-block graph", a), (f"(c) stitched modulation+attn+mlp graphs + numpy residual "
                                                f"(max|diff| {err:.1e})", b)]
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-s-2")
    p.add_argument("--rows", type=int, default=2, help="batch rows (CFG doubles the images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = measure(a.model, a.rows, a.threads, a.repeats)
    print(f"{a.model}, rows={a.rows}, onnxruntime {ort.__version__} CPU, {a.threads} threads, {a.repeats} interleaved runs")
    print("| measurement | min ms | median ms |\n| --- | ---: | ---: |")
    for name, (lo, med) in rows:
        print(f"| {name} | {lo:.3f} | {med:.3f} |")


if __name__ == "__main__":
    main()
