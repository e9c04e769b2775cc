"""ToCa's and DuCa's Open-Sora token scores against our transcription of the official code
(tests/reference/toca_opensora_scores.py): the exported graphs' per-token outputs (cross-attention
entropy, value norms) through our selectors give the official scores and the official fresh tokens,
step after step, on a spatial and a temporal block of `opensora-tiny` (random weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import toca_opensora_scores as ref

LENGTHS = (3, 7)  # two prompts; the null caption rows reuse their masks, as the official sampler does


@pytest.fixture(scope="module")
def tiny():
    from soda.models.loading import load_model
    from soda.models.opensora import apply_video

    model, _ = load_model("opensora-tiny", random_init=True)
    apply_video(model)
    return model


def batch(model, seed: int = 0):
    """CFG-doubled inputs: tokens [4, N, D], projected captions [4, L, D] (2 prompts, then the null
    caption twice), masks with the prompts' lengths for both halves."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, c.num_tokens, c.hidden_size, generator=g)
    y = torch.randn(4, c.caption_len, c.hidden_size, generator=g)
    y[2:] = y[2]  # the null caption, the same for every unconditional row
    mask = torch.zeros(4, c.caption_len)
    for i, n in enumerate(LENGTHS * 2):
        mask[i, :n] = 1
    return x, y, mask


def grid_context(model) -> dict:
    c = model.config
    grid = torch.tensor([[c.frames, c.input_size, c.input_width]] * 4)
    return {"grid": grid}


def official_fresh(base: torch.Tensor, k: int, steps: int):
    """The official loop's fresh indices (as sorted arrays) and scores over `steps` ToCa steps after a
    full one, the base score unchanged (the map is only refreshed by a full computation)."""
    cache_index = torch.zeros(base.shape, dtype=torch.int)
    out = []
    for _ in range(steps):
        score = ref.score_evaluate(base, cache_index)
        fresh, cache_index = ref.cache_cutfresh(score, k, cache_index)
        out.append((np.sort(fresh.numpy(), axis=1), score.numpy()))
    return out


def assert_same_choice(selector_name: str, layer: int, score_module: str, D: torch.Tensor, score: torch.Tensor,
                       official_base: torch.Tensor) -> None:
    """Over three steps after a full one (15% of the tokens fresh each): our selector, fed the module's
    score output, gives the official scores (1e-6) and the official fresh tokens."""
    from soda.selectors import make_selector

    k = int(0.15 * D.shape[1])
    want = official_fresh(official_base, k, 3)
    sel = make_selector(selector_name, {"selector_params": {"interval": 3, "staleness_weight": 0.25, "bonus_ratio": 0.0}})
    got = ours_fresh(sel, layer, score_module, D.numpy(), score.numpy(), k, 3)
    for (w_idx, w_score), (g_idx, g_score) in zip(want, got):
        np.testing.assert_allclose(g_score, w_score, rtol=0, atol=1e-6)
        assert (g_idx == w_idx).all()


def ours_fresh(selector, layer: int, score_module: str, D: np.ndarray, score: np.ndarray, k: int, steps: int):
    selector.observe(0, layer, score_module, None, D, score)
    selector.observe(0, layer, "mlp", None, D, None)
    out = []
    for s in range(1, steps + 1):
        B, N = D.shape[:2]
        values = selector.score(s, layer, "mlp", B, N)
        idx = selector.select(s, layer, "mlp", k, D, D)
        selector.observe(s, layer, "mlp", idx, D[np.arange(B)[:, None], idx], None)
        out.append((idx, values))
    return out


@pytest.mark.parametrize("layer", [0, 1], ids=["spatial", "temporal"])
def test_toca_cross_attention_entropy_equals_official(tiny, layer):
    model = tiny
    c = model.config
    block = model.layers[layer]
    x, y, mask = batch(model)
    k_, v_ = block.cross_attn.kv_linear(y).chunk(2, dim=-1)
    with torch.no_grad():
        D, entropy = model.module_forward(layer, "cross_attn", x, (), {"k": k_, "v": v_, "mask": mask})
        packed = torch.cat([y[b, : int(mask[b].sum())] for b in range(4)])[None]
        ca = block.cross_attn
        want_D, cmap = ref.cross_attention_with_map(ca.q_linear, ca.kv_linear, ca.proj, c.num_heads, x, packed,
                                                    [int(m.sum()) for m in mask])
    assert torch.allclose(D, want_D, atol=1e-5)
    assert_same_choice("toca-cross-entropy", layer, "cross_attn", D, entropy, ref.attn_score(cmap))


@pytest.mark.parametrize("layer", [0, 1], ids=["spatial", "temporal"])
def test_duca_value_norm_equals_official(tiny, layer):
    model = tiny
    c = model.config
    block = model.layers[layer]
    x, _, _ = batch(model, 1)
    g = torch.Generator().manual_seed(2)
    shift, scale = torch.randn(4, c.hidden_size, generator=g), torch.randn(4, c.hidden_size, generator=g)
    with torch.no_grad():
        D, value_norm = model.module_forward(layer, "attn", x, (shift, scale), grid_context(model))
        x_m = torch.nn.functional.layer_norm(x, (c.hidden_size,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        S = c.num_tokens // c.frames
        v_norm = ref.value_norms(block.attn.qkv, c.num_heads, x_m, c.frames, S, temporal=layer % 2 == 1)
    assert_same_choice("duca-value-norm", layer, "attn", D, value_norm, ref.kv_norm_score(v_norm))


def test_policies_use_the_official_scores():
    from soda.policies import ScheduleSpec, make_schedule

    spec = ScheduleSpec("opensora-tiny", "0" * 16, 4, ("attn", "cross_attn", "mlp"), 80, "rflow", 30)
    assert make_schedule("toca", spec).selector == "toca-cross-entropy"
    assert make_schedule("duca", spec).selector == "duca-value-norm"
    duca = make_schedule("duca", spec, selector="duca-random", seed=4)
    assert duca.selector == "duca-random" and duca.params["selector_params"]["seed"] == 4
