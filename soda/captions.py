"""Caption conditioning from `--prompt-embeds FILE.npz` (numpy only: the runtime reads it too).

The file uses diffusers' names: `prompt_embeds` [n, L, C], `prompt_attention_mask` [n, L],
and optionally `negative_prompt_embeds` / `negative_prompt_attention_mask` ([n or 1, L', C],
[n or 1, L']). Without negatives, the unconditional rows are the checkpoint's learned null
caption masked with each prompt's own mask, as the official PixArt inference does (its model
repeats the prompt mask over the doubled batch). Prompts and negatives of different lengths
are padded with masked zeros, which changes no attention output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soda.errors import UserError
from soda.sampling import Conditioning

KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


@dataclass
class PromptEmbeds:
    embeds: np.ndarray  # [n, L, C] float32
    mask: np.ndarray  # [n, L] float32 (0/1)
    neg_embeds: np.ndarray | None = None  # [n or 1, L', C]
    neg_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    @property
    def has_negatives(self) -> bool:
        return self.neg_embeds is not None

    def rows(self, idx) -> "PromptEmbeds":
        neg = lambda a: None if a is None else (a if len(a) == 1 else a[idx])  # noqa: E731
        return PromptEmbeds(self.embeds[idx], self.mask[idx], neg(self.neg_embeds), neg(self.neg_mask))

    def save(self, path: str | Path) -> None:
        data = {"prompt_embeds": self.embeds, "prompt_attention_mask": self.mask}
        if self.has_negatives:
            data.update(negative_prompt_embeds=self.neg_embeds, negative_prompt_attention_mask=self.neg_mask)
        np.savez(path, **data)


def _mask(m, embeds, what: str, path) -> np.ndarray:
    m = np.asarray(m)
    if m.shape != embeds.shape[:2]:
        raise UserError(f"{path}: {what} has shape {list(m.shape)}, expected {list(embeds.shape[:2])} "
                        f"(one 0/1 entry per caption token)")
    if not np.isin(m, (0, 1)).all():
        raise UserError(f"{path}: {what} must hold only 0 and 1")
    if (m.sum(axis=1) == 0).any():
        raise UserError(f"{path}: {what} has a row with no valid token")
    return m.astype(np.float32)


def _embeds(a, what: str, path, channels: int | None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise UserError(f"{path}: {what} must be [n, L, C], got shape {list(a.shape)}")
    if channels is not None and a.shape[2] != channels:
        raise UserError(f"{path}: {what} has caption dimension {a.shape[2]}, the checkpoint expects {channels}")
    if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
        raise UserError(f"{path}: {what} must be finite numbers")
    return a.astype(np.float32)


def load_prompt_embeds(path: str | Path, channels: int | None = None) -> PromptEmbeds:
    """Read and check an npz of prompt embeddings; `channels`: the checkpoint's caption width."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt embeddings file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as an .npz file ({e})") from None
    if isinstance(z, np.ndarray):  # an .npy: one array, not the named ones
        raise UserError(f"{path} is one .npy array; give an .npz with {', '.join(KEYS[:2])} (np.savez)")
    with z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in KEYS[:2] if k not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (diffusers' names: {', '.join(KEYS)})")
    emb = _embeds(data["prompt_embeds"], "prompt_embeds", path, channels)
    mask = _mask(data["prompt_attention_mask"], emb, "prompt_attention_mask", path)
    neg = [k in data for k in KEYS[2:]]
    if any(neg) and not all(neg):
        raise UserError(f"{path}: give both negative_prompt_embeds and negative_prompt_attention_mask, or neither")
    if not all(neg):
        return PromptEmbeds(emb, mask)
    nemb = _embeds(data["negative_prompt_embeds"], "negative_prompt_embeds", path, channels)
    if len(nemb) not in (1, len(emb)):
        raise UserError(f"{path}: negative_prompt_embeds has {len(nemb)} rows; give 1 or {len(emb)} (one per prompt)")
    if nemb.shape[2] != emb.shape[2]:
        raise UserError(f"{path}: negative and prompt embeddings differ in caption dimension")
    nmask = _mask(data["negative_prompt_attention_mask"], nemb, "negative_prompt_attention_mask", path)
    return PromptEmbeds(emb, mask, nemb, nmask)


def load_caption_texts(path: str | Path) -> list[str] | None:
    """The optional `captions` array (one string per prompt) that `cli.py encode` writes next to
    the embeddings, or None; the embeddings' readers ignore it."""
    with np.load(path, allow_pickle=False) as z:
        if "captions" not in z.files or z["captions"].ndim != 1 or z["captions"].dtype.kind != "U":
            return None
        texts = [str(c) for c in z["captions"]]
        return texts if len(texts) == len(z["prompt_embeds"]) else None


def _pad(a: np.ndarray, L: int) -> np.ndarray:
    if a.shape[1] == L:
        return a
    width = [(0, 0), (0, L - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, width)


def caption_conditioning(prompts: PromptEmbeds, null_caption: np.ndarray | None) -> Conditioning:
    """Conditional rows from the prompts; unconditional rows from the negatives, else the
    learned null caption [>= L, C] under each prompt's mask (None: the model has none)."""
    L = prompts.embeds.shape[1]
    if prompts.has_negatives:
        L = max(L, prompts.neg_embeds.shape[1])
        cond = {"caption": _pad(prompts.embeds, L), "mask": _pad(prompts.mask, L)}
        return Conditioning(cond, {"caption": _pad(prompts.neg_embeds, L), "mask": _pad(prompts.neg_mask, L)})
    if null_caption is None:
        raise UserError("this checkpoint has no learned null caption (a diffusers checkpoint): give "
                        "negative_prompt_embeds and negative_prompt_attention_mask in --prompt-embeds")
    if len(null_caption) < L:
        raise UserError(f"captions of {L} tokens are longer than the learned null caption ({len(null_caption)}); "
                        "give negatives in --prompt-embeds")
    cond = {"caption": prompts.embeds, "mask": prompts.mask}
    return Conditioning(cond, {"caption": null_caption[None, :L].astype(np.float32), "mask": prompts.mask})
