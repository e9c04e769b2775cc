"""The array namespace the stitching loop computes on, chosen from the backend's own arrays.

A backend hands the loop numpy arrays (CPU: torch reference, onnxruntime CPU), CuPy arrays
(onnxruntime CUDA, TensorRT) or torch tensors (the PyTorch backend on a device). The loop,
the selectors and the Taylor forecasts take `namespace(array)`: array-api-compat's wrapper of
that array's own library, which imports nothing it is not given (torch only for torch
tensors, so `runtime/` stays torch-free). Only the sampler's latents cross to the host, once
per step, through `to_numpy`.
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device, is_cupy_array, is_numpy_array, is_torch_array

__all__ = ["namespace", "device", "rows", "copy", "to_numpy", "all_finite"]


def namespace(*arrays):
    """The array-API namespace of `arrays` (array_api_compat.numpy for numpy arrays)."""
    return array_namespace(*arrays)


def rows(xp, B: int, like):
    """Row indices [B, 1] on `like`'s device, to pair with per-row token indices [B, k]."""
    return xp.arange(B, device=device(like))[:, None]


def copy(xp, a):
    """A copy the caller may edit in place (numpy: `a.copy()`; torch: `clone`)."""
    return xp.asarray(a, copy=True)


def all_finite(xp, a) -> bool:
    """One reduction on the array's device; only the single bool crosses to the host."""
    if is_numpy_array(a):  # numpy's own calls: a third of the array-API wrappers' time, once per step
        return bool(np.isfinite(a).all())
    return bool(xp.all(xp.isfinite(a)))


def to_numpy(a) -> np.ndarray:
    """The one copy to the host: a model output for the numpy sampler. Identity for numpy."""
    if is_numpy_array(a):
        return a
    if is_cupy_array(a):
        return a.get()
    if is_torch_array(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)
