"""The subgraphs the runtime calls, as small torch modules over the model adapter's protocol.

One graph per (layer, module) with a dynamic token axis "n" serves full compute AND every
prune rate (pruning gathers tokens before the module); reuse needs no graph; the residual
`x + gate * D` is done by the runtime. A video model's graphs also take the video as dynamic
axes (latent frames "T", height "H", width "W", tokens "N"), so one export runs any video size. A "condition" graph (architectures with per-generation
work, e.g. PixArt's caption K/V) runs once per generation. Names and shapes here ARE the
runtime interface; they come from the architecture's `soda.models.interface.Interface`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from soda.blocks import COMPUTE, COMPUTED_ONLY, GIVEN, KEPT, Block, context_name

F32, I64 = "float32", "int64"


class ConditionGraph(nn.Module):
    """Per generation: conditioning -> the prepared context entries, in interface order."""

    def __init__(self, model, names: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs

    def forward(self, *cond):
        ctx = self.model.prepare(dict(zip(self.names, cond)))
        return tuple(ctx[k] for k in self.outputs)


class EmbedGraph(nn.Module):
    def __init__(self, model, context_names: tuple[str, ...]):
        super().__init__()
        self.model, self.context_names = model, context_names

    def forward(self, x, t, *context):
        tokens, step = self.model.step_embed(x, t, dict(zip(self.context_names, context)))
        return (tokens, *step)


class ModulationGraph(nn.Module):
    def __init__(self, model, layer: int, step_names: tuple[str, ...], reads: tuple[str, ...] | None = None):
        super().__init__()
        self.model, self.layer, self.step_names = model, layer, step_names
        self.reads = step_names if reads is None else reads
        self.specs = model.config.interface.modules

    def forward(self, *step):
        given = dict(zip(self.reads, step))
        mods = self.model.layer_modulation(self.layer, tuple(given.get(n) for n in self.step_names))
        out = []
        for spec in self.specs:
            args, gate = mods[spec.name]
            out += list(args) + ([gate] if spec.gated else [])
        return tuple(out)


class ModuleGraph(nn.Module):
    """Pre-gate output D of one module on the tokens given (all N, or the k gathered ones)."""

    def __init__(self, model, layer: int, name: str):
        super().__init__()
        self.model, self.layer, self.name = model, layer, name
        self.spec = model.config.interface.spec(name)

    def forward(self, tokens, *inputs):
        n_args = len(self.spec.args)
        args, ctx = inputs[:n_args], dict(zip(self.spec.context, inputs[n_args:]))
        D, received = self.model.module_forward(self.layer, self.name, tokens, tuple(args), ctx)
        return (D, received) if self.spec.emits_received else D


class BlockGraph(nn.Module):
    """One `soda.blocks.Block`: per layer, modulation, then each module by its pattern letter
    (computed, given, or pruned: gather the indexed tokens, compute, scatter into the cache)
    and the residual update, all inside one graph. A step graph (`Block.step`) embeds the
    latents first and ends with the final layer: a whole step in one graph."""

    def __init__(self, model, block):
        super().__init__()
        self.model, self.block = model, block
        self.iface = model.config.interface
        ins, outs = block.tensors(self.iface)
        self.input_names = [n for n, _ in ins]

    def forward(self, *inputs):
        given = dict(zip(self.input_names, inputs))
        if not self.block.step:
            x, outs = self._layers(given, given["tokens"], tuple(given.get(n) for n in self.iface.step))
            return (x, *outs)
        tokens, step = self.model.step_embed(given["x"], given["t"], {n: given[n] for n in self.iface.embed_context})
        x, outs = self._layers(given, tokens, tuple(step))
        return (self.model.step_final(x, step), x, *outs)

    def _layers(self, given: dict, x, step: tuple):
        outs = []
        given_only = frozenset(spec.name for spec, c in zip(self.iface.modules, self.block.code) if c == GIVEN)
        for l in self.block.layers:
            mods = self.model.layer_modulation(l, step, gates_only=given_only)  # a given output needs its gate only
            for spec, c in zip(self.iface.modules, self.block.code):
                key = f"{spec.name}.{l}"
                args, gate = mods[spec.name]
                ctx = {n: given[context_name(self.iface, n, l)] for n in spec.context} if c != GIVEN else {}
                if c == GIVEN:
                    D = given[f"D.{key}"]
                elif c in (COMPUTE, COMPUTED_ONLY, KEPT):
                    D, score = self.model.module_forward(l, spec.name, x, tuple(args), ctx)
                    if c != COMPUTED_ONLY:
                        outs += [D] + ([score] if spec.score and c == COMPUTE else [])
                else:
                    idx = given[f"idx.{key}"]
                    part, score = self.model.module_forward(l, spec.name, gather_rows(x, idx), tuple(args), ctx)
                    D = scatter_rows(given[f"cache.{key}"], idx, part)
                    outs += [D, part] + ([score] if spec.score else [])
                x = x + gate.unsqueeze(1) * D if spec.gated else x + D
        return x, outs


def gather_rows(x, idx):
    """x[b, idx[b]]: [B, k, D] from x [B, N, D] and idx [B, k]: one ONNX GatherND with batch_dims=1
    (whole rows, like Gather on the flattened tokens, 2.8x faster in onnxruntime than
    GatherElements on an expanded index), without the index arithmetic on the dynamic B that
    tracing the indexing writes (about 25 nodes per pruned module)."""
    return _GatherRows.apply(x, idx)


def scatter_rows(cache, idx, part):
    """A copy of `cache` [B, N, D] with rows idx [B, k] replaced by `part` [B, k, D]: one ONNX
    ScatterND on the [B, N, D] tensor itself, by (row, token) pairs built in 8 small nodes (32 when
    traced). Scattering into the flattened tokens needs a reshape back, which onnxruntime copies
    when it is a graph output (the new cache): 120 us of a 1.8 ms pruned DiT-S/2 layer."""
    return _ScatterRows.apply(cache, idx, part)


def _rows(idx):
    return torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)


class _GatherRows(torch.autograd.Function):
    """The row gather in torch, with its ONNX form for the TorchScript exporter (the dynamo
    exporter traces `forward`)."""

    @staticmethod
    def forward(ctx, x, idx):
        return x[_rows(idx), idx]

    @staticmethod
    def symbolic(g, x, idx):
        last = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        return g.op("GatherND", x, g.op("Unsqueeze", idx, last), batch_dims_i=1)


class _ScatterRows(torch.autograd.Function):
    """The row scatter in torch, with its ONNX form for the TorchScript exporter: the (row, token)
    pairs from idx [B, k] and a Range over B, then one ScatterND."""

    @staticmethod
    def forward(ctx, cache, idx, part):
        out = cache.clone()
        out[_rows(idx), idx] = part
        return out

    @staticmethod
    def symbolic(g, cache, idx, part):
        def const(v):
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

        shape = g.op("Shape", idx)  # [B, k]
        batch = g.op("Range", const(0), g.op("Gather", shape, const(0), axis_i=0), const(1))
        rows = g.op("Expand", g.op("Unsqueeze", batch, const([1])), shape)  # [B, k]: b
        pairs = g.op("Concat", g.op("Unsqueeze", rows, const([-1])), g.op("Unsqueeze", idx, const([-1])), axis_i=-1)
        return g.op("ScatterND", cache, pairs, part)


class FinalGraph(nn.Module):
    def __init__(self, model, step_names: tuple[str, ...], final_names: tuple[str, ...]):
        super().__init__()
        self.model, self.step_names, self.final_names = model, step_names, final_names

    def forward(self, tokens, *final_step):
        # Only the step entries the final layer reads are inputs; the others are not needed.
        given = dict(zip(self.final_names, final_step))
        step = tuple(given.get(n) for n in self.step_names)
        return self.model.step_final(tokens, step)


@dataclass
class GraphSpec:
    """What to export: the module, its I/O (name, shape with str dynamic axes, dtype), and example args."""

    name: str
    module: nn.Module
    inputs: list[tuple[str, list, str]]
    outputs: list[tuple[str, list, str]]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def example(self, B: int, n: int, gen: torch.Generator, num_classes: int, L: int | None = None,
                video: dict | None = None) -> tuple:
        """Random inputs of the declared shapes with B rows, n tokens and L caption tokens (and a
        video model's `video` axes, `video_axes`); a "mask" input gets a different valid length per
        row (at least one token), a "grid" the video's latent size, a "pe_scale" one scale for all rows."""
        sizes = {"B": B, "n": n, "L": L or 1, **(video or {})}
        out = []
        for name, shape, dtype in self.inputs:
            dims = [n if is_token_axis(d) else sizes[d] if isinstance(d, str) else d for d in shape]
            if name.startswith("idx."):  # a pruned module's token indices: distinct, ascending per row
                N = self._tokens(sizes)
                out.append(torch.sort(torch.stack([torch.randperm(N, generator=gen)[:dims[1]] for _ in range(B)]))[0])
            elif name == "grid":
                out.append(torch.tensor([[sizes["T"], sizes["H"], sizes["W"]]] * dims[0]))
            elif name == "pe_scale":
                out.append(torch.full(dims, 0.05 + 0.5 * float(torch.rand((), generator=gen))))
            elif name == "mask":
                lengths = torch.randint(1, dims[1] + 1, (dims[0],), generator=gen)
                out.append((torch.arange(dims[1])[None] < lengths[:, None]).to(torch.float32))
            elif name in ("t", "fps") and dtype == F32:  # a float timestep (rectified flow) or frame rate
                out.append(torch.rand(dims, generator=gen) * (1000 if name == "t" else 30))
            elif dtype == I64:
                hi = 1000 if name == "t" else num_classes + 1  # y may be the null label
                out.append(torch.randint(0, hi, dims, generator=gen))
            else:
                out.append(torch.randn(dims, generator=gen))
        return tuple(out)

    def _tokens(self, sizes: dict) -> int:
        """N: the token axis of the "tokens" input (static, or a video's "N" in `sizes`)."""
        N = next(shape[1] for name, shape, _ in self.inputs if name == "tokens")
        return sizes[N] if isinstance(N, str) else N

    def dynamic_axes(self) -> dict:
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for name, shape, _ in self.inputs + self.outputs}


