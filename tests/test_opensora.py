"""Our STDiT3 adapter and numpy rflow sampler against the transcription of the official Open-Sora 1.2
code (tests/reference/official_stdit3.py), same weights loaded key-for-key (strict).

Tolerances are relative to the output's largest magnitude: 1e-5 for one forward pass (CFG batch with
the learned null caption, captions masked to different lengths), 1e-4 at every step of a 30-step
rflow CFG-7 trajectory with the timestep transform. The transcription itself is checked against the
official code in test_opensora_official.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from soda.errors import UserError
from soda.models.config import ModelConfig
from soda.models.opensora import STDiT3, latent_frames, video_config
from soda.rflow import RFlow, check_num_frames
from soda.sampling import Conditioning, SamplerConfig, sample_loop
from tests.reference import official_stdit3 as ref

# 2 spatial + 2 temporal blocks, width 48, 3 heads (head width 16, even for RoPE), 24-wide captions
# of up to 10 tokens. The latent has an odd width (5), so patch padding and the crop run.
N, T, H, W = 2, 5, 6, 5
HEIGHT, WIDTH, FRAMES, FPS = 48, 40, 17, 24
BASE = ModelConfig("opensora", depth=4, hidden_size=48, patch_size=2, num_heads=3, in_channels=4, num_classes=0,
                   arch="opensora", caption_channels=24, caption_len=10, qk_norm=True)
SMALL = video_config(BASE, HEIGHT, WIDTH, FRAMES)
LENGTHS = (7, 3)


def official_kwargs(cfg: ModelConfig) -> dict:
    return dict(depth=cfg.depth // 2, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                patch_size=(1, cfg.patch_size, cfg.patch_size), in_channels=cfg.in_channels,
                caption_channels=cfg.caption_channels, model_max_length=cfg.caption_len, input_sq_size=512,
                qk_norm=cfg.qk_norm, pred_sigma=cfg.learn_sigma, mlp_ratio=cfg.mlp_ratio)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = STDiT3(SMALL)
    ours.randomize(0)
    official = ref.STDiT3(ref.STDiT3Config(**official_kwargs(SMALL)))
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), official.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 4, T, H, W, generator=g)
    y = torch.randn(N, SMALL.caption_len, SMALL.caption_channels, generator=g)
    mask = torch.zeros(N, SMALL.caption_len, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    return x, y, mask


def cfg_batch(model, y, mask):
    """[cond; learned null caption], the conditional mask for both halves (as RFLOW.sample + encode_text)."""
    null = model.y_embedder.y_embedding[None].repeat(y.shape[0], 1, 1)
    return torch.cat([y, null]), torch.cat([mask, mask])


def test_state_dict_keys_match_official(pair):
    ours, official = pair
    assert list(ours.state_dict()) == list(official.state_dict())
    assert "rope.freqs" in ours.state_dict() and "y_embedder.y_embedding" in ours.state_dict()


def test_layers_interleave_spatial_and_temporal(pair):
    ours, _ = pair
    layers = ours.layers
    assert len(layers) == SMALL.depth == 4
    assert [b.temporal for b in layers] == [False, True] * 2
    assert layers[1] is ours.temporal_blocks[0] and layers[2] is ours.spatial_blocks[1]


@torch.no_grad()
def test_forward_cfg_masks_match_official(pair, inputs):
    ours, official = pair
    x, y, mask = inputs
    y2, mask2 = cfg_batch(ours, y, mask)
    x2, t2 = torch.cat([x, x]), torch.tensor([870.0, 870.0, 250.0, 250.0])
    info = ref.multi_resolution_info(N, (HEIGHT, WIDTH), FRAMES, FPS)
    want = official(x2, t2, y2[:, None], mask=mask, fps=info["fps"], height=info["height"], width=info["width"])
    got = ours(x2, t2, y2, mask2, torch.full((2 * N,), float(FPS)), HEIGHT, WIDTH)
    assert got.shape == want.shape == (2 * N, 8, T, H, W)
    assert rel_err(got, want) < 1e-5
    # The masks matter: attending to the padded caption tokens gives a different output.
    unmasked = ours(x2, t2, y2, torch.ones_like(mask2), torch.full((2 * N,), float(FPS)), HEIGHT, WIDTH)
    assert rel_err(unmasked, want) > 1e-3


@torch.no_grad()
def test_rflow_30_step_cfg7_trajectory_matches_official(pair, inputs):
    ours, official = pair
    x, y, mask = inputs
    info = ref.multi_resolution_info(N, (HEIGHT, WIDTH), FRAMES, FPS)
    enc = ref.PrecomputedT5(y, mask)
    enc.y_embedder = official.y_embedder
    want: list = []
    ref.RFLOW(num_sampling_steps=30, cfg_scale=7.0, use_timestep_transform=True).sample(
        official, enc, x.clone(), ["a", "b"], "cpu", additional_args=dict(info), trajectory=want)

    got = run_rflow(lambda s, z, t, c: forward_fn(ours, z, t, c), ours, x, y, mask)
    assert len(got) == len(want) == 30
    errs = [rel_err(a, b.numpy()) for a, b in zip(got, want)]
    assert max(errs) < 1e-4, errs


def conditioning(model, y, mask) -> Conditioning:
    """[prompts; learned null caption under the prompts' masks], the video (fps, latent grid,
    position-embedding scale) per row (the official batch)."""
    from soda.generate import with_video

    null = model.null_caption_table()[None, : y.shape[1]]
    m = mask.numpy().astype(np.float32)
    sampler = SamplerConfig("rflow", 30, 7.0, None, video=(HEIGHT, WIDTH, FRAMES, FPS))
    return with_video(Conditioning({"caption": y.numpy(), "mask": m}, {"caption": null, "mask": m}), SMALL, sampler)


def forward_fn(model, z, t, cond):
    """model_fn for sample_loop through the whole forward (dynamic video size)."""
    return model(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(cond["caption"]),
                 torch.from_numpy(cond["mask"]), torch.from_numpy(cond["fps"]), HEIGHT, WIDTH).numpy()


def run_rflow(model_fn, model, x, y, mask, steps: int = 30) -> list:
    """z after every step of an rflow CFG-7 generation through soda.sampling.sample_loop."""
    rflow = RFlow.from_config(SamplerConfig("rflow", steps, 7.0, None, video=(HEIGHT, WIDTH, FRAMES, FPS)))
    got, step = [], rflow.step
    rflow.step = lambda s, z, out, noise=None: got.append(step(s, z, out, noise)) or got[-1]
    sample_loop(model_fn, rflow, x.numpy(), conditioning(model, y, mask), None, 4)
    return got


def test_executor_full_schedule_is_the_model(pair, inputs):
    """The stitching loop over the adapter protocol (caption K/V once per generation, modules one
    by one) reproduces the plain forward's trajectory."""
    from soda.executor import Executor
    from soda.flops import FlopsModel
    from soda.policies import ScheduleSpec
    from soda.policies.full import full_schedule
    from soda.torch_backend import TorchBackend

    ours, _ = pair
    x, y, mask = inputs
    with torch.no_grad():
        want = run_rflow(lambda s, z, t, c: forward_fn(ours, z, t, c), ours, x, y, mask, steps=6)
    spec = ScheduleSpec.for_model(SMALL, "rflow", 6)
    executor = Executor(TorchBackend(ours), full_schedule(spec), FlopsModel.for_config(SMALL))
    got = run_rflow(executor, ours, x, y, mask, steps=6)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-5


