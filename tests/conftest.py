import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny: on a shared 2-core machine torch's thread barriers cost 4-10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config():
    """A 2-layer DiT with 16 tokens: fast enough for exhaustive checks."""
    from soda.models.config import ModelConfig

    return ModelConfig("dit-tiny", depth=2, hidden_size=32, patch_size=2, num_heads=4, input_size=8,
                       in_channels=4, num_classes=10)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch

    from soda.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(tiny_config)
    model.randomize_zero_init(0)
    return model.eval()


def strengthen(model, std: float = 1.0, seed: int = 1):
    """Random adaLN and final-layer weights of std `std`, so every module shows in the output.

    `randomize_zero_init` gives gates near 0.02: the blocks then barely reach the output, and a
    10% error in a module moves it by 5e-5, under a 1e-4 tolerance. With these weights a 0.1%
    module error fails such a tolerance many times over.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    params = [*(b.adaLN_modulation[-1].weight for b in model.blocks), model.final_layer.adaLN_modulation[-1].weight,
              model.final_layer.linear.weight]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="session")
def strong_tiny_model(tiny_config):
    """The tiny DiT with strong weights: for parity tests that must see a module's error."""
    import torch

    from soda.models.dit import DiT

    torch.manual_seed(0)
    return strengthen(DiT(tiny_config))


def cli_in_process(args: list[str], monkeypatch, capsys, cwd=None) -> subprocess.CompletedProcess:
    """`cli.main` with `args`, in this process (cheaper than a fresh interpreter on a shared machine)."""
    import cli

    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["cli.py", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def write_tiny_pixart(folder, n_prompts: int = 3, seed: int = 0):
    """A tiny random PixArt with 1-channel 8x8 "pixels" (no VAE needed) saved as an official .pth
    (load with `--model pixart --num-heads 2`), and an npz of `n_prompts` captions of different
    lengths, no negatives (the learned null caption is the unconditional row). Weights strong
    enough that the caption visibly moves the samples. Returns (pth, prompts npz)."""
    from pathlib import Path

    import numpy as np
    import torch

    from soda.models.config import ModelConfig
    from soda.models.pixart import PixArt

    folder = Path(folder)
    cfg = ModelConfig("pixart-tiny", depth=2, hidden_size=32, patch_size=2, num_heads=2, input_size=8, in_channels=1,
                      num_classes=0, arch="pixart", caption_channels=8, caption_len=120, pe_interpolation=1.0)
    torch.manual_seed(seed)
    model = PixArt(cfg)
    model.randomize(seed, std=0.2)
    pth = folder / "pixart-tiny.pth"
    torch.save({"state_dict": model.state_dict()}, pth)
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 2, 4, 5, 3][:n_prompts] + [1] * max(0, n_prompts - 5))
    prompts = folder / f"prompts-{n_prompts}-{seed}.npz"
    np.savez(prompts, prompt_embeds=rng.standard_normal((n_prompts, 6, 8)).astype(np.float32),
             prompt_attention_mask=(np.arange(6)[None] < lengths[:, None]).astype(np.float32))
    return pth, prompts
