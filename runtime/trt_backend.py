"""TensorRT backend: the exported engines behind the executor's numpy Backend API.

Official TensorRT (>= 10) Python API: deserialize each engine, one execution context each,
set the input shapes per call (dynamic batch and token axes), point every I/O tensor at a
device buffer with `set_tensor_address`, `execute_async_v3` on one stream. Module engines hold
one optimization profile per token count (`export/trt.py`: N and each pruned k of the exported
schedule); a call selects the profile of its gathered token count, and a schedule that needs a
count no profile covers is refused before sampling starts (`check_schedule`). Device memory and
copies use cuda-python (`cuda.bindings.runtime`), not torch. Buffers grow to the largest shape
seen and are reused. Like the onnxruntime CUDA path, the stitching loop is numpy: each call
copies its inputs in and its outputs out.

Needs TensorRT, cuda-python and a GPU, and engines built by `cli.py export --trt`.
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError
from runtime.engines import Engines, GraphBackend


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise UserError("--backend trt needs cuda-python (pip install cuda-python)") from None
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class _Engine:
    """One deserialized engine with its context and grow-only device buffers."""

    def __init__(self, trt, runtime, path, cudart, profiles: list[dict]):
        self.trt, self.cudart = trt, cudart
        self.profile_by_n = {p.get("n"): i for i, p in enumerate(profiles)}
        self.active_profile = 0
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr, size = _check(self.cudart.cudaMalloc(max(nbytes, 1))), nbytes
            self.buffers[name] = (ptr, size)
        return ptr

    def __call__(self, feeds: dict[str, np.ndarray], wanted: tuple[str, ...], stream) -> list[np.ndarray]:
        H2D = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        D2H = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if "tokens" in feeds and None not in self.profile_by_n:
            n = feeds["tokens"].shape[1]
            if n not in self.profile_by_n:
                raise UserError(f"no TensorRT profile for {n} tokens (built for {sorted(self.profile_by_n)})")
            if self.profile_by_n[n] != self.active_profile:
                self.context.set_optimization_profile_async(self.profile_by_n[n], stream)
                self.active_profile = self.profile_by_n[n]
        for name in self.inputs:
            host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            ptr = self._buffer(name, host.nbytes)
            self.context.set_input_shape(name, host.shape)
            _check(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, H2D, stream))
            self.context.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
            results[name] = host
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name in wanted:
            host = results[name]
            _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, D2H, stream))
        _check(self.cudart.cudaStreamSynchronize(stream))
        return [results[n].astype(np.float32, copy=False) for n in wanted]

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()


class TrtBackend(GraphBackend):
    """The executor's Backend over the TensorRT engines listed in the manifest's "trt" entry."""

    def __init__(self, engines: Engines):
        try:
            import tensorrt as trt
        except ImportError:
            raise UserError("--backend trt needs TensorRT (pip install tensorrt) and an NVIDIA GPU") from None
        built = engines.manifest.trt
        if not built:
            raise UserError(f"{engines.folder} has no TensorRT engines; export with `cli.py export --trt` on a GPU machine")
        cudart = _cudart()
        self.version = trt.__version__
        if built.get("version") and built["version"] != trt.__version__:
            raise UserError(f"{engines.folder}: engines were built with TensorRT {built['version']}, "
                            f"this is {trt.__version__}; rebuild with `cli.py export --trt`")
        from export.trt import gpu_name

        gpu = gpu_name()
        if gpu is None or (built.get("gpu") and built["gpu"] != gpu):
            raise UserError(f"{engines.folder}: TensorRT engines were built for {built.get('gpu')}, "
                            f"this machine has {gpu or 'no GPU'}; rebuild with `cli.py export --trt`")
        self.max_batch = built.get("max_batch")
        self.engines = engines
        self.modules = engines.modules
        self.num_layers = engines.config.depth
        self._setup_interface()
        self.stream = int(_check(cudart.cudaStreamCreate()))  # TensorRT takes the handle as an int
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._io = {name: engines.io(name) for name in engines.graph_names()}
        self._engines = {}
        for name in engines.graph_names():
            entry = built["engines"].get(name)
            if entry is None:
                raise UserError(f"{engines.folder} has no TensorRT engine for {name}; rebuild with `cli.py export --trt`")
            self._engines[name] = _Engine(trt, runtime, engines.folder / entry["file"], cudart,
                                          entry.get("profiles", [{"n": None}]))
        self.token_counts = sorted({n for e in self._engines.values() for n in e.profile_by_n if n is not None})
        self.precision = built.get("precision", "?")

    def describe(self) -> str:
        return f"TensorRT {self.version} ({self.precision})"

    def check_schedule(self, schedule, rows: int) -> None:
        """Refuse, before sampling, a schedule whose token counts or batch the engines cannot run."""
        need = set(schedule.token_counts(self.engines.config.num_tokens))
        missing = sorted(need - set(self.token_counts))
        if missing:
            raise UserError(f"the TensorRT engines have profiles for {self.token_counts} tokens; this "
                            f"{schedule.policy} schedule also needs {missing}: export for this schedule "
                            f"(`cli.py export --trt --schedule FILE`) or use --backend ort")
        if self.max_batch and rows > self.max_batch:
            raise UserError(f"{rows} batch rows exceed the engines' max batch {self.max_batch}; use fewer labels")

    def _run(self, name: str, inputs: tuple) -> list[np.ndarray]:
        ins, outs = self._io[name]
        return self._engines[name](dict(zip(ins, inputs)), outs, self.stream)


    def close(self) -> None:
        for e in self._engines.values():
            e.close()
