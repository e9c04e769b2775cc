"""The PyTorch reference backend: the model adapter's modules behind the executor's numpy API."""
from __future__ import annotations

import numpy as np
import torch

from soda.models.dit import DiT, Modulation


class TorchBackend:
    def __init__(self, model: DiT):
        self.model = model.eval()
        self.modules = tuple(model.blocks[0].modules_order)
        self.num_layers = len(model.blocks)

    @staticmethod
    def _t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    @torch.inference_mode()
    def embed(self, x, t, y):
        tokens, c = self.model.embed(self._t(x), self._t(t), self._t(y))
        return tokens.numpy(), c.numpy()

    @torch.inference_mode()
    def modulation(self, layer, c):
        mods = self.model.blocks[layer].modulation(self._t(c))
        return {k: (v.shift.numpy(), v.scale.numpy(), v.gate.numpy()) for k, v in mods.items()}

    @torch.inference_mode()
    def module(self, layer, name, tokens, shift, scale):
        mod = Modulation(self._t(shift), self._t(scale), None)
        block = self.model.blocks[layer]
        if name == "attn":
            D, received = block.run_module(name, self._t(tokens), mod, return_received=True)
            return D.numpy(), received.numpy()
        return block.run_module(name, self._t(tokens), mod).numpy(), None

    @torch.inference_mode()
    def final(self, tokens, c):
        return self.model.final(self._t(tokens), self._t(c)).numpy()
