"""PixArt-alpha: a tiny random model built with the official code, converted to diffusers.

Ours (loaded from the official .pth and from the diffusers folder) against diffusers'
PixArtTransformer2DModel and the official transcription: forward with CFG and masks of
different lengths, the DPM-Solver++ sampler against DPMSolverMultistepScheduler, and a 20-step
CFG-4.5 trajectory against a diffusers-scheduler loop.
"""
import numpy as np
import pytest
import torch

from soda.errors import UserError

DEPTH, HEADS, HIDDEN, CAPTION, SIDE, L = 2, 4, 64, 32, 8, 7


@pytest.fixture(scope="module")
def official():
    from tests.reference.official_pixart import PixArt

    torch.manual_seed(0)
    model = PixArt(input_size=SIDE, patch_size=2, in_channels=4, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS,
                   caption_channels=CAPTION, lewei_scale=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the official init zeroes the output and cross-attention projections
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(official, tmp_path_factory):
    """(official .pth, diffusers folder) of the same tiny model."""
    from diffusers import PixArtTransformer2DModel

    from tests.reference.official_pixart import convert_to_diffusers

    root = tmp_path_factory.mktemp("pixart")
    pth = root / "PixArt-tiny.pth"
    torch.save({"state_dict": official.state_dict()}, pth)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=4, out_channels=8,
        num_layers=DEPTH, cross_attention_dim=HIDDEN, attention_bias=True, sample_size=SIDE, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=0.5, use_additional_conditions=False,
        caption_channels=CAPTION)
    transformer.load_state_dict(convert_to_diffusers(official.state_dict(), DEPTH), strict=True)
    folder = root / "pipeline"
    transformer.save_pretrained(folder / "transformer")
    return pth, folder, transformer.eval()


@pytest.fixture(scope="module")
def ours(checkpoints):
    from soda.models.loading import load_model

    pth, folder, _ = checkpoints
    return load_model("pixart", pth, HEADS)[0], load_model("pixart", folder)[0]


def inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    caption = rng.standard_normal((n, L, CAPTION)).astype(np.float32)
    lengths = [L, 3, 1][:n] + [2] * max(0, n - 3)
    mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.float32)
    neg = rng.standard_normal((n, L, CAPTION)).astype(np.float32)
    neg_mask = (np.arange(L)[None] < np.array([2, L, 5][:n] + [4] * max(0, n - 3))[:, None]).astype(np.float32)
    x = rng.standard_normal((n, 4, SIDE, SIDE)).astype(np.float32)
    return x, caption, mask, neg, neg_mask


