"""The PyTorch reference backend: any model adapter's generic protocol behind the executor's
numpy API (`soda.executor.Backend`). Knows no architecture: it converts arrays and calls
`prepare`, `step_embed`, `layer_modulation`, `module_forward` and `step_final`."""
from __future__ import annotations

import numpy as np
import torch


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _np(v):
    return None if v is None else v.numpy()


class TorchBackend:
    def __init__(self, model):
        self.model = model.eval()
        self.interface = model.config.interface
        self.specs = tuple(self.interface.modules)
        self.modules = tuple(s.name for s in self.specs)
        self.num_layers = len(model.blocks)

    @torch.inference_mode()
    def prepare(self, cond):
        """The context: the conditioning itself plus what the adapter prepares from it."""
        prepared = self.model.prepare({k: _t(v) for k, v in cond.items()})
        return {**cond, **{k: v.numpy() for k, v in prepared.items()}}

    @torch.inference_mode()
    def embed(self, x, t, context):
        ctx = {k: _t(context[k]) for k in self.interface.embed_context}
        tokens, step = self.model.step_embed(_t(x), _t(t), ctx)
        return tokens.numpy(), tuple(v.numpy() for v in step)

    @torch.inference_mode()
    def modulation(self, layer, step):
        mods = self.model.layer_modulation(layer, tuple(None if v is None else _t(v) for v in step))
        return {k: (tuple(a.numpy() for a in args), _np(gate)) for k, (args, gate) in mods.items()}

    @torch.inference_mode()
    def module(self, layer, name, tokens, *args, context=None):
        spec = self.specs[self.modules.index(name)]
        ctx = {k: _t(v) for k, v in zip(spec.context, spec.context_for(context, layer))}
        D, received = self.model.module_forward(layer, name, _t(tokens), tuple(_t(a) for a in args), ctx)
        return D.numpy(), _np(received)

    @torch.inference_mode()
    def final(self, tokens, step):
        return self.model.step_final(_t(tokens), tuple(None if v is None else _t(v) for v in step)).numpy()
