"""Model configs as plain data, and the name -> config registry. No torch here."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from soda.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    input_size: int = 32  # latent side: 256 px / 8
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    arch: str = "dit"  # which adapter builds it
    # Text-conditioned architectures only (None elsewhere, and then absent from to_dict/hash):
    caption_channels: int | None = None  # caption embedding width (T5-XXL: 4096)
    caption_len: int | None = None  # nominal caption length (tokens) the FLOPs model counts
    pe_interpolation: float | None = None  # position-embedding interpolation scale
    # Video architectures only: latent frames and width (input_size is then the latent height);
    # the token grid is frames x ceil(H/p) x ceil(W/p), patches padded as Open-Sora's PatchEmbed3D.
    frames: int | None = None
    input_width: int | None = None
    qk_norm: bool | None = None  # RMSNorm on q and k (Open-Sora's STDiT3)

    @property
    def num_tokens(self) -> int:
        if self.frames is not None:
            p = self.patch_size
            return self.frames * -(-self.input_size // p) * -(-self.input_width // p)
        return (self.input_size // self.patch_size) ** 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent: [C, H, W] for an image model, [C, T, H, W] for a video model."""
        if self.frames is not None:
            return (self.in_channels, self.frames, self.input_size, self.input_width)
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def interface(self):
        """The architecture's torch-free interface (modules, conditioning names)."""
        from soda.models.interface import interface_for

        return interface_for(self.arch)

    @property
    def modules(self) -> tuple[str, ...]:
        return self.interface.module_names

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _OPTIONAL:
            if d[k] is None:
                del d[k]  # a DiT config (and its hash) is what it was before these fields existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    def hash(self) -> str:
        """Identity of the architecture; files made for one model carry it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_OPTIONAL = ("caption_channels", "caption_len", "pe_interpolation", "frames", "input_width", "qk_norm")


# The official DiT family (models.py): depth, width, heads per size; patch 2/4/8.
_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
HEADS_BY_WIDTH = {w: h for _, w, h in _SIZES.values()}

REGISTRY: dict[str, ModelConfig] = {}
for _size, (_depth, _width, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        _name = f"dit-{_size}-{_patch}"
        REGISTRY[_name] = ModelConfig(_name, _depth, _width, _patch, _heads)

# The project's own trained model (pixel space, 16x16 digits, 64 tokens); see soda/digits.
REGISTRY["dit-digits"] = ModelConfig(
    "dit-digits", depth=4, hidden_size=64, patch_size=2, num_heads=4, input_size=16, in_channels=1,
    num_classes=10, learn_sigma=True,
)


# PixArt-alpha XL-2 (PixArt-alpha/PixArt-alpha): depth 28, width 1152, 16 heads, T5-XXL captions of
# 120 tokens. The position-embedding scale is diffusers' rule for a config that gives none
# (max(latent side // 64, 1): 1, 1, 2, as the official inference's {512: 1, 1024: 2}); a
# checkpoint's own scale (its pos_embed, or config.json) replaces it when loaded.
for _px, _latent in ((256, 32), (512, 64), (1024, 128)):
    REGISTRY[f"pixart-alpha-{_px}"] = ModelConfig(
        f"pixart-alpha-{_px}", depth=28, hidden_size=1152, patch_size=2, num_heads=16, input_size=_latent,
        in_channels=4, num_classes=0, learn_sigma=True, arch="pixart", caption_channels=4096, caption_len=120,
        pe_interpolation=float(max(_latent // 64, 1)),
    )

# Open-Sora 1.2 STDiT3-XL/2 (hpcaitech/Open-Sora v1.2.0): 28 spatial + 28 temporal blocks, run
# interleaved, so 56 layers here; T5-XXL captions of 300 tokens. The video size is part of the
# config, as the resolution is for DiT: the official default, 51 frames of 240 x 426 pixels
# (15 x 30 x 53 latents), position-embedding scale sqrt(240 * 426) / 512. `opensora-tiny`: a
# small random-weights video model (17 frames of 64 x 64 -> 5 x 8 x 8 latents, 80 tokens) on
# which every command runs in seconds; its outputs mean nothing.
REGISTRY["opensora-v1.2"] = ModelConfig(
    "opensora-v1.2", depth=56, hidden_size=1152, patch_size=2, num_heads=16, input_size=30, in_channels=4,
    num_classes=0, learn_sigma=True, arch="opensora", caption_channels=4096, caption_len=300,
    pe_interpolation=(240 * 426) ** 0.5 / 512, frames=15, input_width=53, qk_norm=True,
)
REGISTRY["opensora-tiny"] = ModelConfig(
    "opensora-tiny", depth=4, hidden_size=64, patch_size=2, num_heads=4, input_size=8, in_channels=4,
    num_classes=0, learn_sigma=True, arch="opensora", caption_channels=32, caption_len=16,
    pe_interpolation=64 / 512, frames=5, input_width=8, qk_norm=True,
)

# The project's trained text-conditioned model: PixArt-alpha's blocks at dit-digits' size, pixel space,
# conditioned only through captions of fixed 32-d word vectors (soda/digits/captions.py).
REGISTRY["pixart-digits"] = ModelConfig(
    "pixart-digits", depth=4, hidden_size=64, patch_size=2, num_heads=4, input_size=16, in_channels=1,
    num_classes=0, learn_sigma=True, arch="pixart", caption_channels=32, caption_len=3, pe_interpolation=1.0,
)

# Guidance scale each model samples best at (DiT's published 4.0; dit-digits and pixart-digits measured in
# docs/digits.md and docs/pixart.md).
DEFAULT_CFG_SCALE = {"dit-digits": 2.0, "pixart-digits": 2.0, **{f"pixart-alpha-{px}": 4.5 for px in (256, 512, 1024)}}
ARCH_CFG_SCALE = {"pixart": 4.5, "opensora": 7.0}  # PixArt's and Open-Sora 1.2's official scales


# Captions a text model ships with (relative to the soda package): what `sample` and `run` generate
# when no --prompt-embeds is given, as dit-digits draws labels 0,1,2,3 when no --labels is.
SHIPPED_PROMPT_EMBEDS = {"pixart-digits": "assets/pixart_digits_captions.npz"}


def shipped_prompt_embeds(name: str) -> str | None:
    """The shipped captions file of model `name`, or None."""
    from pathlib import Path

    rel = SHIPPED_PROMPT_EMBEDS.get(name)
    return str(Path(__file__).resolve().parent.parent / rel) if rel else None


def default_cfg_scale(name: str, arch: str = "dit") -> float:
    """Per model; the architecture's official scale otherwise (the generic names included)."""
    return DEFAULT_CFG_SCALE.get(name, ARCH_CFG_SCALE.get(arch, 4.0))


GENERIC = {"dit": "dit", "pixart": "pixart", "opensora": "opensora"}  # names whose architecture is read from --ckpt


def model_names() -> list[str]:
    return sorted(REGISTRY) + sorted(GENERIC)


def get_config(name: str, **overrides) -> ModelConfig:
    """A registered config, optionally with fields overridden (e.g. input_size for 512 px)."""
    if name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    heads = overrides.get("num_heads")
    if heads is not None and heads != REGISTRY[name].num_heads:
        generic = REGISTRY[name].arch
        raise UserError(f"{name} has {REGISTRY[name].num_heads} heads; --num-heads is for --model {generic}")
    return replace(REGISTRY[name], **overrides)
