"""scikit-learn's 8x8 digits as 16x16 images in [-1, 1], with a fixed train/held-out split.

No download: `load_digits` ships with scikit-learn. The split is stratified and fixed (seed 0,
20% of each class held out) so the diffusion model, the shipped classifier and the metrics
always agree on which digits were never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 16
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    train_images: np.ndarray  # [n, 1, 16, 16] float32 in [-1, 1]
    train_labels: np.ndarray  # [n] int64
    held_images: np.ndarray
    held_labels: np.ndarray


def upsample(images8: np.ndarray) -> np.ndarray:
    """[n, 8, 8] raw values 0..16 -> [n, 1, 16, 16] float32 in [-1, 1] (bilinear, half-pixel
    centres, i.e. torch's interpolate(align_corners=False) written in numpy)."""
    x = np.asarray(images8, dtype=np.float64) / 16.0 * 2.0 - 1.0
    src = (np.arange(SIDE) + 0.5) / 2.0 - 0.5  # source coordinate of each output pixel
    src = np.clip(src, 0.0, 7.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = src - lo
    rows = x[:, lo, :] * (1 - w)[None, :, None] + x[:, hi, :] * w[None, :, None]
    out = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
    return out[:, None].astype(np.float32)


def split_indices(labels: np.ndarray, fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED):
    """(train_idx, held_idx), stratified per class, each sorted."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.extend(idx[: int(round(fraction * len(idx)))])
    held = np.sort(np.array(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def load_split() -> DigitsSplit:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = upsample(d.images)
    labels = d.target.astype(np.int64)
    tr, ho = split_indices(labels)
    return DigitsSplit(images[tr], labels[tr], images[ho], labels[ho])
