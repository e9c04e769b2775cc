"""torch model + schedule -> an engines folder: ONNX subgraphs, one weights file, schedule.json,
manifest.json (and TensorRT engines with --trt).

The folder is built in a temporary sibling and renamed into place, so an interrupted export
leaves the previous artefacts intact. Every graph is checked (onnx.checker with its external
data, and onnxruntime CPU against soda.torch_backend.TorchBackend on random inputs) before
the folder is published. Same inputs (weights, model, schedule, sampler, opset, tools) as the
folder already holds: nothing is exported, the folder is reused and the caller is told.
"""
from __future__ import annotations

import inspect
import io
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from export.graphs import GraphSpec, block_specs, graph_specs, is_token_axis, video_axes
from export.manifest import (FORMAT, MANIFEST, describe_files, load_manifest, reuse_key, write_manifest)
from export.weights_store import WeightsStore
from soda import blocks as block_patterns
from soda.errors import UserError
from soda.schedule import Schedule
from soda.torch_backend import TorchBackend

EXPORT_VERSION = 7  # 3: block graphs (soda.blocks); 4: also for video models; 5: step graphs (a whole step, one graph); 6: "kk" step graphs (no scores); 7: the pruned step over every layer, rows by GatherND, default attributes dropped; bump when the graphs or their layout change: old folders are then re-exported
WEIGHTS_FILE = "weights.bin"
SCHEDULE_FILE = "schedule.json"
NULL_CAPTION_FILE = "null_caption.npy"  # a text model's learned unconditional caption, when it has one
PARITY_TOL = 1e-4  # fp32 max abs error, onnxruntime CPU vs PyTorch
PARITY_BATCH = 2
EXPORTERS = ("legacy", "dynamo")


@dataclass
class Row:
    name: str
    file: str
    bytes: int
    parity_max_abs: float
    seconds: float


@dataclass
class ExportResult:
    folder: Path
    reused: bool
    seconds: float
    rows: list[Row] = field(default_factory=list)
    weights_bytes: int = 0
    total_bytes: int = 0
    raw_fp32_bytes: int = 0
    trt: dict | None = None
    manifest_bytes: int = 0  # manifest.json, not in total_bytes (it lists the files it counts)


def tool_versions(exporter: str) -> dict:
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "exporter": exporter, "soda_export": EXPORT_VERSION}


def needed_modules(schedule: Schedule) -> set[tuple[int, str]]:
    """(layer, module) pairs some action computes (full or prune); reuse alone needs no graph."""
    need = set()
    for step in schedule.steps:
        if step == "skip":
            continue
        for l, row in enumerate(step):
            for m, a in enumerate(row):
                if a != "reuse":
                    need.add((l, schedule.modules[m]))
    return need