def test_timestep_grid_equals_official():
    for h, w, f in ((HEIGHT, WIDTH, FRAMES), (240, 426, 51), (720, 1280, 102), (512, 512, 1)):
        info = ref.multi_resolution_info(1, (h, w), f, 24)
        want = [ref.timestep_transform(torch.tensor([(1.0 - i / 30) * 1000]), info, num_timesteps=1000).item()
                for i in range(30)]
        got = RFlow.from_config(SamplerConfig("rflow", 30, 7.0, None, video=(h, w, f, 24))).timesteps
        np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))
    # 51 frames at 240x426: r = sqrt(240*426/512^2) * sqrt(15) > 1 pushes every time towards the noise end.
    grid = RFlow.from_config(SamplerConfig("rflow", 30, 7.0, None, video=(240, 426, 51, 24))).timesteps
    assert grid[0] == 1000 and np.all(grid[1:] > np.linspace(1000, 0, 31)[1:-1])


def test_latent_frames_follow_the_vae():
    assert [latent_frames(f) for f in (1, 4, 5, 16, 17, 51, 68, 102)] == [1, 1, 2, 4, 5, 15, 20, 30]
    assert video_config(BASE, 240, 426, 51).latent_shape == (4, 15, 30, 53)
    assert video_config(BASE, 240, 426, 51).num_tokens == 15 * 15 * 27


