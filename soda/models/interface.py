"""What an architecture tells the rest of the toolchain, without torch.

The stitching loop, the FLOPs model, the policies, the profiler, the exporter and the runtime
read these declarations and never name a model. An adapter (`soda/models/<arch>.py`, torch)
implements them; this table is the torch-free half, so the runtime and the schedule builders
can know a model's modules without importing its code.

Conditioning has three lifetimes, each computed once at its lifetime by the adapter and handed
back to it opaquely (dicts/tuples of batch-leading arrays the loop never looks inside):
- per generation: `prepare(cond) -> context` (DiT: the labels; PixArt: every layer's
  cross-attention K/V, computed from the caption once; the loop keeps `cond` in the context);
- per step: `embed(x, t, context) -> (tokens, step)` (DiT: `c`; PixArt: the shared `t0` and
  the timestep embedding the final layer uses);
- per layer: `modulation(layer, step) -> {module: (args, gate)}` (shift/scale for modulated
  modules; `gate` is None for an ungated module, whose output is added with weight 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SELF_ATTN, CROSS_ATTN, MLP = "self_attn", "cross_attn", "mlp"


@dataclass(frozen=True)
class ModuleSpec:
    """One residual branch of a block: `x += gate * D` (gated) or `x += D`.

    token_mixing: its output at a token depends on other tokens (self-attention), so a pruned
    call attends among the kept tokens only; token-wise modules (MLP, cross-attention to the
    caption) give exactly the full output on any subset of tokens.
    kind: what it computes, for the FLOPs model ("self_attn", "cross_attn", "mlp").
    args: names of the per-layer inputs from `modulation` (graph input names).
    context: names of the per-generation inputs it reads (per-layer ones are stored as
    "<name>.<layer>" in the context; graph input names are the bare names).
    axis: the axis it mixes ("spatial"; a video adapter adds "temporal").
    score: name of a per-token score it also returns for token selectors (self-attention:
      "received", the attention each token received; Open-Sora's "value_norm", DuCa's value
      norms; cross-attention: "entropy", ToCa's cross-attention entropy).
    """

    name: str
    gated: bool
    token_mixing: bool
    kind: str
    args: tuple[str, ...] = ("shift", "scale")
    context: tuple[str, ...] = ()
    axis: str = "spatial"
    score: str | None = None
    prunable: bool = True  # False: only full or reuse (a video attention needs the whole token grid)

    @property
    def emits_received(self) -> bool:
        """Whether the module returns a per-token score next to D."""
        return self.score is not None

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("D", self.score) if self.score else ("D",)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input names of its "{name}.{layer}" graph."""
        return ("tokens", *self.args, *self.context)

    def context_for(self, context: dict | None, layer: int) -> tuple:
        """The per-generation inputs this module reads at `layer` ("k.3" before "k")."""
        if not self.context:
            return ()
        return tuple(context[f"{n}.{layer}"] if f"{n}.{layer}" in context else context[n] for n in self.context)


@dataclass(frozen=True)
class Interface:
    """The graph-level interface of one architecture (names are ONNX input/output names).

    cond: what a generation is conditioned on (the sampler supplies these, batch-leading):
      DiT ("y",) labels; PixArt ("caption", "mask").
    prepared: per-generation outputs of the "condition" graph, "{name}.{layer}" per layer
      when listed in `per_layer` (empty: no condition graph; the context is `cond` itself).
      The context is `cond` plus these. Graph inputs are only what a graph reads
      (`condition_inputs`, `modulation_step`): ONNX drops unused inputs.
    embed_context: context entries the embed graph reads besides (x, t).
    step: per-step conditioning the embed graph emits (and modulation/final read).
    final_step: which of `step` the final layer reads.
    """

    arch: str
    modules: tuple[ModuleSpec, ...]
    cond: tuple[str, ...]
    embed_context: tuple[str, ...]
    step: tuple[str, ...]
    final_step: tuple[str, ...]
    prepared: tuple[str, ...] = ()
    per_layer: tuple[str, ...] = ()
    condition_inputs: tuple[str, ...] | None = None  # what the condition graph reads (default: cond)
    modulation_step: tuple[str, ...] | None = None  # which step entries modulation reads (default: all)
    flops: Callable[..., dict[str, float]] | None = None  # config -> per-row FLOPs outside the modules
    # config -> per layer, how many tokens a self-attention query attends to at full compute
    # (None: all of them, as in an image DiT; a video model alternates patches and frames).
    mix_lengths: Callable[..., tuple[int, ...]] | None = None
    timestep_dtype: str = "int64"  # what the sampler feeds as t (rectified flow: float32)

    @property
    def condition_reads(self) -> tuple[str, ...]:
        return self.cond if self.condition_inputs is None else self.condition_inputs

    @property
    def modulation_reads(self) -> tuple[str, ...]:
        return self.step if self.modulation_step is None else self.modulation_step

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def spec(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def modulation_outputs(self) -> tuple[str, ...]:
        """Outputs of a "modulation.{l}" graph: each module's args then its gate, prefixed."""
        out = []
        for m in self.modules:
            out += [f"{a}_{m.name}" for a in m.args]
            if m.gated:
                out.append(f"gate_{m.name}")
        return tuple(out)

    def condition_outputs(self, depth: int) -> tuple[str, ...]:
        out = []
        for p in self.prepared:
            out += [f"{p}.{l}" for l in range(depth)] if p in self.per_layer else [p]
        return tuple(out)


def _common(config) -> tuple[float, float, float]:
    """Patch embedding, timestep MLP and output projection, per batch row."""
    H, N, p2 = config.hidden_size, config.num_tokens, config.patch_size**2
    return (2 * N * config.in_channels * p2 * H, 2 * (256 * H + H * H), 2 * N * H * config.out_channels * p2)


def _dit_flops(config) -> dict[str, float]:
    patch, t_mlp, out = _common(config)
    H = config.hidden_size
    return {"embed": float(patch + t_mlp), "modulation": float(2 * H * 6 * H), "final": float(2 * H * 2 * H + out),
            "condition": 0.0}


def _pixart_flops(config) -> dict[str, float]:
    """t_block (SiLU + Linear(H, 6H)) once per step; per layer only a table add; the caption
    projection and each layer's K/V once per generation, at the nominal caption length."""
    patch, t_mlp, out = _common(config)
    H, Lc, C = config.hidden_size, config.caption_len, config.caption_channels
    caption = 2 * Lc * (C * H + H * H) + config.depth * 2 * Lc * H * 2 * H
    return {"embed": float(patch + t_mlp + 2 * H * 6 * H), "modulation": 0.0, "final": float(out),
            "condition": float(caption)}


_ATTN = ModuleSpec("attn", gated=True, token_mixing=True, kind=SELF_ATTN, score="received")
_MLP = ModuleSpec("mlp", gated=True, token_mixing=False, kind=MLP)

DIT = Interface("dit", (_ATTN, _MLP), cond=("y",), embed_context=("y",), step=("c",), final_step=("c",),
                flops=_dit_flops)

PIXART = Interface(
    "pixart",
    (_ATTN, ModuleSpec("cross_attn", gated=False, token_mixing=False, kind=CROSS_ATTN, args=(),
                       context=("k", "v", "mask"), score="entropy"), _MLP),
    cond=("caption", "mask"), embed_context=(), step=("t0", "temb"), final_step=("temb",),
    prepared=("k", "v"), per_layer=("k", "v"), condition_inputs=("caption",), modulation_step=("t0",),
    flops=_pixart_flops,
)

def _opensora_flops(config) -> dict[str, float]:
    """Per step: patch embedding (temporal patch 1), timestep and fps MLPs, t_block; per layer only
    a table add; the final layer's output projection; the caption projection and each layer's K/V
    once per generation, at the nominal caption length."""
    patch, t_mlp, out = _common(config)
    H, Lc, C = config.hidden_size, config.caption_len, config.caption_channels
    caption = 2 * Lc * (C * H + H * H) + config.depth * 2 * Lc * H * 2 * H
    return {"embed": float(patch + 2 * t_mlp + 2 * H * 6 * H), "modulation": 0.0, "final": float(out),
            "condition": float(caption)}


def _opensora_mix(config) -> tuple[int, ...]:
    """Spatial layers (even) attend over the S patches of a frame, temporal ones over the T frames."""
    p = config.patch_size
    S = -(-config.input_size // p) * -(-config.input_width // p)
    return tuple(S if l % 2 == 0 else config.frames for l in range(config.depth))


# A token is one (frame, patch) position. Cross-attention and the MLP are token-wise, so any
# subset can be recomputed; self-attention reshapes the flat tokens to (B*T) x S or (B*S) x T and
# needs every one of them, so it is computed in full or reused whole, never pruned. The scores
# are the official Open-Sora ones: DuCa's value norms (self-attention), ToCa's cross-attention entropy.
# The video size is an input, so one export runs any video: the conditioning's "grid" ([B, 3] latent
# frames, height, width; attention reshapes by it) and "pe_scale" ([B], the position-embedding scale
# of the pixel size), and the step's "grid" (read from the latent by embed, for the final layer).
OPENSORA = Interface(
    "opensora",
    (ModuleSpec("attn", gated=True, token_mixing=True, kind=SELF_ATTN, score="value_norm", axis="spatial|temporal",
                context=("grid",), prunable=False),
     ModuleSpec("cross_attn", gated=False, token_mixing=False, kind=CROSS_ATTN, args=(), context=("k", "v", "mask"),
                score="entropy"),
     _MLP),
    cond=("caption", "mask", "fps", "grid", "pe_scale"), embed_context=("fps", "pe_scale"),
    step=("t_mlp", "temb", "grid"), final_step=("temb", "grid"),
    prepared=("k", "v"), per_layer=("k", "v"), condition_inputs=("caption",), modulation_step=("t_mlp",),
    flops=_opensora_flops, mix_lengths=_opensora_mix, timestep_dtype="float32",
)

INTERFACES = {i.arch: i for i in (DIT, PIXART, OPENSORA)}


def interface_for(arch: str) -> Interface:
    from soda.errors import UserError

    if arch not in INTERFACES:
        raise UserError(f"no adapter for architecture {arch!r} (known: {', '.join(INTERFACES)})")
    return INTERFACES[arch]


def per_row_flops(config) -> dict[str, float]:
    """FLOPs per batch row outside the blocks' modules: embed (per step), modulation (per layer
    and step), final (per step), condition (per generation)."""
    return interface_for(config.arch).flops(config)
