"""TensorRT backend: the exported engines behind the executor's Backend API, on the device.

Official TensorRT (>= 10) Python API: deserialize each engine; one execution context each,
created with `ExecutionContextAllocationStrategy.USER_MANAGED` and all pointed at ONE scratch
area (`set_device_memory`) sized to the largest engine's `device_memory_size_v2` -- the
contexts run one after another on one stream, so they can share it. Per call: select the
optimization profile of the gathered token count, set the input shapes, point every input at
the loop's own CuPy array (`set_tensor_address`, no copy) and every output at a fresh CuPy
array of the shape the context reports, then `execute_async_v3` on the stream CuPy's kernels
use. There is no synchronise per call: the host waits only for the model output the sampler
reads (`runtime.device` explains why one stream makes that safe). Module engines hold one
optimization profile per token count (`export/trt.py`: N and each pruned k of the exported
schedule); a schedule that needs a count no profile covers is refused before sampling
starts (`check_schedule`).

Needs TensorRT, CuPy and a GPU, and engines built by `cli.py export --trt`.
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError
from runtime.device import CupyArrays
from runtime.engines import Engines, GraphBackend


def _device_memory_size(engine) -> int:
    """Scratch bytes a context of `engine` needs (TensorRT >= 10.1: `device_memory_size_v2`)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


class TrtEngine:
    """One deserialized engine and its execution context (user-managed scratch memory)."""

    def __init__(self, trt, runtime, path, profiles: list[dict], arrays: CupyArrays):
        self.trt, self.arrays = trt, arrays
        self.profile_by_n = {p.get("n"): i for i, p in enumerate(profiles)}
        self.active_profile = 0
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.scratch_bytes = _device_memory_size(self.engine)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    def use_scratch(self, ptr: int, size: int) -> None:
        """Point the context at the shared scratch area (TensorRT 10.1+: with its size)."""
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(ptr, size)
        else:  # TensorRT 10.0
            self.context.device_memory = ptr

    def __call__(self, feeds: dict, wanted: tuple[str, ...]) -> list:
        """Queue one run on the stream; returns the output arrays (filled when the stream gets there)."""
        arrays, stream = self.arrays, self.arrays.stream_ptr
        if "tokens" in feeds and None not in self.profile_by_n:
            n = feeds["tokens"].shape[1]
            if n not in self.profile_by_n:
                raise UserError(f"no TensorRT profile for {n} tokens (built for {sorted(self.profile_by_n)})")
            if self.profile_by_n[n] != self.active_profile:
                self.context.set_optimization_profile_async(self.profile_by_n[n], stream)
                self.active_profile = self.profile_by_n[n]
        fed = {}
        for name in self.inputs:
            a = fed[name] = arrays.put(feeds[name], self.dtypes[name])  # the loop's array itself when it fits
            self.context.set_input_shape(name, a.shape)
            self.context.set_tensor_address(name, arrays.ptr(a))
        results = {}
        for name in self.outputs:
            out = results[name] = arrays.empty(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
            self.context.set_tensor_address(name, arrays.ptr(out))
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return [results[n] if results[n].dtype == np.float32 else results[n].astype(np.float32) for n in wanted]


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
        self.arrays = CupyArrays()  # the loop's arrays and the one stream every engine runs on
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._io = {name: engines.io(name) for name in engines.graph_names()}
        self._engines = {}
        for name in engines.graph_names():
            entry = built["engines"].get(name)
            if entry is None:
                raise UserError(f"{engines.folder} has no TensorRT engine for {name}; rebuild with `cli.py export --trt`")
            self._engines[name] = TrtEngine(trt, runtime, engines.folder / entry["file"],
                                            entry.get("profiles", [{"n": None}]), self.arrays)
        # One scratch area for all contexts, sized to the largest: they never run concurrently.
        self.scratch_bytes = max(e.scratch_bytes for e in self._engines.values())
        self._scratch = self.arrays.empty((max(self.scratch_bytes, 1),), np.uint8)
        for e in self._engines.values():
            e.use_scratch(self.arrays.ptr(self._scratch), self.scratch_bytes)
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

    def _run(self, name: str, inputs: tuple) -> list:
        ins, outs = self._io[name]
        return self._engines[name](dict(zip(ins, inputs)), outs)

    def close(self) -> None:
        """Wait for queued work, then drop the engines and their scratch area."""
        self.arrays.synchronize()
        self._engines.clear()
        self._scratch = None
