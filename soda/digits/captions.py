"""Captions for `pixart-digits`: short phrases ("a thin seven", "a bold zero", "a seven") made of
words from a fixed, shipped table of word vectors, so a caption is what tells the model the class.

The table (`soda/assets/digit_words.npz`: `words` [V], `table` [V, 32] float32) stands in for
PixArt's T5 encoder: a caption's embedding is its words' rows, in order, padded with masked
zeros to the longest caption of the set. The rows are fixed standard-normal draws
(`make_word_table`, numpy seed 0), never trained: the model's caption projection
(`y_embedder.y_proj`) and cross-attention learn to read them.

The stroke attribute: within each class of the training split, the third of the digits with
the least ink (mean brightness) are "thin", the third with the most are "bold"; the middle
third has no attribute word. `stroke_ink` measures it on samples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soda.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKES = ("thin", "bold")
VOCABULARY = ("a", *STROKES, *DIGIT_WORDS)
WIDTH = 32
TABLE_PATH = Path(__file__).resolve().parent.parent / "assets" / "digit_words.npz"
CAPTIONS_PATH = Path(__file__).resolve().parent.parent / "assets" / "pixart_digits_captions.npz"
FORMAT = 1


def make_word_table(seed: int = 0, width: int = WIDTH) -> np.ndarray:
    """The shipped table's rows: standard-normal draws, one row per word of VOCABULARY."""
    return np.random.default_rng(seed).standard_normal((len(VOCABULARY), width)).astype(np.float32)


def write_word_table(path: str | Path = TABLE_PATH) -> None:
    np.savez(path, format=np.int64(FORMAT), words=np.array(VOCABULARY), table=make_word_table())


class WordTable:
    """The fixed word vectors; `encode` turns captions into diffusers-named prompt embeddings."""

    def __init__(self, words: list[str], table: np.ndarray):
        self.words = list(words)
        self.table = np.asarray(table, dtype=np.float32)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def load(cls, path: str | Path = TABLE_PATH) -> "WordTable":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(w) for w in z["words"]], z["table"])

    @property
    def width(self) -> int:
        return self.table.shape[1]

    def tokens(self, caption: str) -> list[int]:
        words = caption.lower().split()
        if not words:
            raise UserError("empty caption; write e.g. \"a thin seven\"")
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise UserError(f"unknown word {unknown[0]!r} in caption {caption!r}; the vocabulary is: "
                            f"{', '.join(self.words)}")
        return [self.index[w] for w in words]

    def token_ids(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, L] int64, mask [n, L] float32), padded with id 0 under mask 0."""
        rows = [self.tokens(c) for c in captions]
        L = max(len(r) for r in rows)
        ids = np.zeros((len(rows), L), dtype=np.int64)
        mask = np.zeros((len(rows), L), dtype=np.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1.0
        return ids, mask

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Word rows [n, L, C], zero where masked."""
        return self.table[ids] * mask[..., None]

    def encode(self, captions: list[str]):
        """Captions -> PromptEmbeds (prompt_embeds [n, L, C], prompt_attention_mask [n, L])."""
        from soda.captions import PromptEmbeds

        if not captions:
            raise UserError("no captions given")
        ids, mask = self.token_ids(captions)
        return PromptEmbeds(self.embed(ids, mask), mask)


def save_captions(captions: list[str], path: str | Path, table: WordTable | None = None) -> None:
    """Encode `captions` with the word table and write diffusers' names (plus the `captions`
    themselves, which readers of prompt_embeds ignore) atomically."""
    from soda.outputs import atomic_output

    prompts = (table or WordTable.load()).encode(captions)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, prompt_embeds=prompts.embeds, prompt_attention_mask=prompts.mask,
                 captions=np.array([" ".join(c.lower().split()) for c in captions]))


def caption(label: int, stroke: str | None = None) -> str:
    return f"a {stroke} {DIGIT_WORDS[label]}" if stroke else f"a {DIGIT_WORDS[label]}"


def standard_captions() -> list[str]:
    """The shipped caption set, 30 captions, ordered so that any prefix of 10 k holds every class
    k times: "a zero" .. "a nine", then "a thin ...", then "a bold ..."."""
    return [caption(d, s) for s in (None, *STROKES) for d in range(10)]


def parse_caption_list(text: str) -> list[str]:
    captions = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not c for c in captions):
        empty = "" if not text.strip() else f" (caption {captions.index('') + 1} is empty)"
        raise UserError(f"--captions {text!r}: give comma-separated captions, e.g. \"a thin seven,a bold zero\"{empty}")
    return captions


def caption_labels(captions: list[str]) -> np.ndarray:
    """The digit each caption names (its last word must be a digit word)."""
    out = []
    for c in captions:
        last = c.lower().split()[-1] if c.split() else ""
        if last not in DIGIT_WORDS:
            raise UserError(f"caption {c!r} does not end with a digit word ({', '.join(DIGIT_WORDS)})")
        out.append(DIGIT_WORDS.index(last))
    return np.array(out, dtype=np.int64)


def caption_strokes(captions: list[str]) -> list[str | None]:
    return [next((w for w in c.lower().split() if w in STROKES), None) for c in captions]


# --- the stroke attribute ---------------------------------------------------------------------
def stroke_ink(images: np.ndarray) -> np.ndarray:
    """Ink per image: mean brightness in [0, 1] of [n, 1, 16, 16] images in [-1, 1] (clipped)."""
    x = (np.clip(images, -1.0, 1.0) + 1.0) / 2.0
    return x.reshape(len(x), -1).mean(axis=1)


def stroke_classes(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image 0 (thin: lowest third of its class's ink), 1 (middle), 2 (bold: top third)."""
    ink = stroke_ink(images)
    out = np.ones(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        lo, hi = np.quantile(ink[idx], [1 / 3, 2 / 3])
        out[idx[ink[idx] <= lo]] = 0
        out[idx[ink[idx] >= hi]] = 2
    return out


def training_captions(table: WordTable, images: np.ndarray, labels: np.ndarray):
    """Token ids of both captions of each training image: (plain ids [n, L], plain mask,
    attributed ids [n, L], attributed mask). A middle-third digit's two captions are the same
    ("a seven"); a thin or bold one's are "a seven" and "a thin seven"."""
    strokes = stroke_classes(images, labels)
    plain = [caption(int(y)) for y in labels]
    attributed = [caption(int(y), {0: "thin", 2: "bold"}.get(int(s))) for y, s in zip(labels, strokes)]
    ids_p, mask_p = table.token_ids(plain)
    ids_a, mask_a = table.token_ids(attributed)
    L = max(ids_p.shape[1], ids_a.shape[1])
    pad = lambda a: np.pad(a, [(0, 0), (0, L - a.shape[1])])  # noqa: E731
    return pad(ids_p), pad(mask_p), pad(ids_a), pad(mask_a)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the shipped word table and standard caption set.")
    p.add_argument("--table", default=str(TABLE_PATH))
    p.add_argument("--captions", default=str(CAPTIONS_PATH))
    a = p.parse_args()
    write_word_table(a.table)
    save_captions(standard_captions(), a.captions, WordTable.load(a.table))
    print(f"word table -> {a.table}; {len(standard_captions())} captions -> {a.captions}")


if __name__ == "__main__":
    main()
