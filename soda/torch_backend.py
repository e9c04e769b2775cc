"""The PyTorch reference backend: any model adapter's generic protocol behind the executor's
Backend API (`soda.executor.Backend`). Knows no architecture: it converts arrays and calls
`prepare`, `step_embed`, `layer_modulation`, `module_forward` and `step_final`.

Two ways to hand arrays to the loop:
- `device=None` (the reference everywhere on the CPU): numpy in and out, as onnxruntime CPU.
- `device="cuda"` (or "cpu", which tests use): a copy of the model on that device (the caller's
  model stays where it is, for profiling and the CPU reference), and every array the loop holds
  is a torch tensor there, so the stitching loop, its caches and the selectors run on
  torch there (`soda.arrays`); only the sampler's latents cross, once per step each way.
  `dtype` (torch.float16 / torch.bfloat16) runs the modules under `torch.autocast` in that
  precision (PyTorch's own mixed precision: matmuls in it, reductions like LayerNorm kept in
  float32, weights stay float32), so the cached module outputs are half-size; the model output
  is returned in float32 for the sampler.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import torch

from soda.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device(device: str) -> torch.device:
    """The torch device, or one clear error where it does not exist here."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown torch device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch with CUDA {torch.version.cuda}"
        raise UserError(f"--device {device}: no CUDA device here ({build}, torch.cuda.is_available() is False)")
    return dev


def _compute(method):
    """No autograd, and autocast to the backend's reduced precision when it has one."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with torch.no_grad(), self._autocast():
            return method(self, *args, **kwargs)
    return wrapped


class TorchBackend:
    def __init__(self, model, device: str | None = None, dtype: torch.dtype | None = None):
        if dtype not in (None, torch.float32) and device is None:
            raise ValueError("fp16/bf16 needs a device: TorchBackend(model, device=..., dtype=...)")
        self.device = None if device is None else check_device(device)
        self.dtype = dtype if dtype is not None else torch.float32
        self.model = model.eval()
        if self.device is not None:
            self.model = copy.deepcopy(model).to(self.device)
        self.interface = model.config.interface
        self.specs = tuple(self.interface.modules)
        self.modules = tuple(s.name for s in self.specs)
        self.num_layers = len(model.blocks)

    def describe(self) -> str:
        where = "numpy arrays" if self.device is None else f"torch tensors on {self.device}"
        return f"torch {torch.__version__} ({where}, {str(self.dtype).removeprefix('torch.')})"

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _t(self, a):
        """To a tensor where the model runs: numpy from the sampler, or the loop's own tensors."""
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t if self.device is None else t.to(self.device)

    def _out(self, v):
        """What the loop gets: numpy (device None) or the tensor as it is."""
        if v is None or self.device is not None:
            return v
        return v.numpy()

    @_compute
    def prepare(self, cond):
        """The context: the conditioning itself plus what the adapter prepares from it."""
        cond = {k: self._t(v) for k, v in cond.items()}
        prepared = self.model.prepare(cond)
        return {k: self._out(v) for k, v in {**cond, **prepared}.items()}

    @_compute
    def embed(self, x, t, context):
        ctx = {k: self._t(context[k]) for k in self.interface.embed_context}
        tokens, step = self.model.step_embed(self._t(x), self._t(t), ctx)
        return self._out(tokens), tuple(self._out(v) for v in step)

    @_compute
    def modulation(self, layer, step):
        mods = self.model.layer_modulation(layer, tuple(None if v is None else self._t(v) for v in step))
        return {k: (tuple(self._out(a) for a in args), self._out(gate)) for k, (args, gate) in mods.items()}

    @_compute
    def module(self, layer, name, tokens, *args, context=None):
        spec = self.specs[self.modules.index(name)]
        ctx = {k: self._t(v) for k, v in zip(spec.context, spec.context_for(context, layer))}
        D, received = self.model.module_forward(layer, name, self._t(tokens), tuple(self._t(a) for a in args), ctx)
        return self._out(D), self._out(received)

    @_compute
    def final(self, tokens, step):
        out = self.model.step_final(self._t(tokens), tuple(None if v is None else self._t(v) for v in step))
        return self._out(out.float())
