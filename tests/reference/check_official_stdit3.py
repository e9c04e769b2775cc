"""Check the transcription (official_stdit3.py) against the official Open-Sora 1.2 code itself.

    python tests/reference/check_official_stdit3.py OPEN_SORA_DIR

OPEN_SORA_DIR is a checkout of hpcaitech/Open-Sora at tag v1.2.0 (the directory that holds
`opensora/`). The official model and sampler files are loaded as they are; only their environment is
stubbed: xformers (its block-diagonal attention, written here with F.scaled_dot_product_attention
and a boolean mask, independently of the transcription's loop), transformers' PretrainedConfig /
PreTrainedModel, the registry, sequence-parallel helpers, gradient checkpointing (a plain call),
colossalai's checkpoint utilities and torchvision (which timm imports but STDiT3 never uses).
einops, rotary_embedding_torch==0.5.3 and timm==0.9.16 must be importable: they are real.

Prints one JSON object: relative errors of the forward pass (CFG batch, captions masked to different
lengths, odd latent width so the patch padding runs, with and without the temporal x_mask) and of a
30-step rflow CFG-7 sample, plus the key lists' agreement. Exit status 0 when all are below 1e-5.
Run in its own process: the stubs go into sys.modules.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


# --- stubs for the environment ------------------------------------------------------------------
class _Anything(type):
    def __getattr__(cls, name):
        return _Anything(name, (), {})

    def __call__(cls, *a, **k):
        return cls


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `torchvision...` import resolves to a module whose every attribute is a dummy class."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = lambda attr: _Anything(attr, (), {})
        return mod

    def exec_module(self, module):
        pass


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class BlockDiagonalMask:
    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, kv_seqlen if kv_seqlen is not None else q_seqlen)


def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None):
    """xformers' [1, M, H, d] layout; softmax scale 1/sqrt(d); block-diagonal mask from seqlens."""
    assert p == 0.0
    mask = None
    if attn_bias is not None:
        qid = torch.repeat_interleave(torch.arange(len(attn_bias.q_seqlen)), torch.tensor(attn_bias.q_seqlen))
        kid = torch.repeat_interleave(torch.arange(len(attn_bias.kv_seqlen)), torch.tensor(attn_bias.kv_seqlen))
        mask = qid[:, None] == kid[None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class _Registry:
    def register_module(self, name=None, module=None):
        return lambda fn: fn


class PretrainedConfig:
    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)


class PreTrainedModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def install_stubs(src: Path) -> None:
    sys.meta_path.insert(0, _StubFinder())
    ops = _module("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    ops.fmha = _module("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
    _module("xformers", ops=ops)
    _module("transformers", PretrainedConfig=PretrainedConfig, PreTrainedModel=PreTrainedModel)
    for pkg in ("opensora", "opensora.models", "opensora.models.layers", "opensora.models.stdit",
                "opensora.schedulers", "opensora.schedulers.iddpm", "opensora.acceleration", "opensora.utils"):
        _module(pkg)
    _module("opensora.registry", MODELS=_Registry(), SCHEDULERS=_Registry())
    _module("opensora.acceleration.checkpoint", auto_grad_checkpoint=lambda module, *args, **kw: module(*args, **kw))
    _module("opensora.acceleration.communications", all_to_all=None, split_forward_gather_backward=None,
            gather_forward_split_backward=None)
    _module("opensora.acceleration.parallel_states", get_sequence_parallel_group=lambda: None)
    _module("opensora.utils.ckpt_utils", load_checkpoint=None)
    _module("opensora.schedulers.iddpm.gaussian_diffusion", _extract_into_tensor=None, mean_flat=None)


def load_file(name: str, path: Path, package: bool = False):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- the comparison --------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def main(src: Path) -> int:
    torch.set_num_threads(1)
    install_stubs(src)
    base = src / "opensora"
    blocks = load_file("opensora.models.layers.blocks", base / "models/layers/blocks.py")
    stdit3 = load_file("opensora.models.stdit.stdit3", base / "models/stdit/stdit3.py")
    load_file("opensora.schedulers.rf.rectified_flow", base / "schedulers/rf/rectified_flow.py")
    rf = load_file("opensora.schedulers.rf", base / "schedulers/rf/__init__.py", package=True)
    assert blocks.Attention is stdit3.Attention
    sys.path.insert(0, str(ROOT))
    from tests.reference import official_stdit3 as ref

    kw = dict(depth=2, hidden_size=48, num_heads=3, patch_size=(1, 2, 2), in_channels=4, caption_channels=24,
              model_max_length=10, input_sq_size=512, qk_norm=True)
    torch.manual_seed(0)
    official = stdit3.STDiT3(stdit3.STDiT3Config(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight non-trivial, so each path shows in the output
        for name, p in official.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.3))
        official.y_embedder.y_embedding.copy_(torch.randn(official.y_embedder.y_embedding.shape, generator=g))
    ours = ref.STDiT3(ref.STDiT3Config(**kw)).eval()
    missing = ours.load_state_dict(official.state_dict(), strict=True)
    same_keys = list(official.state_dict()) == list(ours.state_dict())

    n, L = 2, 10
    x = torch.randn(n, 4, 5, 6, 5, generator=g)  # odd latent width: PatchEmbed3D pads, unpatchify crops
    y = torch.randn(n, 1, L, 24, generator=g)
    mask = torch.zeros(n, L, dtype=torch.long)
    mask[0, :7] = 1
    mask[1, :3] = 1
    info = ref.multi_resolution_info(n, (48, 40), 17, 24)
    results = {"keys_identical": same_keys, "load": str(missing)}

    with torch.no_grad():
        # CFG batch exactly as RFLOW.sample builds it: [y; null], the conditional mask reused for both.
        y2 = torch.cat([y, official.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]], 0)
        x2, t2 = torch.cat([x, x]), torch.tensor([870.0, 870.0, 250.0, 250.0])
        args = dict(mask=mask, fps=info["fps"], height=info["height"], width=info["width"])
        a = official(x2, t2, y2, **args)
        b = ours(x2, t2, y2, **args)
        results["forward_cfg"] = rel(b, a)
        x_mask = torch.tensor([[True, False, True, True, False]] * (2 * n))
        a = official(x2, t2, y2, x_mask=x_mask, **args)
        b = ours(x2, t2, y2, x_mask=x_mask, **args)
        results["forward_x_mask"] = rel(b, a)

        zs = {}
        for label, model, mod in (("official", official, rf), ("ours", ours, ref)):
            enc = ref.PrecomputedT5(y[:, 0], mask)
            enc.y_embedder = model.y_embedder
            sched = mod.RFLOW(num_sampling_steps=30, cfg_scale=7.0, use_timestep_transform=True)
            zs[label] = sched.sample(model, enc, x.clone(), ["a", "b"], "cpu", additional_args=dict(info))
        results["rflow30_cfg7"] = rel(zs["ours"], zs["official"])
        t = torch.tensor([1000.0, 500.0])
        results["timestep_transform"] = rel(ref.timestep_transform(t, info, num_timesteps=1000),
                                            rf.timestep_transform(t, info, num_timesteps=1000))
    print(json.dumps(results))
    ok = same_keys and all(v < 1e-5 for k, v in results.items() if isinstance(v, float))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
