"""The model-adapter boundary: conditioning lifetimes and self-declared modules, model-blind."""
import numpy as np
import pytest

from soda.executor import Executor
from soda.flops import FlopsModel, schedule_flops
from soda.models.config import get_config
from soda.models.interface import DIT, PIXART, ModuleSpec
from soda.policies import ScheduleSpec, make_schedule
from soda.sampling import Conditioning


class CountingBackend:
    """A numpy backend with one gated token-mixing and one ungated token-wise module, counting
    how often each lifetime's conditioning is computed."""

    specs = (ModuleSpec("mix", gated=True, token_mixing=True, kind="self_attn"),
             ModuleSpec("ctx", gated=False, token_mixing=False, kind="cross_attn", args=(), context=("k",)))
    modules = ("mix", "ctx")
    num_layers = 2

    def __init__(self):
        self.calls = {"prepare": 0, "embed": 0, "modulation": 0}

    def prepare(self, cond):
        self.calls["prepare"] += 1
        return {"k.0": cond["caption"] * 2.0, "k.1": cond["caption"] * 3.0}

    def embed(self, x, t, context):
        self.calls["embed"] += 1
        return x.reshape(len(x), 4, 2), (np.full((len(x), 2), 0.5, np.float32),)

    def modulation(self, layer, step):
        self.calls["modulation"] += 1
        return {"mix": ((step[0],), step[0] * (layer + 1)), "ctx": ((), None)}

    def module(self, layer, name, tokens, *args, context=None):
        if name == "mix":
            return tokens.mean(axis=1, keepdims=True) + args[0][:, None, :] + 0 * tokens, None
        k = self.specs[1].context_for(context, layer)[0]
        return tokens * 0 + k[:, None, :], None

    def final(self, tokens, step):
        return tokens.reshape(len(tokens), -1)


def by_hand(x, caption):
    tokens = x.reshape(len(x), 4, 2)
    for layer in range(2):
        gate = np.full((len(x), 2), 0.5 * (layer + 1))
        tokens = tokens + gate[:, None, :] * (tokens.mean(axis=1, keepdims=True) + 0.5)
        tokens = tokens + caption[:, None, :] * (2.0 + layer)  # ungated: weight 1
    return tokens.reshape(len(x), -1)


def test_lifetimes_and_ungated_residual():
    b = CountingBackend()
    spec = ScheduleSpec("toy", "h", 2, b.modules, 4, "ddim", 3)
    sched = make_schedule("full", spec)
    fm = FlopsModel(2, 8, 4, (("mix", "self_attn"), ("ctx", "cross_attn")), 1.0, 1.0, 1.0, condition_row=100.0,
                    context_len=3)
    ex = Executor(b, sched, fm)
    rng = np.random.default_rng(0)
    cond = {"caption": rng.standard_normal((2, 2)).astype(np.float32)}
    for s in range(3):
        x = rng.standard_normal((2, 8)).astype(np.float32)
        np.testing.assert_allclose(ex(s, x, np.zeros(2), cond), by_hand(x, cond["caption"]), rtol=1e-6)
    assert b.calls == {"prepare": 1, "embed": 3, "modulation": 6}  # per generation, step, layer
    assert ex.flops_done == pytest.approx(schedule_flops(sched, fm, 2))
    assert fm.condition(2) == 200.0 and ex.flops_done > 200.0


def test_declarations():
    assert DIT.module_names == ("attn", "mlp") and all(m.gated for m in DIT.modules)
    assert DIT.modulation_outputs() == ("shift_attn", "scale_attn", "gate_attn", "shift_mlp", "scale_mlp", "gate_mlp")
    cross = PIXART.spec("cross_attn")
    assert not cross.gated and not cross.token_mixing and cross.inputs == ("tokens", "k", "v", "mask")
    assert PIXART.condition_outputs(2) == ("k.0", "k.1", "v.0", "v.1")
    assert get_config("dit-xl-2").modules == ("attn", "mlp")


def test_dit_flops_unchanged():
    """The generic FLOPs model gives DiT-XL/2 exactly the counts of the former DiT-only formula."""
    cfg = get_config("dit-xl-2")
    fm = FlopsModel.for_config(cfg)
    H, N, B = 1152, 256, 2
    assert fm.embed(B) == 2 * B * N * 16 * H + 2 * B * (256 * H + H * H)
    assert fm.modulation(B) == 2 * B * H * 6 * H and fm.condition(B) == 0
    assert fm.final(B) == 2 * B * H * 2 * H + 2 * B * N * H * 32
    assert fm.module("attn", B, N) == 2 * B * N * H * 3 * H + 4 * B * N * N * H + 2 * B * N * H * H
    assert fm.module("mlp", B, N) == 4 * B * N * H * 4 * H


def test_conditioning_batches_and_slices():
    c = Conditioning({"caption": np.ones((3, 2, 4)), "mask": np.ones((3, 2))},
                     {"caption": np.zeros((1, 2, 4)), "mask": np.ones((1, 2))})
    b = c.batch(True)
    assert b["caption"].shape == (6, 2, 4) and b["caption"][3:].sum() == 0
    assert len(c.rows(slice(1, 3))) == 2 and c.rows(slice(1, 3)).batch(True)["mask"].shape == (4, 2)
    lab = Conditioning.from_labels(np.array([1, 2]), 10)
    assert lab.batch(True)["y"].tolist() == [1, 2, 10, 10] and lab.batch(False)["y"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        Conditioning({"a": np.ones(2), "b": np.ones(3)})