def is_token_axis(d) -> bool:
    """A dynamic token-count axis: "n" (module graphs) or "n_<module>_<layer>" (block graphs)."""
    return isinstance(d, str) and (d == "n" or d.startswith("n_"))


def _cond_shape(cfg, name: str) -> tuple[list, str]:
    """Shape and dtype of a conditioning input the sampler supplies."""
    if name == "y":
        return ["B"], I64
    if name == "caption":
        return ["B", "L", cfg.caption_channels], F32
    if name == "mask":
        return ["B", "L"], F32
    if name in ("fps", "pe_scale"):
        return ["B"], F32
    if name == "grid":
        return ["B", 3], I64
    raise KeyError(f"no graph shape for conditioning input {name!r}")


def video_axes(cfg) -> dict:
    """A video model's size axes at `cfg`'s video (frames, latent height and width, tokens); {} for
    an image model, whose graphs keep these sizes static."""
    if cfg.frames is None:
        return {}
    return {"T": cfg.frames, "H": cfg.input_size, "W": cfg.input_width, "N": cfg.num_tokens}


def _step_shape(cfg, name: str) -> tuple[list, str]:
    """Per-step entries the embed graph emits: shared modulation [B, 6D], embeddings [B, D], a video's
    latent grid [B, 3]."""
    if name == "grid":
        return ["B", 3], I64
    return ["B", 6 * cfg.hidden_size if name in ("t0", "t_mlp") else cfg.hidden_size], F32


