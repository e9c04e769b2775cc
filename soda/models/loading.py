"""Checkpoint loading: bare state dicts, train.py checkpoints (use "ema"), safetensors.

Only `torch.load(weights_only=True)`: a pickle that needs code execution is refused. The
generic `dit` config is inferred from the tensors themselves.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import replace
from pathlib import Path

import torch

from soda.errors import UserError
from soda.models.config import REGISTRY, HEADS_BY_WIDTH, ModelConfig, get_config
from soda.models.dit import DiT

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
PACKAGED = {"dit-digits": _ASSETS / "dit_digits.safetensors", "pixart-digits": _ASSETS / "pixart_digits.safetensors"}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if "DiT-XL-2" in path.name:
            hint = f"; the official weights are at {OFFICIAL_URL.format(name=path.name)}"
        raise UserError(f"checkpoint not found: {path.resolve()}{hint}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as safetensors: {e}") from None
    try:
        import argparse  # official train.py pickles its args as an argparse.Namespace (plain data)

        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if needs:  # a real pickle that would run code to load (weights_only=True refuses it)
            raise UserError(f"refusing {path}: it needs arbitrary code to unpickle ({needs.group(1)}); "
                            "only plain tensors are loaded") from None
        said = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", msg)
        detail = said.group(1).strip() if said else (msg.strip().splitlines() or ["unpickling failed"])[0]
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({detail})") from None
    except Exception as e:  # garbage bytes surface as IndexError, KeyError, ... from the unpickler
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({detail})") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # train.py checkpoint
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # official PixArt-alpha .pth
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return obj


def check_finite(state: dict[str, torch.Tensor], path) -> None:
    """A NaN or inf weight would sample, export and run to all-NaN images: refuse it by name."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{path}: tensor {_few(bad)} holds NaN or inf values (a damaged checkpoint)")


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, name: str = "dit") -> ModelConfig:
    """Architecture from tensor shapes: depth, width, patch, input size, channels, classes, sigma."""
    try:
        proj = state["x_embedder.proj.weight"]  # [D, C, p, p]
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        num_patches = state["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        table_rows = state["y_embedder.embedding_table.weight"].shape[0]
        out_dim = state["final_layer.linear.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"checkpoint does not look like a DiT (missing {e})") from None
    out_ch = out_dim // (patch * patch)
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise UserError(f"width {hidden} is not a standard DiT width; pass --num-heads")
    if heads < 1 or hidden % heads:
        raise UserError(f"--num-heads {heads} does not divide the width {hidden}")
    side = int(round(num_patches**0.5)) * patch
    return ModelConfig(
        name, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, input_size=side,
        in_channels=in_ch, num_classes=table_rows - 1, learn_sigma=out_ch == 2 * in_ch,
        mlp_ratio=mlp_hidden / hidden,
    )


def build_model(config: ModelConfig):
    if config.arch == "dit":
        return DiT(config)
    if config.arch == "pixart":
        from soda.models.pixart import PixArt

        return PixArt(config)
    if config.arch == "opensora":
        from soda.models.opensora import STDiT3

        return STDiT3(config)
    raise UserError(f"no adapter for architecture {config.arch!r}")


def _arch_of(name: str) -> str:
    return REGISTRY[name].arch if name in REGISTRY else name


def load_model(
    name: str,
    ckpt: str | Path | None = None,
    num_heads: int | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> tuple[DiT, str]:
    """(model in eval mode, weights identity). The identity is the checkpoint's sha256, or
    "random-init-<seed>" so everything made from such a model says so."""
    if name not in ("dit", "pixart", "opensora"):
        get_config(name, num_heads=num_heads)  # an unknown name or a wrong head count, said first
    if _arch_of(name) == "opensora":
        from soda.models import opensora

        return opensora.load(name, ckpt, num_heads, random_init, seed)
    if _arch_of(name) == "pixart":
        return _load_pixart(name, ckpt, num_heads, random_init, seed)
    if random_init:
        if name == "dit":
            raise UserError("--random-init needs a named config (e.g. dit-xl-2), not the generic 'dit'")
        config = get_config(name, num_heads=num_heads)
        torch.manual_seed(seed)
        model = build_model(config)
        model.randomize_zero_init(seed)
        return model.eval(), f"random-init-{seed}"
    if ckpt is None:
        if name in PACKAGED:
            ckpt = PACKAGED[name]
        else:
            raise UserError(f"model {name!r} needs --ckpt FILE (or --random-init to try the toolchain without weights)")
    state = read_state_dict(ckpt)
    check_finite(state, ckpt)
    if name == "dit":
        config = infer_config(state, num_heads)
    else:
        base = get_config(name, num_heads=num_heads)
        inferred = infer_config(state, 1, name)  # only the resolution is read; misfits are listed key by key below
        # Named configs fix the architecture; the checkpoint may only choose the resolution.
        config = replace(base, input_size=inferred.input_size)
    model = build_model(config)
    _check_keys(model, state, ckpt)
    model.load_state_dict(state, strict=True)
    return model.eval(), file_sha256(Path(ckpt))


def _load_pixart(name: str, ckpt, num_heads: int | None, random_init: bool, seed: int):
    """PixArt: an official .pth / safetensors state dict, or a diffusers folder (or pipeline root)."""
    from soda.models import pixart

    if name == "pixart-alpha-1024":
        raise UserError(pixart.MS_REFUSAL)
    if random_init:
        if name == "pixart":
            raise UserError("--random-init needs a named config (e.g. pixart-alpha-256), not the generic 'pixart'")
        torch.manual_seed(seed)
        model = build_model(get_config(name, num_heads=num_heads))
        model.randomize(seed)
        return model.eval(), f"random-init-{seed}"
    if ckpt is None:
        if name in PACKAGED:
            ckpt = PACKAGED[name]
        else:
            raise UserError(f"model {name!r} needs --ckpt FILE or a diffusers folder (or --random-init)")
    path = Path(ckpt)
    folder = pixart.diffusers_folder(path) if path.is_dir() else None
    if path.is_dir() and folder is None:
        raise UserError(f"{path} is not a diffusers PixArt folder (config.json + diffusion_pytorch_model.safetensors, "
                        "or a pipeline root with transformer/)")
    if folder is not None:
        weights_file = folder / "diffusion_pytorch_model.safetensors"
        config = pixart.diffusers_config(folder, name, num_heads)
        state = pixart.from_diffusers(read_state_dict(weights_file), config.depth)
    else:
        weights_file = path
        state = read_state_dict(path)
        heads = num_heads if name == "pixart" else get_config(name).num_heads  # a named config knows its heads
        config = pixart.official_config(state, name, heads)
    if name != "pixart":
        base = get_config(name, num_heads=num_heads)
        # Named configs fix the architecture; the checkpoint says its resolution and position scale.
        config = replace(base, input_size=config.input_size, pe_interpolation=config.pe_interpolation)
    model = build_model(config)
    has_null = "y_embedder.y_embedding" in state
    if not has_null:
        state["y_embedder.y_embedding"] = model.y_embedder.y_embedding  # placeholder; unusable, flagged below
    state.setdefault("pos_embed", model.pos_embed)
    _check_keys(model, state, ckpt)
    model.load_state_dict(state, strict=True)
    model.has_null_caption = has_null
    return model.eval(), file_sha256(weights_file)


def _check_keys(model, state: dict[str, torch.Tensor], ckpt) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append("shape mismatch " + _few([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]))
    if problems:
        raise UserError(f"{ckpt} does not fit {model.config.name}: " + "; ".join(problems))


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
