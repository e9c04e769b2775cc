"""Disjoint seed streams: calibration data never coincides with evaluation data.

Every random draw of the bench and the profiler comes from a `numpy.random.SeedSequence` whose
entropy is the user's `--seed` and whose spawn key starts with a stream tag:

    calibration (profiling, tuning):  SeedSequence(seed, spawn_key=(CALIBRATION, purpose, i))
    evaluation (the bench's samples): SeedSequence(seed, spawn_key=(EVALUATION, group, chunk))
    generation (`cli.py generate`):   SeedSequence(seed, spawn_key=(GENERATION, sample index))

Two draws can only coincide if their (entropy, spawn_key) words coincide, and the first spawn
key word differs between the streams, whatever seeds the user passes: `profile --seed 0` then
`bench --seed 1` used to replay the calibration noise as evaluation noise (calibration drew
from seed + 1 + batch); now the two never share a key. `sample --seed N` draws from the plain
`default_rng(N)` (an empty spawn key), a third, separate stream.
"""
from __future__ import annotations

import numpy as np

CALIBRATION, EVALUATION = 0x5EED_CA1, 0x5EED_E7A  # stream tags (first spawn-key word)
GENERATION = 0x5EED_6E7  # `cli.py generate`: one stream per sample index
PROFILE, TUNING = 0, 1  # calibration purposes


def calibration(seed: int, purpose: int, index: int) -> np.random.SeedSequence:
    """The seed sequence of calibration draw `index` for `purpose` (PROFILE or TUNING)."""
    return np.random.SeedSequence(int(seed), spawn_key=(CALIBRATION, int(purpose), int(index)))


def evaluation(seed: int, group: int, chunk: int = 0) -> np.random.SeedSequence:
    """The seed sequence of evaluation seed `group` (its batch `chunk`)."""
    return np.random.SeedSequence(int(seed), spawn_key=(EVALUATION, int(group), int(chunk)))


def generation(seed: int, index: int) -> np.random.SeedSequence:
    """Sample `index` of `cli.py generate --seed seed`: its label and noise depend on nothing else."""
    return np.random.SeedSequence(int(seed), spawn_key=(GENERATION, int(index)))


def stream_of(seq: np.random.SeedSequence) -> str:
    """"calibration", "evaluation", "generation" or "plain" (sample/run's default_rng(seed))."""
    key = tuple(seq.spawn_key)
    if key and key[0] == CALIBRATION:
        return "calibration"
    if key and key[0] == EVALUATION:
        return "evaluation"
    if key and key[0] == GENERATION:
        return "generation"
    return "plain"


def labels_for(n: int, num_classes: int) -> np.ndarray:
    """Balanced labels 0, 1, ..., num_classes-1, 0, 1, ... (bench and tuning)."""
    return np.arange(n, dtype=np.int64) % num_classes