def _context_shape(cfg, name: str) -> list:
    """Per-generation context entries the condition graph emits (per-layer K/V: [B, L, D])."""
    return ["B", "L", cfg.hidden_size]


def graph_specs(model, needed_modules: set[tuple[int, str]] | None = None) -> list[GraphSpec]:
    """Every subgraph the runtime needs, in export order: condition (if the architecture has
    per-generation work), embed, per layer modulation and modules, final. `needed_modules`
    limits the (layer, module) graphs (default: all)."""
    cfg = model.config
    iface = cfg.interface
    D = cfg.hidden_size
    video = bool(video_axes(cfg))
    N = "N" if video else cfg.num_tokens  # a video's token count is an axis, like its frames and size
    specs = []
    cond_io = {name: _cond_shape(cfg, name) for name in iface.cond}
    if iface.prepared:
        outs = iface.condition_outputs(cfg.depth)
        specs.append(GraphSpec("condition", ConditionGraph(model, iface.condition_reads, outs),
                               [(n, *cond_io[n]) for n in iface.condition_reads],
                               [(o, _context_shape(cfg, o), F32) for o in outs]))
    step_io = [(n, *_step_shape(cfg, n)) for n in iface.step]
    latent = [cfg.in_channels, "T", "H", "W"] if video else list(cfg.latent_shape)  # [C, H, W] for an image
    specs.append(GraphSpec("embed", EmbedGraph(model, iface.embed_context),
                           [("x", ["B", *latent], F32), ("t", ["B"], iface.timestep_dtype)]
                           + [(n, *cond_io[n]) for n in iface.embed_context],
                           [("tokens", ["B", N, D], F32)] + step_io))
    for l in range(cfg.depth):
        specs.append(GraphSpec(f"modulation.{l}", ModulationGraph(model, l, iface.step, iface.modulation_reads),
                               [s for s in step_io if s[0] in iface.modulation_reads],
                               [(o, ["B", D], F32) for o in iface.modulation_outputs()]))
        for m in iface.modules:
            if needed_modules is not None and (l, m.name) not in needed_modules:
                continue
            n = "n" if m.prunable else N  # a module that is never pruned sees every token (N: static, or a video axis)
            ins = [("tokens", ["B", n, D], F32)] + [(a, ["B", D], F32) for a in m.args]
            ins += [(c, *cond_io[c]) if c in cond_io else (c, _context_shape(cfg, c), F32) for c in m.context]
            outs = [("D", ["B", n, D], F32)] + ([(m.score, ["B", n], F32)] if m.score else [])
            specs.append(GraphSpec(f"{m.name}.{l}", ModuleGraph(model, l, m.name), ins, outs))
    final_in = [s for s in step_io if s[0] in iface.final_step]
    specs.append(GraphSpec("final", FinalGraph(model, iface.step, iface.final_step),
                           [("tokens", ["B", N, D], F32)] + final_in, [("out", ["B", cfg.out_channels, *latent[1:]], F32)]))
    # Wrappers start in training mode like any nn.Module, and torch.onnx.export restores the mode
    # it found *recursively*: a training-mode wrapper would leave the shared model in training mode,
    # where DiT's label dropout makes every later PyTorch call random (docs/export.md, "Parity").
    for spec in specs:
        spec.module.eval()
    return specs