def diffusers_out(transformer, x, t, caption, mask):
    with torch.no_grad():
        return transformer(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(caption),
                           timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_config_read_from_both_checkpoints(ours):
    a, b = ours
    for m in (a, b):
        c = m.config
        assert (c.depth, c.hidden_size, c.num_heads, c.input_size, c.caption_channels) == (DEPTH, HIDDEN, HEADS, SIDE, CAPTION)
        assert c.pe_interpolation == 0.5 and c.arch == "pixart" and c.modules == ("attn", "cross_attn", "mlp")
    assert a.has_null_caption and not b.has_null_caption
    assert a.config.hash() == b.config.hash()


def test_forward_equals_diffusers_and_official_with_cfg_and_masks(ours, checkpoints, official):
    """The doubled CFG batch [cond; uncond], every row with its own caption length."""
    _, _, transformer = checkpoints
    x, caption, mask, neg, neg_mask = inputs()
    xx = np.concatenate([x, x])
    cap, msk = np.concatenate([caption, neg]), np.concatenate([mask, neg_mask])
    t = np.array([999, 500, 20] * 2)
    want = diffusers_out(transformer, xx, t, cap, msk)
    with torch.no_grad():
        official_out = official(torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(cap)[:, None],
                                torch.from_numpy(msk)).numpy()
    assert rel(official_out, want) < 1e-5
    for model in ours:
        with torch.no_grad():
            got = model(torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(msk)).numpy()
        assert got.shape == (6, 8, SIDE, SIDE)
        assert rel(got, want) < 1e-5
    # the mask matters: dropping it changes the output
    with torch.no_grad():
        unmasked = ours[0](torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(cap),
                           torch.ones(msk.shape)).numpy()
    assert rel(unmasked, want) > 1e-3


def test_executor_equals_whole_forward(ours):
    """The stitched executor (prepare once, embed, modulation, modules) is the model's forward."""
    from soda.executor import Executor
    from soda.flops import FlopsModel
    from soda.policies import ScheduleSpec, make_schedule
    from soda.torch_backend import TorchBackend

    model = ours[0]
    spec = ScheduleSpec.for_model(model.config, "dpm-solver", 2)
    ex = Executor(TorchBackend(model), make_schedule("full", spec), FlopsModel.for_config(model.config))
    x, caption, mask, _, _ = inputs()
    t = np.array([999, 500, 20])
    got = ex(0, x, t, {"caption": caption, "mask": mask})
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(caption), torch.from_numpy(mask)).numpy()
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("steps", [20, 7, 1])
def test_sampler_equals_diffusers_scheduler(steps):
    from diffusers import DPMSolverMultistepScheduler

    from soda.sampling import SamplerConfig, make_diffusion

    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(steps)
    ours = make_diffusion(SamplerConfig("dpm-solver", steps, 4.5, None))
    assert [ours.model_timestep(s) for s in range(steps)] == sch.timesteps.tolist()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for s in range(steps):
        eps = (np.tanh(x) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        out = np.concatenate([eps, rng.standard_normal(x.shape).astype(np.float32)], axis=1)  # sigma channels dropped
        xt = sch.step(torch.from_numpy(eps), sch.timesteps[s], xt).prev_sample
        x = ours.step(s, x, out)
        assert rel(x, xt.numpy()) < 1e-6, s
        x = xt.numpy().copy()


def diffusers_loop(transformer, noise, caption, mask, neg, neg_mask, steps=20, scale=4.5):
    """PixArtAlphaPipeline's denoising loop: [uncond; cond], guidance on all channels, sigma dropped."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(steps)
    latents = torch.from_numpy(noise)
    cap = torch.from_numpy(np.concatenate([neg, caption]))
    msk = torch.from_numpy(np.concatenate([neg_mask, mask]))
    with torch.no_grad():
        for t in sch.timesteps:
            inp = torch.cat([latents] * 2)
            out = transformer(inp, encoder_hidden_states=cap, encoder_attention_mask=msk, timestep=t.expand(len(inp)),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            uncond, text = out.chunk(2)
            out = uncond + scale * (text - uncond)
            latents = sch.step(out.chunk(2, dim=1)[0], t, latents).prev_sample
    return latents.numpy()


def test_trajectory_equals_diffusers_loop_from_both_checkpoints(ours, checkpoints):
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import generate
    from soda.policies import ScheduleSpec, make_schedule
    from soda.sampling import SamplerConfig
    from soda.torch_backend import TorchBackend

    _, _, transformer = checkpoints
    x, caption, mask, neg, neg_mask = inputs()
    want = diffusers_loop(transformer, x, caption, mask, neg, neg_mask)
    sampler = SamplerConfig("dpm-solver", 20, 4.5, None)
    for model in ours:
        cond = caption_conditioning(PromptEmbeds(caption, mask, neg, neg_mask), None)
        sched = make_schedule("full", ScheduleSpec.for_model(model.config, "dpm-solver", 20))
        got, _ = generate(TorchBackend(model), model.config, sampler, sched, cond, noise=x)
        assert rel(got, want) < 1e-4
    # Without negatives: the official null caption under each prompt's mask (the .pth has it) ...
    null = ours[0].null_caption(L).numpy()
    cond = caption_conditioning(PromptEmbeds(caption, mask), null)
    got, _ = generate(TorchBackend(ours[0]), ours[0].config, sampler, sched, cond, noise=x)
    want_null = diffusers_loop(transformer, x, caption, mask, np.repeat(null[None], 3, 0), mask)
    assert rel(got, want_null) < 1e-4 and rel(want_null, want) > 1e-3
    # ... which a diffusers checkpoint does not have: one clear error.
    with pytest.raises(UserError, match="no learned null caption"):
        caption_conditioning(PromptEmbeds(caption, mask), None)


def test_bad_prompt_embeds(tmp_path):
    from soda.captions import load_prompt_embeds

    x, caption, mask, neg, neg_mask = inputs()
    cases = {
        "dim": dict(prompt_embeds=caption[:, :, :5], prompt_attention_mask=mask),
        "maskshape": dict(prompt_embeds=caption, prompt_attention_mask=mask[:, :3]),
        "maskvalues": dict(prompt_embeds=caption, prompt_attention_mask=mask * 2),
        "missing": dict(prompt_embeds=caption),
        "halfneg": dict(prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt_embeds=neg),
        "negrows": dict(prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt_embeds=neg[:2],
                        negative_prompt_attention_mask=neg_mask[:2]),
    }
    expect = {"dim": "caption dimension 5, the checkpoint expects 32", "maskshape": "prompt_attention_mask has shape",
              "maskvalues": "only 0 and 1", "missing": "lacks prompt_attention_mask", "halfneg": "give both",
              "negrows": "give 1 or 3"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(UserError, match=expect[name]):
            load_prompt_embeds(tmp_path / f"{name}.npz", CAPTION)
    np.save(tmp_path / "one.npy", caption)  # one array, not the named ones: np.load gives no archive
    with pytest.raises(UserError, match="is one .npy array; give an .npz with prompt_embeds, prompt_attention_mask"):
        load_prompt_embeds(tmp_path / "one.npy", CAPTION)
    ok = tmp_path / "ok.npz"
    np.savez(ok, prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt_embeds=neg[:1],
             negative_prompt_attention_mask=neg_mask[:1])
    p = load_prompt_embeds(ok, CAPTION)
    assert len(p) == 3 and p.has_negatives and p.neg_embeds.shape == (1, L, CAPTION)


def test_checkpoint_refusals(tmp_path, official):
    from soda.models.loading import load_model

    sd = dict(official.state_dict())
    sd["csize_embedder.mlp.0.weight"] = torch.zeros(4, 256)
    ms = tmp_path / "PixArt-XL-2-1024-MS.pth"
    torch.save({"state_dict": sd}, ms)
    with pytest.raises(UserError, match="1024-MS adds resolution and aspect-ratio embedders"):
        load_model("pixart", ms, HEADS)
    with pytest.raises(UserError, match="1024-MS"):
        load_model("pixart-alpha-1024", random_init=True)
    with pytest.raises(UserError, match="not a diffusers PixArt folder"):
        load_model("pixart", tmp_path)
    with pytest.raises(UserError, match="not a standard PixArt width"):
        load_model("pixart", _plain(tmp_path, official))


def _plain(tmp_path, official):
    p = tmp_path / "plain.pth"
    torch.save({"state_dict": official.state_dict()}, p)
    return p  # width 64 is not a multiple of 72: heads must be given


def test_registry_xl2():
    from soda.flops import FlopsModel
    from soda.models.config import get_config

    c = get_config("pixart-alpha-512")
    assert (c.depth, c.hidden_size, c.num_heads, c.input_size, c.pe_interpolation) == (28, 1152, 16, 64, 1.0)
    assert get_config("pixart-alpha-1024").pe_interpolation == 2.0
    fm = FlopsModel.for_config(c)
    H, N, Lc = 1152, 1024, 120
    assert fm.module("cross_attn", 1, N) == 4 * N * H * H + 4 * N * Lc * H  # by caption length
    assert fm.condition(1) == 2 * Lc * (4096 * H + H * H) + 28 * 2 * Lc * H * 2 * H


def cli(*args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(root / "cli.py"), *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_sample_equals_diffusers_loop(checkpoints, tmp_path):
    """`cli.py sample --model pixart` from the .pth and the diffusers folder, against the diffusers loop."""
    pth, folder, transformer = checkpoints
    x, caption, mask, neg, neg_mask = inputs()
    np.save(tmp_path / "noise.npy", x)
    np.savez(tmp_path / "prompts.npz", prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt_embeds=neg,
             negative_prompt_attention_mask=neg_mask)
    want = diffusers_loop(transformer, x, caption, mask, neg, neg_mask)
    for ckpt, heads in ((pth, ["--num-heads", "4"]), (folder, [])):
        r = cli("sample", "--model", "pixart", "--ckpt", str(ckpt), *heads, "--prompt-embeds", str(tmp_path / "prompts.npz"),
                "--noise", str(tmp_path / "noise.npy"), "--sampler", "dpm-solver", "--steps", "20", "--cfg-scale", "4.5",
                "--save-latents", str(tmp_path / "x.npy"), "--out", str(tmp_path / "x.png"))
        assert r.returncode == 0, r.stderr
        assert rel(np.load(tmp_path / "x.npy"), want) < 1e-4
        assert (tmp_path / "x.png").stat().st_size > 0


def test_cli_bad_input_one_line(checkpoints, official, tmp_path):
    pth, folder, _ = checkpoints
    x, caption, mask, _, _ = inputs()
    np.savez(tmp_path / "wrongdim.npz", prompt_embeds=caption[:, :, :16], prompt_attention_mask=mask)
    np.savez(tmp_path / "wrongmask.npz", prompt_embeds=caption, prompt_attention_mask=mask[:, :4])
    np.savez(tmp_path / "noneg.npz", prompt_embeds=caption, prompt_attention_mask=mask)
    sd = dict(official.state_dict())
    sd["ar_embedder.mlp.0.weight"] = torch.zeros(4, 256)
    torch.save({"state_dict": sd}, tmp_path / "PixArt-XL-2-1024-MS.pth")
    cases = [
        (["--ckpt", str(pth), "--num-heads", "4", "--prompt-embeds", str(tmp_path / "wrongdim.npz")],
         "caption dimension 16, the checkpoint expects 32"),
        (["--ckpt", str(pth), "--num-heads", "4", "--prompt-embeds", str(tmp_path / "wrongmask.npz")],
         "prompt_attention_mask has shape [3, 4], expected [3, 7]"),
        (["--ckpt", str(folder), "--prompt-embeds", str(tmp_path / "noneg.npz")], "no learned null caption"),
        (["--ckpt", str(tmp_path / "PixArt-XL-2-1024-MS.pth"), "--num-heads", "4", "--prompt-embeds",
          str(tmp_path / "noneg.npz")], "1024-MS adds resolution and aspect-ratio embedders"),
        (["--ckpt", str(pth), "--num-heads", "4"], "text-conditioned: give --prompt-embeds"),
    ]
    for args, msg in cases:
        r = cli("sample", "--model", "pixart", *args, "--steps", "2", "--out", str(tmp_path / "x.png"))
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and msg in lines[-1] and "Traceback" not in r.stderr, r.stderr


def test_export_and_run_equal_sample(checkpoints, tmp_path):
    """export -> `run --engines DIR --prompt-embeds FILE` (numpy + onnxruntime) equals `sample`, with
    the learned null caption shipped in the folder (no negatives) and with a FORA schedule."""
    import json

    pth, _, _ = checkpoints
    x, caption, mask, _, _ = inputs()
    np.save(tmp_path / "noise.npy", x)
    np.savez(tmp_path / "p.npz", prompt_embeds=caption, prompt_attention_mask=mask)
    common = ["--prompt-embeds", str(tmp_path / "p.npz"), "--noise", str(tmp_path / "noise.npy")]
    model = ["--model", "pixart", "--ckpt", str(pth), "--num-heads", "4"]
    r = cli("export", *model, "--policy", "fora", "--out", str(tmp_path / "eng"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert "condition" in manifest["artefacts"] and manifest["null_caption"] == "null_caption.npy"
    cond_graph = manifest["artefacts"]["condition"]
    assert [i["name"] for i in cond_graph["inputs"]] == ["caption"] and cond_graph["inputs"][0]["shape"][1] == "L"
    assert [i["name"] for i in manifest["artefacts"]["cross_attn.1"]["inputs"]] == ["tokens", "k", "v", "mask"]
    for policy in ("full", "fora"):
        r = cli("sample", *model, *common, "--policy", policy, "--save-latents", str(tmp_path / "s.npy"),
                "--out", str(tmp_path / "s.png"))
        assert r.returncode == 0, r.stderr
        r = cli("run", "--engines", str(tmp_path / "eng"), *common, "--policy", policy, "--save-latents",
                str(tmp_path / "r.npy"), "--out", str(tmp_path / "r.png"))
        assert r.returncode == 0, r.stderr
        assert rel(np.load(tmp_path / "r.npy"), np.load(tmp_path / "s.npy")) < 1e-4


def test_runtime_equals_torch_for_toca_and_duca(ours, tmp_path):
    """ToCa / DuCa on PixArt through the exported graphs: the cross-attention entropy the selector
    reads comes out of the ONNX cross-attention graph; samples equal the PyTorch executor's."""
    from export.onnx_export import export_model
    from runtime.engines import open_engines
    from runtime.ort_backend import OrtBackend
    from soda.captions import PromptEmbeds, caption_conditioning
    from soda.generate import generate
    from soda.policies import ScheduleSpec, make_schedule
    from soda.sampling import SamplerConfig
    from soda.torch_backend import TorchBackend

    model = ours[0]
    sampler = SamplerConfig("dpm-solver", 20, 4.5, None)
    sp = ScheduleSpec.for_model(model.config, "dpm-solver", 20)
    toca, duca = make_schedule("toca", sp), make_schedule("duca", sp)
    assert toca.prune_rates() and duca.count_kinds()["skip"] > 0
    export_model(model, "test", toca, sampler, tmp_path / "eng", progress=False, echo=lambda *a: None)
    engines = open_engines(tmp_path / "eng")
    x, caption, mask, _, _ = inputs()
    cond = caption_conditioning(PromptEmbeds(caption, mask), engines.null_caption())
    for sched in (toca, duca):
        got, _ = generate(OrtBackend(engines, threads=1), model.config, sampler, sched, cond, noise=x)
        want, _ = generate(TorchBackend(model), model.config, sampler, sched, cond, noise=x)
        assert rel(got, want) < 1e-4, sched.policy
