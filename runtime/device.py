"""Where the runtime's arrays live: CuPy arrays on one CUDA stream, or numpy on the host.

On a GPU every array the stitching loop holds (tokens, caches, conditioning, selector state)
is a CuPy array, and every kernel -- CuPy's arithmetic in the loop, onnxruntime's CUDA
provider, TensorRT -- is queued on ONE stream: each call is ordered after the last without a
synchronise, and memory CuPy's pool frees is only reused by later work on that same stream,
so a buffer dropped while a kernel still reads it is safe. The host waits only where the
sampler needs the model output (`soda.arrays.to_numpy`, once per step).

`HostArrays` is the same interface over numpy: the CPU tests drive the IO-binding code with it.
CuPy, not torch: `runtime/` never imports torch, and CuPy gives device buffers, raw pointers,
streams and DLPack from one small dependency (`pip install cupy-cuda12x`).
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError


def cuda_availability() -> tuple[object | None, str]:
    """(cupy module, "") where CuPy and a CUDA GPU are usable here, else (None, the reason)."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy is not installed ({e.msg}); pip install cupy-cuda12x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver or device
        return None, f"CuPy finds no CUDA device ({str(e).splitlines()[0]})"
    if count < 1:
        return None, "CuPy finds no CUDA device"
    return cupy, ""


class HostArrays:
    """numpy on the host (onnxruntime CPU); bound by pointer like device buffers, the tests drive
    the binding path on the CPU with it."""

    device_type, device_id, stream_ptr = "cpu", 0, 0

    def put(self, a, dtype) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    @staticmethod
    def ptr(a) -> int:
        return a.ctypes.data

    @staticmethod
    def from_ortvalue(value):
        return value.numpy()

    def synchronize(self) -> None:
        pass


_STREAMS: dict[int, object] = {}  # device id -> the one stream of this process on it


class CupyArrays:
    """CuPy arrays on `device_id`, on the process's one non-blocking stream for that device, made
    current for all CuPy work. One per process, not per instance: a second backend (bench's
    per-module path, gpu_check's monolithic engine) that made its own stream current would
    leave the first backend's engines on a stream the loop's kernels no longer wait for."""

    device_type = "cuda"

    def __init__(self, device_id: int = 0):
        cupy, why = cuda_availability()
        if cupy is None:
            raise UserError(f"the CUDA runtime path needs CuPy and a GPU: {why}")
        self.cp = cupy
        self.device_id = device_id
        cupy.cuda.Device(device_id).use()
        if device_id not in _STREAMS:
            _STREAMS[device_id] = cupy.cuda.Stream(non_blocking=True)
        self.stream = _STREAMS[device_id]
        self.stream.use()  # the loop's CuPy kernels go on the stream the engines run on
        self.stream_ptr = int(self.stream.ptr)

    def put(self, a, dtype):
        """Host arrays (the sampler's latents, timesteps, conditioning) are uploaded once here;
        the loop's own device arrays pass through (a copy only for another dtype or layout)."""
        return self.cp.ascontiguousarray(self.cp.asarray(a, dtype=dtype))

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype)

    @staticmethod
    def ptr(a) -> int:
        return int(a.data.ptr)

    def from_ortvalue(self, value):
        """An onnxruntime output left on the device, as a CuPy array (DLPack, no copy). The
        Python OrtValue has __dlpack__ only in recent onnxruntime; older ones keep it on the
        C-level value it wraps."""
        return self.cp.from_dlpack(value if hasattr(value, "__dlpack__") else value._ortvalue)

    def synchronize(self) -> None:
        self.stream.synchronize()


def resolve_shape(shape, dims: dict[str, int]) -> tuple[int, ...] | None:
    """A manifest shape with named axes ("B", "n", "L") made concrete from `dims`, or None
    when an axis is not known from the inputs (then the library allocates the output)."""
    out = []
    for d in shape:
        if isinstance(d, str):
            if d not in dims:
                return None
            d = dims[d]
        out.append(int(d))
    return tuple(out)


def named_dims(specs, arrays) -> dict[str, int]:
    """{axis name: size} read from the inputs' declared shapes and the arrays fed."""
    dims: dict[str, int] = {}
    for spec, a in zip(specs, arrays):
        for d, size in zip(spec.shape, a.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(size))
    return dims
