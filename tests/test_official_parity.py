"""Our DiT and sampler against an independent transcription of the official facebookresearch/DiT
code (tests/reference/official_dit.py), with the same weights loaded key-for-key (strict).

Tolerances are relative to the output's largest magnitude: 1e-5 for one forward pass (with and
without CFG), 1e-4 for a whole DDIM-50 trajectory with CFG 4.0 and for a DDPM trajectory with
injected per-step noise. Our attention uses an explicit softmax, the official (timm) one
F.scaled_dot_product_attention, so agreement is to float32 rounding, not bit-exact.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soda.models.config import REGISTRY, ModelConfig
from soda.models.dit import DiT
from soda.sampling import Diffusion, SamplerConfig, cfg_combine, initial_noise
from tests.reference import official_dit as ref

ROOT = Path(__file__).resolve().parent.parent

# A small non-registered config: 3 layers, width 96 (not a standard DiT width), 3 heads, 8x8x4
# latents with patch 2 -> 16 tokens, 10 classes, learned sigma.
SMALL = ModelConfig("dit", depth=3, hidden_size=96, patch_size=2, num_heads=3, input_size=8, in_channels=4,
                    num_classes=10)
LABELS = np.array([1, 7], dtype=np.int64)


def official_kwargs(cfg: ModelConfig) -> dict:
    return dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                class_dropout_prob=cfg.class_dropout_prob, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma)


def make_pair(cfg: ModelConfig, seed: int = 0) -> tuple[DiT, ref.DiT]:
    """Ours with random non-zero weights everywhere, and the official model with the same state dict."""
    torch.manual_seed(seed)
    ours = DiT(cfg)
    ours.randomize_zero_init(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # randomize_zero_init's 0.02 leaves the gates so small that the blocks barely move the
        # output; give the adaLN layers unit-scale gates and every bias a value, so a wrong
        # activation, norm or timestep shows up in the output.
        for name, p in ours.named_parameters():
            if "adaLN_modulation" in name and name.endswith(".weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    official = ref.DiT(**official_kwargs(cfg))
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), official.eval()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pair():
    return make_pair(SMALL)


# --- (a) one forward pass ----------------------------------------------------------------------
def test_state_dict_keys_and_shapes_match(pair):
    ours, official = pair
    a, b = ours.state_dict(), official.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert np.abs(a["blocks.0.adaLN_modulation.1.weight"].numpy()).max() > 0  # really non-zero


@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_official(fused):
    ref.FUSED_ATTN = fused
    try:
        ours, official = make_pair(SMALL, seed=3)
    finally:
        ref.FUSED_ATTN = True
    assert official.blocks[0].attn.fused_attn is fused
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 17, 0])
    y = torch.tensor([0, 3, 9, 10])  # 10 is the null label
    with torch.no_grad():
        want = official(x, t, y)
        got = ours(x, t, y)
    assert got.shape == want.shape == (4, 8, 8, 8)
    assert rel_err(got, want) <= 1e-5
    assert np.abs(want.numpy()).max() > 1e-2  # a non-trivial output


def test_forward_with_cfg_matches_official(pair):
    """official forward_with_cfg on the doubled batch vs ours: forward then cfg_combine."""
    ours, official = pair
    n = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=g)
    x2 = torch.cat([x, x])
    y2 = torch.tensor([*LABELS.tolist(), 10, 10])
    t2 = torch.tensor([601] * 2 * n)
    with torch.no_grad():
        want = official.forward_with_cfg(x2, t2, y2, 4.0)[:n].numpy()
        raw = ours(x2, t2, y2).numpy()
    got = cfg_combine(raw, n, 4.0, 3, 4)
    assert rel_err(got, want) <= 1e-5
    # The official guidance leaves channel 3 unguided: all-channel guidance must differ there.
    all_ch = cfg_combine(raw, n, 4.0, None, 4)
    assert np.abs(all_ch[:, 3] - want[:, 3]).max() > 1e-3


def test_adapter_interface_composes_to_official(pair):
    """embed -> per-block modulation/run_module with the residual -> final == official forward."""
    ours, official = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250, 800])
    y = torch.tensor([4, 10])
    with torch.no_grad():
        tokens, c = ours.embed(x, t, y)
        for block in ours.blocks:
            mods = block.modulation(c)
            for name in block.modules_order:
                tokens = tokens + mods[name].gate.unsqueeze(1) * block.run_module(name, tokens, mods[name])
        got = ours.final(tokens, c)
        want = official(x, t, y)
    assert rel_err(got, want) <= 1e-5


# --- (b) a whole DDIM-50 trajectory with CFG 4.0 ------------------------------------------------
def official_sample(official, noise: np.ndarray, labels: np.ndarray, steps: str, kind: str, cfg_scale: float,
                    null_label: int) -> np.ndarray:
    """As the official sample.py does it: doubled noise and labels, forward_with_cfg, no clipping."""
    diffusion = ref.create_diffusion(steps)
    n = len(labels)
    z = torch.from_numpy(noise)
    z = torch.cat([z, z], 0)
    y = torch.cat([torch.from_numpy(labels), torch.tensor([null_label] * n)], 0)
    model_kwargs = dict(y=y, cfg_scale=cfg_scale)
    loop = diffusion.ddim_sample_loop if kind == "ddim" else diffusion.p_sample_loop
    samples = loop(official.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=model_kwargs,
                   progress=False, device="cpu")
    samples, _ = samples.chunk(2, dim=0)
    return samples.numpy()


def ours_generate(ours, sampler: SamplerConfig, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from soda.generate import generate
    from soda.policies import ScheduleSpec
    from soda.policies.full import full_schedule
    from soda.torch_backend import TorchBackend

    schedule = full_schedule(ScheduleSpec.for_model(ours.config, sampler.kind, sampler.steps))
    x, _ = generate(TorchBackend(ours), ours.config, sampler, schedule, labels, seed=0, noise=noise)
    return x


def test_ddim50_cfg4_trajectory_matches_official(pair):
    ours, official = pair
    noise, _ = initial_noise(len(LABELS), (4, 8, 8), seed=5)
    want = official_sample(official, noise, LABELS, "50", "ddim", 4.0, SMALL.null_label)
    got = ours_generate(ours, SamplerConfig("ddim", 50, 4.0, 3), noise, LABELS)
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= 1e-4
    assert np.abs(got - noise).max() > 0.1  # the sampler moved


def test_ddim50_cfg4_through_cli_matches_official(pair, tmp_path):
    """`cli.py sample --model dit --ckpt X.safetensors --num-heads 3 --noise N --save-latents L`."""
    from safetensors.torch import save_file

    ours, official = pair
    ckpt = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(ckpt))
    noise, _ = initial_noise(len(LABELS), (4, 8, 8), seed=6)
    np.save(tmp_path / "noise.npy", noise)
    latents = tmp_path / "latents.npy"
    r = run_cli("sample", "--model", "dit", "--ckpt", str(ckpt), "--num-heads", "3", "--labels", "1,7",
                "--steps", "50", "--cfg-scale", "4.0", "--noise", str(tmp_path / "noise.npy"),
                "--save-latents", str(latents), "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    got = np.load(latents)
    want = official_sample(official, noise, LABELS, "50", "ddim", 4.0, SMALL.null_label)
    assert rel_err(got, want) <= 1e-4


# --- (c) DDPM: same injected per-step noise -----------------------------------------------------
@pytest.mark.parametrize("s", [0, 4, 9])
def test_ddpm_single_step_matches_official_p_sample(pair, s):
    ours, official = pair
    n = len(LABELS)
    steps = 10
    diffusion = ref.create_diffusion(str(steps))
    mine = Diffusion(SamplerConfig("ddpm", steps, 4.0, 3))
    assert mine.timestep_map == diffusion.timestep_map
    rng = np.random.default_rng(10 + s)
    x = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    step_noise = rng.standard_normal(x.shape).astype(np.float32)
    i = steps - 1 - s  # official index into the respaced tables
    x2 = torch.cat([torch.from_numpy(x)] * 2)
    y2 = torch.tensor([*LABELS.tolist(), 10, 10])
    noise2 = torch.cat([torch.from_numpy(step_noise), torch.zeros(n, 4, 8, 8)])
    with torch.no_grad():
        want = diffusion.p_sample(official.forward_with_cfg, x2, torch.tensor([i] * 2 * n), clip_denoised=False,
                                  model_kwargs=dict(y=y2, cfg_scale=4.0), noise=noise2)["sample"][:n].numpy()
        t = np.full(2 * n, mine.model_timestep(s), dtype=np.int64)
        raw = ours(x2, torch.from_numpy(t), y2).numpy()
    got = mine.step(s, x, cfg_combine(raw, n, 4.0, 3, 4), step_noise if s < steps - 1 else None)
    assert rel_err(got, want) <= 1e-5


def test_ddpm_trajectory_with_our_noise_matches_official(pair):
    """The whole DDPM-10 loop, feeding the official p_sample the noise our rng draws, in our order."""
    ours, official = pair
    n, steps = len(LABELS), 10
    noise, rng = initial_noise(n, (4, 8, 8), seed=8)
    got = ours_generate(ours, SamplerConfig("ddpm", steps, 4.0, 3), noise, LABELS)
    # replay: generate() draws initial noise from default_rng(seed=0) then one normal per step
    _, rng = initial_noise(n, (4, 8, 8), seed=0)
    diffusion = ref.create_diffusion(str(steps))
    img = torch.cat([torch.from_numpy(noise)] * 2)
    y2 = torch.tensor([*LABELS.tolist(), 10, 10])
    with torch.no_grad():
        for i in range(steps)[::-1]:
            step_noise = rng.standard_normal((n, 4, 8, 8)).astype(np.float32) if i > 0 else np.zeros((n, 4, 8, 8), np.float32)
            noise2 = torch.cat([torch.from_numpy(step_noise), torch.zeros(n, 4, 8, 8)])
            img = diffusion.p_sample(official.forward_with_cfg, img, torch.tensor([i] * 2 * n), clip_denoised=False,
                                     model_kwargs=dict(y=y2, cfg_scale=4.0), noise=noise2)["sample"]
    want = img[:n].numpy()
    assert rel_err(got, want) <= 1e-4


def test_fixed_variance_model_step_matches_official():
    """learn_sigma=False: official FIXED_LARGE variance vs ours, one DDPM step, no CFG."""
    cfg = ModelConfig("dit", depth=2, hidden_size=64, patch_size=2, num_heads=4, input_size=8, in_channels=4,
                      num_classes=10, learn_sigma=False)
    ours, official = make_pair(cfg, seed=4)
    steps, s = 25, 7
    diffusion = ref.create_diffusion(str(steps), learn_sigma=False)
    mine = Diffusion(SamplerConfig("ddpm", steps, 1.0), learn_sigma=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    step_noise = rng.standard_normal(x.shape).astype(np.float32)
    i = steps - 1 - s
    y = torch.from_numpy(LABELS)
    with torch.no_grad():
        want = diffusion.p_sample(official, torch.from_numpy(x), torch.tensor([i, i]), clip_denoised=False,
                                  model_kwargs=dict(y=y), noise=torch.from_numpy(step_noise))["sample"].numpy()
        raw = ours(torch.from_numpy(x), torch.tensor([mine.model_timestep(s)] * 2), y).numpy()
    got = mine.step(s, x, raw, step_noise)
    assert rel_err(got, want) <= 1e-5


# --- (d) every official config: same parameter names, shapes and count --------------------------
OFFICIAL_NAMES = {f"dit-{size}-{p}": f"DiT-{size.upper()}/{p}" for size in ("s", "b", "l", "xl") for p in (2, 4, 8)}


@pytest.mark.parametrize("name", sorted(OFFICIAL_NAMES))
def test_registry_config_has_official_parameters(name):
    """Built on the meta device (no memory, no init cost): names, shapes and count must match."""
    with torch.device("meta"):
        official = ref.DiT_models[OFFICIAL_NAMES[name]](input_size=32, num_classes=1000)
        ours = DiT(REGISTRY[name])
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert a == b
    count = sum(p.numel() for p in official.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count


def test_official_xl2_count_is_the_published_one():
    """Anchor for the transcription: train.py logs 'DiT Parameters: 675,129,632' for DiT-XL/2."""
    with torch.device("meta"):
        official = ref.DiT_XL_2(input_size=32, num_classes=1000)
    assert sum(p.numel() for p in official.parameters()) == 675_129_632


def test_small_registry_model_really_instantiates_like_official():
    """One real (not meta) instantiation: DiT-S/8 and the official one load each other's weights."""
    torch.manual_seed(0)
    ours = DiT(REGISTRY["dit-s-8"])
    official = ref.DiT_S_8(input_size=32, num_classes=1000)
    official.load_state_dict(ours.state_dict(), strict=True)
    np.testing.assert_array_equal(ours.pos_embed.detach().numpy(), official.pos_embed.detach().numpy())


# --- the generic `dit` config inferred from a checkpoint ----------------------------------------
def test_infer_config_of_a_non_registered_width(pair, tmp_path):
    from soda.errors import UserError
    from soda.models.loading import infer_config, load_model

    ours, official = pair
    state = ours.state_dict()
    cfg = infer_config(state, num_heads=3)
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads, cfg.input_size, cfg.in_channels,
            cfg.num_classes, cfg.learn_sigma, cfg.mlp_ratio) == (3, 96, 2, 3, 8, 4, 10, True, 4.0)
    with pytest.raises(UserError, match="--num-heads"):
        infer_config(state)  # 96 is not a standard width: heads cannot be guessed
    with pytest.raises(UserError, match="does not divide"):
        infer_config(state, num_heads=5)
    path = tmp_path / "w96.pt"
    torch.save(state, path)
    model, weights_id = load_model("dit", path, num_heads=3)
    assert len(weights_id) == 64
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 900]), torch.tensor([2, 10])
    with torch.no_grad():
        assert rel_err(model(x, t, y), official(x, t, y)) <= 1e-5