def export_model(model, weights_id: str, schedule: Schedule, sampler_cfg, out: str | Path, opset: int = 17,
                 exporter: str = "legacy", trt_precision: str | None = None, force: bool = False,
                 progress: bool = True, echo=print, replace: bool = False,
                 blocks: bool | list[block_patterns.Block] = True, check_engines: Callable | None = None) -> ExportResult:
    """Export `model` for `schedule` into `out` (see module doc). trt_precision: None (ONNX only),
    "fp16", "bf16" or "fp32" to also build TensorRT engines where TensorRT and a GPU exist; then
    `check_engines(folder, trt_section, precision, echo=...)` (the caller's, e.g.
    `runtime.engine_check.check_trt_engines`: it runs the loop to record activations, which export
    knows nothing of) checks every engine against its ONNX graph and returns the section to record.

    A folder holding a *different* export (another schedule, checkpoint, sampler, ...) is refused,
    saying what differs, unless `force` (always re-export) or `replace` (re-export when it differs,
    reuse when it is the same; for folders a pipeline owns, like the demo's). `blocks`: also export
    the block and step graphs of `soda.blocks.default_blocks` (fewer, larger calls;
    docs/runtime.md), or exactly the `soda.blocks.Block`s listed (tests make older layouts so)."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if trt_precision and check_engines is None:
        raise ValueError("TensorRT engines are only recorded checked: pass check_engines "
                         "(runtime.engine_check.check_trt_engines)")
    t0 = time.perf_counter()
    config = model.config
    out = Path(out)
    schedule.check_fits(config.name, config.hash(), sampler_cfg.kind, sampler_cfg.steps)
    if exporter == "dynamo":
        if video_axes(config):
            raise UserError("video graphs take the video size as dynamic axes, which the dynamo exporter cannot "
                            "trace (attention reshapes by the frame count); use --exporter legacy")
        opset = max(opset, 18)  # the dynamo exporter emits opset >= 18
    key_data = {"format": FORMAT, "model_hash": config.hash(), "weights": weights_id, "schedule_hash": schedule.hash(),
                "sampler": sampler_cfg.to_dict(), "opset": opset, "tools": tool_versions(exporter)}
    if blocks:
        key_data["blocks"] = {"format": block_patterns.FORMAT}
    seen = _current_key(out)
    reused = None if force else _try_reuse(out, reuse_key(key_data), schedule, replace, echo)
    if reused is not None:
        if trt_precision:
            _add_trt(out, reused.data, trt_precision, echo, check_engines)
        return _result_from_manifest(out, reused.data if not trt_precision else load_manifest(out, "size").data,
                                     True, time.perf_counter() - t0)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"refusing to replace {out}: it is not an export folder (no {MANIFEST}); choose another --out")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first: removed on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        data, rows = _export_into(tmp, model, weights_id, schedule, sampler_cfg, opset, exporter, key_data, progress,
                                  blocks)
        data["files"] = describe_files(tmp, _listed_files(data))
        data["weights_sha256"] = data["files"][WEIGHTS_FILE]["sha256"]
        for a in data["artefacts"].values():
            a["sha256"] = data["files"][a["file"]]["sha256"]
        if trt_precision:
            data["trt"] = _build_trt(tmp, data, trt_precision, echo, check_engines)
            if data["trt"]:
                data["files"].update(describe_files(tmp, [e["file"] for e in data["trt"]["engines"].values()]))
        data["export_seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, data)
        load_manifest(tmp)  # what the runtime will do: prove the folder validates before publishing it
        now = _current_key(out)
        if not (force or replace) and now not in (seen, reuse_key(key_data)):
            raise UserError(f"another export wrote {out} while this one ran ({'; '.join(_differences(now, reuse_key(key_data)))}); "
                            "not replacing it: re-run with --force to replace it, or choose another --out")
        _swap_into_place(tmp, out)
    except OSError as e:
        if e.errno is not None and not e.filename:  # e.g. a full disk while writing weights.bin: say where
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():  # a failed export leaves no folders it made for --out either
            for p in made:
                try:
                    p.rmdir()
                except OSError:
                    break
    res = _result_from_manifest(out, data, False, time.perf_counter() - t0)
    res.rows = rows
    return res


def _current_key(out: Path) -> dict | None:
    """What the export in `out` was made from (its reuse key), or None when there is none."""
    import json

    try:
        return reuse_key(json.loads((out / MANIFEST).read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def _differences(old: dict, new: dict) -> list[str]:
    names = {"format": "format", "model_hash": "model", "weights": "weights", "schedule_hash": "schedule",
             "sampler": "sampler", "opset": "opset", "tools": "tool versions", "blocks": "block graphs"}
    return [f"{names.get(k, k)} {_brief(old.get(k))} -> {_brief(new.get(k))}" for k in new if old.get(k) != new.get(k)]


def _brief(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={w}" for k, w in v.items())
    return str(v)[:16] if isinstance(v, str) and len(str(v)) > 24 else str(v)


def _try_reuse(out: Path, key: dict, schedule: Schedule, replace: bool, echo):
    if not (out / MANIFEST).is_file():
        return None
    try:
        m = load_manifest(out)
    except UserError as e:
        echo(f"note: the existing export is not usable ({e}); exporting again")
        return None
    if not m.same_inputs(key):
        if replace:
            return None
        what = _differences(reuse_key(m.data), key)
        if m.schedule_hash != key["schedule_hash"]:
            try:
                old_policy = Schedule.load(m.schedule_path).policy
            except UserError:
                old_policy = "?"
            what = [f"schedule {old_policy} -> {schedule.policy}"] + [w for w in what if not w.startswith("schedule ")]
        raise UserError(f"{out} holds another export ({'; '.join(what)}); --force replaces it, or choose another --out")

    echo(f"reuse: {out} already holds this export (same weights, model, schedule, sampler, opset, tools); "
         "nothing to do (--force re-exports)")
    return m


def _export_into(folder: Path, model, weights_id, schedule, sampler_cfg, opset, exporter, key_data, progress,
                 blocks: bool | list = True):
    from tqdm import tqdm

    config = model.config
    specs = graph_specs(model, needed_modules(schedule))
    if blocks is True:
        chosen = block_patterns.default_blocks(config.interface, config.depth, schedule)
    else:
        chosen = list(blocks or [])
    specs += block_specs(model, chosen)
    counts = schedule.token_counts(config.num_tokens)
    schedule.save(folder / SCHEDULE_FILE)
    backend = TorchBackend(model)
    gen = torch.Generator().manual_seed(0)
    artefacts, rows = {}, []
    with WeightsStore(folder / WEIGHTS_FILE) as store, torch.inference_mode(False), torch.no_grad():
        for spec in tqdm(specs, desc="export", unit="graph", disable=not progress):
            t = time.perf_counter()
            proto = compact_names(default_attributes_dropped(shared_constants(export_graph(spec, config, opset, exporter, gen))))
            placed = store.externalize(proto)
            path = folder / spec.file
            onnx.save_model(proto, str(path))
            onnx.checker.check_model(str(path))
            err = check_parity(spec, path, backend, config, counts, gen)
            if not err <= PARITY_TOL:
                raise RuntimeError(f"{spec.name}: onnxruntime differs from PyTorch by {err:.3g} > {PARITY_TOL}")
            artefacts[spec.name] = {
                "file": spec.file, "sha256": None, "bytes": path.stat().st_size,
                "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in spec.inputs],
                "outputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in spec.outputs],
                "parity_max_abs": float(err), "initializers": placed,
            }
            rows.append(Row(spec.name, spec.file, path.stat().st_size, float(err), time.perf_counter() - t))
        weights_bytes = store.bytes_written
    data = {
        **key_data, "model": config.to_dict(),
        "checkpoint_sha256": None if weights_id.startswith("random-init") else weights_id,
        "weights_file": WEIGHTS_FILE, "weights_sha256": None,
        "weights_bytes": weights_bytes, "raw_fp32_bytes": raw_fp32_bytes(model), "token_counts": counts,
        "artefacts": artefacts, "schedule": SCHEDULE_FILE, "trt": None, "null_caption": None,
    }
    if blocks:  # absent in older folders: the runtime then runs module by module
        data["blocks"] = {"format": block_patterns.FORMAT, "graphs": [b.name for b in chosen]}
    null = model.null_caption_table() if hasattr(model, "null_caption_table") else None
    if null is not None:  # the runtime's unconditional rows when --prompt-embeds has no negatives
        np.save(folder / NULL_CAPTION_FILE, null.astype(np.float32))
        data["null_caption"] = NULL_CAPTION_FILE
    return data, rows


def raw_fp32_bytes(model) -> int:
    return sum(t.numel() * 4 for t in model.state_dict().values())


def export_graph(spec: GraphSpec, config, opset: int, exporter: str, gen: torch.Generator) -> onnx.ModelProto:
    """One subgraph as an in-memory ModelProto with weights inline (moved out by WeightsStore)."""
    N = config.num_tokens
    args = spec.example(PARITY_BATCH, N, gen, config.num_classes, config.caption_len, video_axes(config))
    names_in, names_out = [n for n, _, _ in spec.inputs], [n for n, _, _ in spec.outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buf = io.BytesIO()
            torch.onnx.export(spec.module, args, buf, input_names=names_in, output_names=names_out,
                              dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True,
                              dynamo=False)
            return onnx.load_from_string(buf.getvalue())
        dims = {"B": torch.export.Dim("B", min=1, max=4096), "L": torch.export.Dim("L", min=1, max=4096)}
        for _, shape, _ in spec.inputs:
            dims.update({d: torch.export.Dim(d, min=1, max=max(N, 2)) for d in shape if is_token_axis(d)})
        dynamic = _by_signature(spec.module, [{i: dims[d] for i, d in enumerate(s) if isinstance(d, str)}
                                              for _, s, _ in spec.inputs])
        prog = torch.onnx.export(spec.module, args, input_names=names_in, output_names=names_out,
                                 dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)
        return prog.model_proto


def _by_signature(module: torch.nn.Module, shapes: list) -> tuple:
    """torch.export's dynamic shapes in the structure of `module.forward`'s arguments: the graphs'
    forwards take their inputs as `*inputs` (or `tokens, *inputs`), which torch.export sees as one
    tuple argument, and their names are not the graph's input names."""
    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return (*shapes[:fixed], tuple(shapes[fixed:]))
    return tuple(shapes)


