"""Parity figures quoted in docs/pixart.md: the tiny model of tests/test_pixart.py, built with the
official code and converted to diffusers. Run from the repository root:

    python tests/pixart_figures.py
"""
import sys
import tempfile

import numpy as np
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
import tests.test_pixart as T
from tests.reference.official_pixart import PixArt as Official, convert_to_diffusers
from diffusers import PixArtTransformer2DModel
from soda.models.loading import load_model

torch.manual_seed(0)
official = Official(input_size=T.SIDE, patch_size=2, in_channels=4, hidden_size=T.HIDDEN, depth=T.DEPTH,
                    num_heads=T.HEADS, caption_channels=T.CAPTION, lewei_scale=0.5)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in official.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
official.eval()
root = tempfile.mkdtemp()
torch.save({"state_dict": official.state_dict()}, f"{root}/t.pth")
tr = PixArtTransformer2DModel(num_attention_heads=T.HEADS, attention_head_dim=T.HIDDEN // T.HEADS, in_channels=4,
    out_channels=8, num_layers=T.DEPTH, cross_attention_dim=T.HIDDEN, attention_bias=True, sample_size=T.SIDE,
    patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=0.5, use_additional_conditions=False,
    caption_channels=T.CAPTION)
tr.load_state_dict(convert_to_diffusers(official.state_dict(), T.DEPTH)); tr.eval()
tr.save_pretrained(f"{root}/pipe/transformer")
ours = [load_model("pixart", f"{root}/t.pth", T.HEADS)[0], load_model("pixart", f"{root}/pipe")[0]]
x, cap, mask, neg, negm = T.inputs()
xx = np.concatenate([x, x]); c2 = np.concatenate([cap, neg]); m2 = np.concatenate([mask, negm]); t = np.array([999, 500, 20] * 2)
want = T.diffusers_out(tr, xx, t, c2, m2)
with torch.no_grad():
    off = official(torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(c2)[:, None], torch.from_numpy(m2)).numpy()
    f = [m(torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(c2), torch.from_numpy(m2)).numpy() for m in ours]
print("forward max|diff|/max|ref|: official vs diffusers %.2e; ours(.pth) %.2e; ours(diffusers) %.2e" % (T.rel(off, want), T.rel(f[0], want), T.rel(f[1], want)))
from soda.captions import PromptEmbeds, caption_conditioning
from soda.generate import generate
from soda.policies import ScheduleSpec, make_schedule
from soda.sampling import SamplerConfig
from soda.torch_backend import TorchBackend
ref = T.diffusers_loop(tr, x, cap, mask, neg, negm)
s = SamplerConfig("dpm-solver", 20, 4.5, None)
for name, m in zip((".pth", "diffusers"), ours):
    got, _ = generate(TorchBackend(m), m.config, s, make_schedule("full", ScheduleSpec.for_model(m.config, "dpm-solver", 20)),
                      caption_conditioning(PromptEmbeds(cap, mask, neg, negm), None), noise=x)
    print("20-step dpm-solver CFG 4.5 trajectory, ours(%s) vs diffusers loop: %.2e" % (name, T.rel(got, ref)))
from diffusers import DPMSolverMultistepScheduler
from soda.sampling import make_diffusion
worst = 0
sch = DPMSolverMultistepScheduler(); sch.set_timesteps(20); d = make_diffusion(s)
rng = np.random.default_rng(0); xs = rng.standard_normal((2, 4, 8, 8)).astype(np.float32); xt = torch.from_numpy(xs.copy())
for k in range(20):
    e = (np.tanh(xs) + 0.3 * rng.standard_normal(xs.shape)).astype(np.float32)
    xt = sch.step(torch.from_numpy(e), sch.timesteps[k], xt).prev_sample
    xs = d.step(k, xs, e); worst = max(worst, T.rel(xs, xt.numpy())); xs = xt.numpy().copy()
print("sampler step vs DPMSolverMultistepScheduler, worst of 20 steps: %.2e" % worst)
