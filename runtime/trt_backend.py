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
starts (`check_schedule`). Block graphs (soda.blocks) run from their engines too, `block(...)`
as on onnxruntime: their profile is chosen by the index count of each pruned module (axes
`n_<module>_<layer>`); their engines are deserialized on first call (only the patterns a
schedule uses take device memory), growing the shared scratch area when one needs more.

Needs TensorRT, CuPy and a GPU, and engines built by `cli.py export --trt`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soda.errors import UserError
from runtime.device import CupyArrays
from runtime.engines import Engines, GraphBackend


def _device_memory_size(engine) -> int:
    """Scratch bytes a context of `engine` needs (TensorRT >= 10.1: `device_memory_size_v2`)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def profile_key(profile: dict):
    """What selects a profile: its token count n (module graphs), or its pruned counts per axis
    (block graphs), or None (one profile)."""
    axes = profile.get("axes")
    return tuple(sorted(axes.items())) if axes else profile.get("n")


def axis_positions(specs) -> dict[str, tuple[str, int]]:
    """{pruned axis `n_<module>_<layer>`: (input name, dim)} of a block graph's input specs."""
    out: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for i, d in enumerate(spec.shape):
            if isinstance(d, str) and d.startswith("n_"):
                out.setdefault(d, (spec.name, i))
    return out


def select_profile(profile_by_key: dict, feeds: dict, axes: dict[str, tuple[str, int]]) -> int | None:
    """Index of the profile for these inputs (None: the engine has only one). Module graphs by
    their tokens' count, block graphs by each pruned module's index count."""
    if None in profile_by_key:
        return None
    if axes:
        key = tuple(sorted((axis, int(feeds[name].shape[dim])) for axis, (name, dim) in axes.items()))
        what = ", ".join(f"{a}={k}" for a, k in key)
    else:
        key = int(feeds["tokens"].shape[1])
        what = f"{key} tokens"
    if key not in profile_by_key:
        built = sorted(profile_by_key)
        raise UserError(f"no TensorRT profile for {what} (built for {built})")
    return profile_by_key[key]


class TrtEngine:
    """One deserialized engine and its execution context (user-managed scratch memory).
    `specs`: the graph's input specs from the manifest (a block graph's pruned axes are read there)."""

    def __init__(self, trt, runtime, path, profiles: list[dict], arrays: CupyArrays, specs=()):
        self.trt, self.arrays, self.name = trt, arrays, Path(path).name
        self.profile_by_key = {profile_key(p): i for i, p in enumerate(profiles)}
        self.profile_by_n = {p.get("n"): i for i, p in enumerate(profiles) if not p.get("axes")}
        self.axes = axis_positions(specs)
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
        index = select_profile(self.profile_by_key, feeds, self.axes) if ("tokens" in feeds or self.axes) else None
        if index is not None and index != self.active_profile:
            self.context.set_optimization_profile_async(index, stream)
            self.active_profile = index
        fed = {}
        for name in self.inputs:
            a = fed[name] = arrays.put(feeds[name], self.dtypes[name])  # the loop's array itself when it fits
            if not self.context.set_input_shape(name, a.shape):  # returns False, raises nothing
                raise UserError(f"TensorRT engine {self.name}: input {name} of shape {list(a.shape)} is outside "
                                f"its profile; re-export for this schedule (cli.py export --trt)")
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

    def __init__(self, engines: Engines, blocks: bool = True):
        """blocks=False: module by module even where block engines exist."""
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
        self._trt, self._runtime, self._built = trt, trt.Runtime(trt.Logger(trt.Logger.WARNING)), built
        # Block graphs with an engine (export/trt.py builds one for every block it has a count for).
        self.blocks = tuple(b for b in engines.block_graphs() if b.name in built["engines"]) if blocks else ()
        self._io = {name: engines.io(name) for name in [*engines.graph_names(), *(b.name for b in self.blocks)]}
        self._engines = {}
        for name in engines.graph_names():
            if name not in built["engines"]:
                raise UserError(f"{engines.folder} has no TensorRT engine for {name}; rebuild with `cli.py export --trt`")
            self._engines[name] = self._load(name)
        # One scratch area for all contexts, sized to the largest: they never run concurrently.
        self.scratch_bytes = max(e.scratch_bytes for e in self._engines.values())
        self._scratch = self.arrays.empty((max(self.scratch_bytes, 1),), np.uint8)
        for e in self._engines.values():
            e.use_scratch(self.arrays.ptr(self._scratch), self.scratch_bytes)
        self.token_counts = sorted({n for e in self._engines.values() for n in e.profile_by_n if n is not None})
        self.precision = built.get("precision", "?")

    def _load(self, name: str) -> TrtEngine:
        entry = self._built["engines"][name]
        return TrtEngine(self._trt, self._runtime, self.engines.folder / entry["file"],
                         entry.get("profiles", [{"n": None}]), self.arrays, self.engines.manifest.artefacts[name].inputs)

    def _engine(self, name: str) -> TrtEngine:
        """The engine of `name`; a block graph's is deserialized on its first call. A context that
        needs more scratch than the shared area gets a larger one, and every context moves to it
        (all run in order on one stream, so the old area is free once the queued work is done,
        which CuPy's stream-ordered pool guarantees)."""
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = self._load(name)
            if engine.scratch_bytes > self.scratch_bytes:
                self.scratch_bytes = engine.scratch_bytes
                self._scratch = self.arrays.empty((self.scratch_bytes,), np.uint8)
                for e in self._engines.values():
                    e.use_scratch(self.arrays.ptr(self._scratch), self.scratch_bytes)
            else:
                engine.use_scratch(self.arrays.ptr(self._scratch), self.scratch_bytes)
        return engine

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
        return self._engine(name)(dict(zip(ins, inputs)), outs)

    def close(self) -> None:
        """Wait for queued work, then drop the engines and their scratch area."""
        self.arrays.synchronize()
        self._engines.clear()
        self._scratch = None