def compact_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Short names for a graph's intermediate values ("v<i>") and initializers ("w<i>"), and no
    node names (in place): the exporter's scope paths ("/blocks.1/attn/Reshape_output_0") were
    2/3 of a block graph's bytes, and the parameter paths ("model.blocks.3.attn.qkv.weight",
    written once per initializer and once per use) a tenth of dit-digits' graphs. Where each
    initializer lies in weights.bin is in the manifest (`initializers`). Inputs and outputs keep
    their names; graphs with subgraphs are left as they are."""
    g = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return proto
    keep = {v.name for v in [*g.input, *g.output]}
    names: dict[str, str] = {}
    for i, t in enumerate(g.initializer):
        if t.name not in keep:
            names[t.name] = f"w{i}"
            t.name = names[t.name]
    values = 0
    for node in g.node:
        node.name = ""
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                names[name] = node.output[i] = f"v{values}"
                values += 1
    for vi in g.value_info:
        vi.name = names.get(vi.name, vi.name)
    return proto


def shared_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """One Constant node per distinct value (in place): the exporter emits a fresh node for every
    use of 0, 1, an axis list or a LayerNorm's ones, 169 nodes with 19 values in a 4-layer block
    graph, 1/4 of the graphs' bytes on dit-digits (docs/export.md "Size"). onnxruntime merges them
    at load anyway (common subexpression elimination), so nothing that runs changes."""
    g = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return proto
    graph_outputs = {v.name for v in g.output}
    first: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for node in g.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        if node.op_type == "Constant" and node.output[0] not in graph_outputs:
            key = b"".join(a.SerializeToString() for a in node.attribute)
            if key in first:
                alias[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        kept.append(node)
    if alias:
        del g.node[:]
        g.node.extend(kept)
        vis = [vi for vi in g.value_info if vi.name not in alias]
        del g.value_info[:]
        g.value_info.extend(vis)
    return proto


def default_attributes_dropped(proto: onnx.ModelProto) -> onnx.ModelProto:
    """No attribute that only restates its default at the graph's opset (in place): the exporter
    writes every Gemm's alpha = beta = 1 and transA = 0, and the like; an absent attribute means its
    default (the ONNX spec), so nothing that runs changes. 6.5% of dit-digits' graph bytes."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return proto
    for node in proto.graph.node:
        if not node.attribute or node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        kept = [a for a in node.attribute if not _is_default(schema.attributes.get(a.name), a)]
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)
    return proto


