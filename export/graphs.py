"""The subgraphs the runtime calls, as small torch modules over the model adapter.

One graph per (layer, module) with a dynamic token axis "n" serves full compute AND every
prune rate (pruning gathers tokens before the module); reuse needs no graph; the residual
`x + gate * D` is done by the runtime. Names and shapes here ARE the runtime interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from soda.models.dit import Modulation

F32, I64 = "float32", "int64"


class EmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model.embed(x, t, y)


class ModulationGraph(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, c):
        mods = self.block.modulation(c)
        return tuple(v for name in self.block.modules_order for v in (mods[name].shift, mods[name].scale, mods[name].gate))


class ModuleGraph(nn.Module):
    """Pre-gate output D of one module on the tokens given (all N, or the k gathered ones)."""

    def __init__(self, block, name: str):
        super().__init__()
        self.block, self.name = block, name

    def forward(self, tokens, shift, scale):
        mod = Modulation(shift, scale, None)
        if self.name == "attn":
            return self.block.run_module("attn", tokens, mod, return_received=True)
        return self.block.run_module(self.name, tokens, mod)


class FinalGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, c):
        return self.model.final(tokens, c)


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

    def example(self, B: int, n: int, gen: torch.Generator, num_classes: int) -> tuple:
        """Random inputs of the declared shapes with B rows and n tokens."""
        out = []
        for name, shape, dtype in self.inputs:
            dims = [B if d == "B" else n if d == "n" else d for d in shape]
            if dtype == I64:
                hi = 1000 if name == "t" else num_classes + 1  # y may be the null label
                out.append(torch.randint(0, hi, dims, generator=gen))
            else:
                out.append(torch.randn(dims, generator=gen))
        return tuple(out)

    def dynamic_axes(self) -> dict:
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for name, shape, _ in self.inputs + self.outputs}


def graph_specs(model, needed_modules: set[tuple[int, str]] | None = None) -> list[GraphSpec]:
    """Every subgraph the runtime needs, in export order: embed, per layer modulation and
    modules, final. `needed_modules` limits the (layer, module) graphs (default: all)."""
    cfg = model.config
    C, H, D, N = cfg.in_channels, cfg.input_size, cfg.hidden_size, cfg.num_tokens
    order = tuple(model.blocks[0].modules_order)
    specs = [GraphSpec("embed", EmbedGraph(model), [("x", ["B", C, H, H], F32), ("t", ["B"], I64), ("y", ["B"], I64)],
                       [("tokens", ["B", N, D], F32), ("c", ["B", D], F32)])]
    for l, block in enumerate(model.blocks):
        specs.append(GraphSpec(f"modulation.{l}", ModulationGraph(block), [("c", ["B", D], F32)],
                               [(f"{k}_{m}", ["B", D], F32) for m in order for k in ("shift", "scale", "gate")]))
        for m in order:
            if needed_modules is not None and (l, m) not in needed_modules:
                continue
            outs = [("D", ["B", "n", D], F32)] + ([("received", ["B", "n"], F32)] if m == "attn" else [])
            specs.append(GraphSpec(f"{m}.{l}", ModuleGraph(block, m),
                                   [("tokens", ["B", "n", D], F32), ("shift", ["B", D], F32), ("scale", ["B", D], F32)], outs))
    specs.append(GraphSpec("final", FinalGraph(model), [("tokens", ["B", N, D], F32), ("c", ["B", D], F32)],
                           [("out", ["B", cfg.out_channels, H, H], F32)]))
    # Wrappers start in training mode like any nn.Module, and torch.onnx.export restores the mode
    # it found *recursively*: a training-mode wrapper would leave the shared model in training mode,
    # where DiT's label dropout makes every later PyTorch call random (docs/export.md, "Parity").
    for spec in specs:
        spec.module.eval()
    return specs