def block_specs(model, blocks: list[Block]) -> list[GraphSpec]:
    """The block and step graphs (`soda.blocks`), with the shapes of their inputs and outputs. A
    video model's token axis is the video's "N" (with its size in the conditioning's "grid"
    context, which the attention reshapes by), as in its module graphs; each pruned module has
    its own axis "n_<module>_<layer>" of recomputed tokens."""
    cfg = model.config
    iface = cfg.interface
    D = cfg.hidden_size
    video = bool(video_axes(cfg))
    N = "N" if video else cfg.num_tokens
    latent = [cfg.in_channels, "T", "H", "W"] if video else list(cfg.latent_shape)
    cond_io = {name: _cond_shape(cfg, name) for name in iface.cond}
    specs = []
    for block in blocks:
        ins, outs = block.tensors(iface)

        def shape(name: str, role: str) -> tuple[list, str]:
            key = name.split(".", 1)[-1]  # "<module>.<layer>" of a module's tensors
            n = f"n_{key.replace('.', '_')}"  # one dynamic axis per pruned module
            if role in ("tokens", "given", "cache", "cache_out"):
                return ["B", N, D], F32
            if role == "step":
                return _step_shape(cfg, name)
            if role == "latent":
                return ["B", *latent], F32
            if role == "timestep":
                return ["B"], iface.timestep_dtype
            if role == "model":
                return ["B", cfg.out_channels, *latent[1:]], F32
            if role == "idx":
                return ["B", n], I64
            if role == "context":
                bare = name.split(".")[0]
                return cond_io[bare] if bare in cond_io else (_context_shape(cfg, bare), F32)
            pruned = f"idx.{key}" in {i for i, _ in ins}
            if role == "out":
                return ["B", n if pruned else N, D], F32
            return ["B", n if pruned else N], F32  # score

        specs.append(GraphSpec(block.name, BlockGraph(model, block).eval(),
                               [(n, *shape(n, r)) for n, r in ins], [(n, *shape(n, r)) for n, r in outs]))
    return specs