def _is_default(declared, attr: onnx.AttributeProto) -> bool:
    if declared is None or not declared.default_value.name:  # unknown, or required (no default)
        return False
    value = onnx.helper.get_attribute_value
    return declared.default_value.type == attr.type and value(declared.default_value) == value(attr)


def _reference(spec: GraphSpec, backend: TorchBackend, args: list[np.ndarray]) -> list[np.ndarray]:
    """The same computation through TorchBackend (the executor's reference backend)."""
    iface = backend.interface
    kind, _, layer = spec.name.partition(".")
    if kind in ("block", "step"):
        return _block_reference(spec, backend, args)
    if kind == "condition":
        ctx = backend.prepare(dict(zip(iface.condition_reads, args)))
        return [ctx[name] for name, _, _ in spec.outputs]
    if kind == "embed":
        tokens, step = backend.embed(args[0], args[1], dict(zip(iface.embed_context, args[2:])))
        return [tokens, *step]
    if kind == "final":
        given = dict(zip(iface.final_step, args[1:]))
        return [backend.final(args[0], tuple(given.get(n) for n in iface.step))]
    if kind == "modulation":
        given = dict(zip(iface.modulation_reads, args))
        mods = backend.modulation(int(layer), tuple(given.get(n) for n in iface.step))
        return [v for m in iface.modules for v in (*mods[m.name][0], *((mods[m.name][1],) if m.gated else ()))]
    m = iface.spec(kind)
    D, received = backend.module(int(layer), kind, args[0], *args[1:1 + len(m.args)],
                                 context=dict(zip(m.context, args[1 + len(m.args):])))
    return [D] + ([received] if received is not None else [])


