"""Reduced-precision engines checked against their ONNX graphs in fp32, on real activations.

After `cli.py export --trt` builds fp16/bf16 TensorRT engines, each one runs on the inputs its
graph really sees in sampling -- recorded from a short generation with the exported graphs
in onnxruntime fp32 on the CPU (one label with CFG, the exported sampler at `steps` steps, the
middle step kept) -- and its outputs are compared with onnxruntime's on the same inputs.
Module graphs are also checked at every token count their engine has a profile for, on the
first n of the recorded tokens (the subset pruning would gather). Block and step graphs are fed
what the same step gives their modules: the recorded tokens entering the first layer and the
step's conditioning (a step graph: the step's latents, timesteps and labels or caption), each
given D and each pruned module's cache computed by that module's graph on its recorded inputs,
and k spread token indices for every profile's pruned count k. The error of a graph is
max |engine - onnx| / max |onnx| over its outputs and inputs; an engine above the tolerance
of its precision is refused.

Tolerances (of the output's max magnitude) are stated, not fitted: fp32 engines may use TF32
(10-bit mantissa) so 1e-3; fp16 has a 10-bit and bf16 a 7-bit mantissa, and a block's
LayerNorm/attention/MLP chain loses a few bits more: 2e-2 and 8e-2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 8e-2}

Runner = Callable[[str, tuple], list]  # (graph name, inputs in manifest order) -> outputs


def record_activations(folder: str | Path, steps: int = 3, label: int = 0, seed: int = 0) -> dict[str, tuple]:
    """{graph name: its inputs at the middle step} of a short fp32 generation (onnxruntime CPU)."""
    from runtime.engines import open_engines, resolve_schedule
    from runtime.ort_backend import OrtBackend
    from soda.generate import generate
    from soda.sampling import Conditioning

    engines = open_engines(folder, verify="size")
    backend = OrtBackend(engines, device="cpu", blocks=False)  # every per-module graph (block graphs: block_cases)
    sampler = engines.sampler_with(steps=steps)
    schedule = resolve_schedule(engines, sampler, "full")
    records: dict[str, tuple] = {}
    step = {"i": -1}
    run = backend._run

    def recording(name, inputs):
        step["i"] += name == "embed"
        if name == "condition" or step["i"] == steps // 2:
            records[name] = tuple(np.array(a, copy=True) for a in inputs)
        return run(name, inputs)

    backend._run = recording
    config = engines.config
    if config.interface.cond == ("y",):
        cond = Conditioning.from_labels(np.array([label]), config.null_label)
    else:  # a text model: a random caption and negative caption of the exported length
        from soda.generate import with_video

        rng = np.random.default_rng(seed)
        shape = (1, config.caption_len, config.caption_channels)
        mask = np.ones(shape[:2], np.float32)
        cond = Conditioning({"caption": rng.standard_normal(shape).astype(np.float32), "mask": mask},
                            {"caption": rng.standard_normal(shape).astype(np.float32), "mask": mask})
        cond = with_video(cond, config, sampler)
    generate(backend, config, sampler, schedule, cond, seed)
    return records


def token_subsets(name: str, inputs: tuple, input_names: tuple[str, ...], counts: list[int]) -> list[tuple]:
    """The recorded inputs, and for a graph with a "tokens" input of N tokens also its first n
    tokens for every other count n (the shapes the engine's pruned profiles run)."""
    if "tokens" not in input_names:
        return [inputs]
    i = input_names.index("tokens")
    N = inputs[i].shape[1]
    out = [inputs]
    for n in counts:
        if n < N:
            out.append(tuple(a[:, :n] if j == i else a for j, a in enumerate(inputs)))
    return out


def block_cases(engines, records: dict[str, tuple], reference: Runner, profiles: Callable[[str], list[dict]]
                ) -> dict[str, list[tuple]]:
    """{block graph: its inputs, one tuple per engine profile} assembled from the recorded module
    inputs of the same step (see module doc); blocks whose layers were not recorded are left out."""
    from runtime.trt_backend import axis_positions
    from soda.blocks import COMPUTE, COMPUTED_ONLY, GIVEN, PRUNED, context_name

    iface = engines.interface
    specs = {m.name: m for m in iface.modules}
    computed: dict[str, np.ndarray] = {}

    def module_D(key: str) -> np.ndarray:
        if key not in computed:
            computed[key] = np.asarray(reference(key, records[key])[0])
        return computed[key]

    def module_input(key: str, name: str):
        return records[key][engines.io(key)[0].index(name)]

    cases = {}
    for block in engines.block_graphs():
        keys = [f"{m.name}.{l}" for l in block.layers for m in iface.modules]
        keys.append("embed" if block.step else f"modulation.{block.first}")
        if not all(k in records for k in keys):
            continue
        if block.step:  # a whole step: the step's latents, timesteps and conditioning
            given = dict(zip(engines.io("embed")[0], records["embed"]))
        else:  # the tokens entering the first layer, the step's entries its modulation reads
            given = {"tokens": module_input(f"{iface.modules[0].name}.{block.first}", "tokens")}
            given.update(zip(engines.io(f"modulation.{block.first}")[0], records[f"modulation.{block.first}"]))
        B, N = module_input(f"{iface.modules[0].name}.{block.first}", "tokens").shape[:2]
        for l in block.layers:
            for m, c in zip(iface.modules, block.code):
                key = f"{m.name}.{l}"
                if c == GIVEN:
                    given[f"D.{key}"] = module_D(key)
                elif c == PRUNED:
                    given[f"cache.{key}"] = module_D(key)
                if c in (COMPUTE, COMPUTED_ONLY, PRUNED):
                    for n in specs[m.name].context:
                        given[context_name(iface, n, l)] = module_input(key, n)
        ins, _ = engines.io(block.name)
        axes = axis_positions(engines.manifest.artefacts[block.name].inputs)  # {n_<module>_<layer>: (idx input, dim)}
        feeds = []
        for p in profiles(block.name):
            feed = dict(given)
            for axis, (name, _) in axes.items():
                k = p["axes"][axis]
                feed[name] = np.tile(np.arange(k, dtype=np.int64) * N // k, (B, 1))  # k distinct tokens, spread
            feeds.append(tuple(feed[name] for name in ins))
        cases[block.name] = feeds
    return cases


def relative_error(got: list, want: list) -> float:
    """max over outputs of max |got - want| / max |want| (inf where shapes differ or non-finite)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            return float("inf")
        scale = float(np.max(np.abs(w))) or 1.0
        err = float(np.max(np.abs(g - w))) / scale
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst


def compare(records: dict[str, tuple], io: Callable[[str], tuple], counts: Callable[[str], list[int]],
            reference: Runner, candidate: Runner, blocks: dict[str, list[tuple]] | None = None) -> dict[str, float]:
    """{graph: worst relative error of `candidate` against `reference`} on the recorded inputs
    (and on `blocks`, {block graph: its input tuples}, from `block_cases`)."""
    errors = {}
    cases = {name: token_subsets(name, inputs, io(name)[0], counts(name)) for name, inputs in records.items()}
    for name, feeds in {**cases, **(blocks or {})}.items():
        ins, outs = io(name)
        worst = 0.0
        for feed in feeds:
            want = reference(name, feed)[:len(outs)]
            got = [np.asarray(g) for g in candidate(name, feed)[:len(outs)]]
            worst = max(worst, relative_error(got, want))
        errors[name] = worst
    return errors


def check_trt_engines(folder: str | Path, section: dict, precision: str, tolerance: float | None = None,
                      echo=print) -> dict:
    """Run every engine of `section` (the manifest's "trt" entry, just built) against onnxruntime
    fp32 on recorded activations; returns the section with each engine's error and the tolerance,
    or raises UserError naming the engines over it."""
    import tensorrt as trt

    from export.trt import profile_counts
    from runtime.device import CupyArrays
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from runtime.trt_backend import TrtEngine
    from soda.arrays import to_numpy
    from soda.errors import UserError

    folder = Path(folder)
    tol = TOLERANCE[precision] if tolerance is None else tolerance
    echo(f"checking the {precision} TensorRT engines against onnxruntime fp32 on recorded activations "
         f"(tolerance {tol:g} of each output's max) ...")
    records = record_activations(folder)
    engines = open_engines(folder, verify="size")
    reference = OrtBackend(engines, device="cpu")  # block graphs too: they are checked like the rest
    built = section["engines"]
    blocks = {name: feeds for name, feeds in
              block_cases(engines, records, reference._run, lambda name: built.get(name, {}).get("profiles", [])).items()
              if name in built}
    arrays = CupyArrays()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    loaded = {}

    def candidate(name, inputs):
        if name not in loaded:
            entry = section["engines"][name]
            e = loaded[name] = TrtEngine(trt, runtime, folder / entry["file"], entry["profiles"], arrays,
                                         engines.manifest.artefacts[name].inputs)
            e.scratch = arrays.empty((max(e.scratch_bytes, 1),), np.uint8)
            e.use_scratch(arrays.ptr(e.scratch), e.scratch_bytes)
        ins, outs = engines.io(name)
        return [to_numpy(o) for o in loaded[name](dict(zip(ins, inputs)), outs)]

    errors = compare(records, engines.io, lambda name: profile_counts(section["engines"][name]),
                     reference._run, candidate, blocks)
    section = {**section, "check": {"reference": "onnxruntime fp32 (CPU)", "activations": "recorded, middle step of "
                                    "a 3-step generation, 1 label with CFG (block graphs: assembled from the "
                                    "same step's module inputs, every profile)", "tolerance": tol,
                                    "worst": max(errors.values()),
                                    "unchecked": sorted(set(section["engines"]) - set(errors))}}
    section["engines"] = {name: {**e, "max_rel_err": errors.get(name)} for name, e in section["engines"].items()}
    bad = {n: e for n, e in errors.items() if not e <= tol}
    if bad:
        worst = ", ".join(f"{n} {e:.2g}" for n, e in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
        raise UserError(f"refusing {len(bad)} {precision} TensorRT engine(s) whose error against the fp32 ONNX graph "
                        f"exceeds {tol:g}: {worst}; export with --trt-precision fp32 (or bf16 -> fp16)")
    echo(f"TensorRT {precision}: worst error {section['check']['worst']:.2g} of the outputs' max (tolerance {tol:g})")
    return section