@pytest.mark.parametrize("frames", [0, 2, 16])
def test_frames_the_transform_cannot_express(frames):
    with pytest.raises(UserError, match="--num-frames"):
        check_num_frames(frames)


def test_caption_width_mismatch_is_one_clear_error(pair):
    ours, _ = pair
    with pytest.raises(UserError, match="caption width 16 does not match the checkpoint's 24"):
        ours.encode_caption(torch.zeros(1, 4, 16))
    with pytest.raises(UserError, match="selects no token"):
        ours.encode_caption(torch.zeros(1, 4, 24), torch.zeros(1, 4))


# --- checkpoints ----------------------------------------------------------------------------------
def test_checkpoints_load_from_safetensors_and_bare_state_dicts(pair, tmp_path, inputs):
    from safetensors.torch import save_file

    from soda.models import opensora

    ours, _ = pair
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    bare = {k: v for k, v in state.items() if k != "rope.freqs"}  # rope.freqs is a constant; may be absent
    torch.save(bare, tmp_path / "bare.pt")
    torch.save({"ema": bare}, tmp_path / "train.pt")
    x, y, mask = inputs
    args = (torch.cat([x, x]), torch.tensor([500.0] * 4), *cfg_batch(ours, y, mask), torch.tensor([24.0]), 48, 40)
    with torch.no_grad():
        want = ours(*args)
        for f in ("model.safetensors", "bare.pt", "train.pt"):
            model, ident = opensora.load("opensora", tmp_path / f)
            # depth, width, heads (from the q/k norm), caption size read back; the video size is the
            # official default until set
            assert video_config(model.config, HEIGHT, WIDTH, FRAMES) == SMALL
            assert model.config.latent_shape == (4, 15, 30, 53)
            assert len(ident) == 64
            torch.testing.assert_close(model(*args), want, rtol=0, atol=0)


def test_generic_config_needs_heads_only_without_qk_norm(pair):
    from soda.models import opensora

    ours, _ = pair
    state = {k: v for k, v in ours.state_dict().items() if "q_norm" not in k and "k_norm" not in k and k != "rope.freqs"}
    with pytest.raises(UserError, match="pass --num-heads"):
        opensora.infer_config(state)
    cfg = opensora.infer_config(state, num_heads=3)
    assert (cfg.num_heads, cfg.qk_norm) == (3, False)
    with pytest.raises(UserError, match="disagrees with the checkpoint's head width 16"):
        opensora.infer_config(ours.state_dict(), num_heads=4)


def test_checkpoint_misfits_are_one_clear_error(pair, tmp_path):
    from soda.models import opensora

    ours, _ = pair
    torch.save({k: v for k, v in ours.state_dict().items()}, tmp_path / "small.pt")
    with pytest.raises(UserError, match="does not fit opensora-v1.2: .*shape mismatch"):
        opensora.load("opensora-v1.2", tmp_path / "small.pt")
    torch.save({"pos_embed": torch.zeros(1, 4, 8)}, tmp_path / "dit.pt")
    with pytest.raises(UserError, match="does not look like an Open-Sora STDiT3"):
        opensora.load("opensora", tmp_path / "dit.pt")
    with pytest.raises(UserError, match="has 16 heads; --num-heads is for --model opensora"):
        opensora.load("opensora-v1.2", tmp_path / "small.pt", num_heads=8)
    with pytest.raises(UserError, match="needs --ckpt"):
        opensora.load("opensora-v1.2")