def other_video(config) -> dict:
    """Another video size than the exported one (one more latent frame, a larger height that is
    not a multiple of the patch, a smaller width: another token count and position-embedding base),
    at which video graphs are checked too: their size axes are dynamic."""
    axes = video_axes(config)
    if not axes:
        return {}
    p = config.patch_size
    T, H, W = axes["T"] + 1, axes["H"] + 2 * p + 1, max(1, axes["W"] - p)
    return {"T": T, "H": H, "W": W, "N": T * -(-H // p) * -(-W // p)}


def _block_reference(spec: GraphSpec, backend: TorchBackend, args: list[np.ndarray]) -> list[np.ndarray]:
    """A block or step graph's outputs the executor's way: (embed,) modulation, module calls and
    numpy residuals (, final)."""
    iface = backend.interface
    block = block_patterns.parse_name(spec.name)
    given = dict(zip((n for n, _, _ in spec.inputs), args))
    if block.step:
        x, step = backend.embed(given["x"], given["t"], {n: given[n] for n in iface.embed_context})
    else:
        x, step = given["tokens"], tuple(given.get(n) for n in iface.step)
    outs = []
    for l in block.layers:
        mods = backend.modulation(l, step)
        for m, c in zip(iface.modules, block.code):
            key = f"{m.name}.{l}"
            margs, gate = mods[m.name]
            names = [block_patterns.context_name(iface, n, l) for n in m.context] if c != block_patterns.GIVEN else []
            ctx = {n: given[n] for n in names}
            if c == block_patterns.GIVEN:
                D = given[f"D.{key}"]
            elif c in (block_patterns.COMPUTE, block_patterns.COMPUTED_ONLY, block_patterns.KEPT):
                D, score = backend.module(l, m.name, x, *margs, context=ctx)
                if c != block_patterns.COMPUTED_ONLY:
                    outs += [D] + ([score] if m.score and c == block_patterns.COMPUTE else [])
            else:
                idx = given[f"idx.{key}"]
                rows = np.arange(len(idx))[:, None]
                part, score = backend.module(l, m.name, x[rows, idx], *margs, context=ctx)
                D = given[f"cache.{key}"].copy()
                D[rows, idx] = part
                outs += [D, part] + ([score] if m.score else [])
            x = x + gate[:, None, :] * D if m.gated else x + D
    return [backend.final(x, step), x] + outs if block.step else [x] + outs


def check_parity(spec: GraphSpec, path: Path, backend: TorchBackend, config, counts: list[int],
                 gen: torch.Generator) -> float:
    """Max abs error of onnxruntime (CPU) vs PyTorch over random inputs; module graphs are run
    at every token count the schedule uses (and N/4, so the dynamic axis is always exercised),
    video graphs also at another video size (`other_video`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    has_n = any(is_token_axis(d) for _, shape, _ in spec.inputs for d in shape)
    token_ns = sorted({*counts, max(1, config.num_tokens // 4)}) if has_n else [config.num_tokens]
    sized = any(d in ("T", "N") for _, shape, _ in spec.inputs + spec.outputs for d in shape)
    videos = [video_axes(config)] + ([other_video(config)] if sized else [])
    worst = 0.0
    # A block graph's recomputed tokens are indices into the video's N tokens: at most N of them.
    for n, video in [(m, v) for v in videos for m in sorted({min(n, v.get("N", n)) for n in token_ns})]:
        # Caption graphs are checked at a caption length other than the traced one (dynamic L).
        args = [a.numpy() for a in spec.example(PARITY_BATCH, n, gen, config.num_classes,
                                                 max(1, (config.caption_len or 2) // 2), video)]
        got = sess.run(None, {name: a for (name, _, _), a in zip(spec.inputs, args)})
        want = _reference(spec, backend, args)
        err = _max_err(spec, n, got, want)
        if not err <= PARITY_TOL:
            # One try, no best-of-N: a reference that disagrees with itself is a bug to see, not to
            # average away (it once was: the model left in training mode, docs/export.md "Parity").
            again = _max_err(spec, n, want, _reference(spec, backend, args))
            raise RuntimeError(f"{spec.name}: onnxruntime differs from PyTorch by {err:.3g} > {PARITY_TOL} at n={n}; "
                               f"PyTorch recomputed on the same inputs differs from its first result by {again:.3g}")
        worst = max(worst, err)
    return worst


def _max_err(spec: GraphSpec, n: int, got: list, want: list) -> float:
    """Max abs error over the outputs; block graphs and a module's per-token score count relative to
    their magnitude when that exceeds 1 (float32 rounding of values in the hundreds is ~1e-4)."""
    if len(got) != len(want):
        raise RuntimeError(f"{spec.name}: {len(got)} outputs, PyTorch gives {len(want)}")
    score = getattr(getattr(spec.module, "spec", None), "score", None)
    worst = 0.0
    for (name, _, _), g, w in zip(spec.outputs, got, want):
        if g.shape != w.shape:
            raise RuntimeError(f"{spec.name}: output shape {g.shape} != PyTorch {w.shape} at n={n}")
        if not np.isfinite(w).all():
            raise UserError(f"graph {spec.name}: PyTorch gives non-finite outputs (NaN or inf) on random inputs; "
                            "the weights hold NaN or inf values")
        err = float(np.max(np.abs(g.astype(np.float64) - w)))
        # Relative above magnitude 1: a block graph's residual sums grow with the gates; a module's
        # per-token score is only ranked, and DuCa's value norms are sums of |v| in the hundreds.
        if spec.name.startswith(("block.", "step.")) or (score is not None and name == score):
            err /= max(1.0, float(np.max(np.abs(w))))
        worst = max(worst, err if np.isfinite(err) else float("inf"))  # max(0.0, nan) would keep 0.0
    return worst


def _listed_files(data: dict) -> list[str]:
    extra = [data["null_caption"]] if data.get("null_caption") else []
    return [a["file"] for a in data["artefacts"].values()] + [WEIGHTS_FILE, SCHEDULE_FILE] + extra


def _build_trt(folder: Path, data: dict, precision: str, echo, check_engines: Callable) -> dict | None:
    """Build (or reuse) the engines, then `check_engines` checks each against its ONNX graph in
    fp32 on recorded activations; engines over the tolerance are refused (UserError)."""
    from export.trt import build_engines

    section = build_engines(folder, data, precision, echo=echo)
    if section is None:
        return None
    if not (folder / MANIFEST).is_file():  # a fresh export: the graphs' manifest, so the runtime can open them
        write_manifest(folder, {k: v for k, v in data.items() if k != "trt"})
    return check_engines(folder, section, precision, echo=echo)


def _add_trt(out: Path, data: dict, precision: str, echo, check_engines: Callable) -> None:
    """TensorRT for a reused ONNX export: build (or find cached) engines in place, update the manifest."""
    trt = _build_trt(out, data, precision, echo, check_engines)
    if trt is None or trt == data.get("trt"):
        return
    data = dict(data, trt=trt)
    data["files"] = {**data["files"], **describe_files(out, [e["file"] for e in trt["engines"].values()])}
    write_manifest(out, data)


def _remove_stale_siblings(out: Path) -> None:
    """Temporary folders left by an export that was killed (its pid no longer runs)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _result_from_manifest(out: Path, data: dict, reused: bool, seconds: float) -> ExportResult:
    rows = [Row(n, a["file"], a["bytes"], a["parity_max_abs"], 0.0) for n, a in data["artefacts"].items()]
    total = sum(f["bytes"] for f in data.get("files", {}).values()) if data.get("files") else 0
    manifest = out / MANIFEST
    return ExportResult(out, reused, seconds, rows, data["weights_bytes"], total, data["raw_fp32_bytes"], data.get("trt"),
                        manifest.stat().st_size if manifest.is_file() else 0)


def summary(res: ExportResult) -> list[str]:
    """The table printed at the end: every file, its size, its parity error, its time."""
    lines = [f"{'artefact':<16} {'file':<20} {'size':>10} {'parity max|err|':>16} {'time':>7}"]
    for r in res.rows:
        t = f"{r.seconds:6.2f}s" if r.seconds else "      -"
        lines.append(f"{r.name:<16} {r.file:<20} {_size(r.bytes):>10} {r.parity_max_abs:>16.2e} {t:>7}")
    ratio = res.total_bytes / res.raw_fp32_bytes if res.raw_fp32_bytes else float("nan")
    lines.append(f"{'weights':<16} {WEIGHTS_FILE:<20} {_size(res.weights_bytes):>10}")
    lines.append(f"total on disk {_size(res.total_bytes)} = {ratio:.3f}x the raw fp32 weights ({_size(res.raw_fp32_bytes)}), "
                 f"{MANIFEST} {_size(res.manifest_bytes)} besides; "
                 f"worst parity {max((r.parity_max_abs for r in res.rows), default=0):.2e} (tolerance {PARITY_TOL:g}); "
                 f"{'reused' if res.reused else 'exported'} in {res.seconds:.1f} s -> {res.folder}")
    if res.trt:
        lines.append(f"TensorRT: {len(res.trt['engines'])} engines, {res.trt['precision']}, {res.trt['gpu']}, "
                     f"TensorRT {res.trt['version']}")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
