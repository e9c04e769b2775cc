"""onnxruntime backend: one session per exported graph behind the executor's Backend API.

CPU: plain `session.run` on numpy arrays (measured against IO binding with preallocated
outputs: no faster on CPU, see docs/runtime.md). CUDA (onnxruntime-gpu, CuPy, a GPU): the
loop's arrays are CuPy arrays (`runtime.device`), bound to each session by device pointer
(IO binding); outputs are allocated by CuPy's pool with the shapes the manifest declares and
bound too, so ORT writes straight into the arrays the loop keeps. Every session runs on
CuPy's stream (`user_compute_stream`) without a synchronise per run
(`disable_synchronize_execution_providers`): nothing crosses the bus inside the loop.
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError
from runtime.device import CupyArrays, HostArrays, cuda_availability, named_dims, resolve_shape
from runtime.engines import Engines, GraphBackend

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Shared weights on the CPU are still prepacked when the weights file is at most this big. Each
# session then packs its own copy of the MatMul/Gemm weights it reads (per-module, block and step
# graphs read the same layer: a few copies in all, docs/runtime.md "Memory"); unpacked, every GEMM
# repacks its weights on every call, which cost 4% per step-graph call on DiT-S/2 (125 MiB) and 5%
# on dit-digits (docs/runtime.md "Where it stands"). Above this size memory wins (DiT-XL/2: 2.7 GB).
PREPACK_MAX_BYTES = 256 << 20


_ARENA_REGISTERED = False  # onnxruntime's environment is one per process, and so is its shared arena


def register_shared_cpu_arena() -> None:
    """One CPU arena in onnxruntime's process-wide environment for every session made with
    `shared_arena` (`session.use_env_allocators`). Each session otherwise keeps an arena as large
    as its own peak: a schedule's block sessions held about 1 GB of them on DiT-S/2 under ToCa
    (docs/runtime.md "Memory"), while the sessions of one loop never run at the same time."""
    global _ARENA_REGISTERED
    if not _ARENA_REGISTERED:
        import onnxruntime as ort

        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _ARENA_REGISTERED = True


def session_options(threads: int | None = None, no_prepacking: bool = False, shared_arena: bool = False):
    """Options every session shares: no spinning (torch may share the process and is slowed 3x
    by spinning ORT threads), full graph optimisation. no_prepacking: the CPU kernels use the
    weights where they lie (shared weights, `runtime.shared_weights`) instead of packed copies.
    shared_arena: CPU memory from the one arena of `register_shared_cpu_arena`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if no_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if shared_arena:
        register_shared_cpu_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so


def choose_providers(device: str = "auto") -> list[str]:
    """auto: CUDA when this onnxruntime build has it and CuPy sees a GPU, else CPU. The
    session says what it got."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise UserError(f"--device cuda needs onnxruntime-gpu; this onnxruntime has {', '.join(available)}")
    if CUDA not in available:
        return [CPU]
    cupy, why = cuda_availability()
    if cupy is None:
        if device == "cuda":
            raise UserError(f"--device cuda: onnxruntime has CUDA but the device arrays cannot be made: {why}")
        return [CPU]
    return [CUDA, CPU]


ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}


def _check_declared(engines: Engines, name: str, session) -> None:
    """The manifest's shapes and dtypes are what the graph itself declares. Inputs match exactly
    (their dynamic axes are named at export); outputs may carry exporter-made symbolic dims, so
    only their rank and the sizes the graph fixes are compared."""
    art = engines.manifest.artefacts[name]
    for specs, declared, exact in ((art.inputs, session.get_inputs(), True), (art.outputs, session.get_outputs(), False)):
        graph = {t.name: (list(t.shape), t.type) for t in declared}
        for spec in specs:
            shape, kind = graph.get(spec.name, (None, None))
            ok = shape is not None and kind == ORT_TYPES.get(spec.dtype, spec.dtype) and len(shape) == len(spec.shape)
            if ok and exact:
                ok = shape == list(spec.shape)
            elif ok:
                ok = all(g == m for g, m in zip(shape, spec.shape) if isinstance(g, int))
            if not ok:
                raise UserError(f"{engines.folder}/manifest.json says {name}:{spec.name} is {spec.dtype} "
                                f"{list(spec.shape)}, the graph declares {kind} {shape}; re-run `cli.py export`")


class OrtBackend(GraphBackend):
    """The executor's Backend over an engines folder's graphs.

    The per-module graphs open up front; block graphs (`blocks=True`, when the folder has them)
    open on their first call, so only the patterns a schedule uses cost a session."""

    def __init__(self, engines: Engines, device: str = "auto", threads: int | None = None, blocks: bool = True,
                 io_binding: bool | None = None, share_weights: bool = True, prepack: bool | None = None,
                 shared_arena: bool = True):
        """io_binding: None = on for CUDA (device buffers), off for CPU; True on CPU binds numpy
        buffers the same way (tests drive the binding code with it). share_weights: every session
        reads one copy of weights.bin (`runtime.shared_weights`); False: each loads its own.
        prepack: the CPU kernels pack their own copy of the weights (None: always with private
        weights; with shared ones only up to PREPACK_MAX_BYTES of weights). shared_arena: the CPU
        sessions take their working memory from one arena (`register_shared_cpu_arena`)."""
        import onnxruntime as ort

        self.engines = engines
        self.modules = engines.modules
        self.num_layers = engines.config.depth
        self._setup_interface()
        providers = choose_providers(device)
        self.arrays = CupyArrays() if CUDA in providers else HostArrays()
        if CUDA in providers:  # every session on CuPy's stream: ordered with the loop's kernels, no syncs
            providers = [(CUDA, {"device_id": str(self.arrays.device_id),
                                 "user_compute_stream": str(self.arrays.stream_ptr)}), CPU]
        self._providers = providers
        self.shared = None
        weights = engines.folder / engines.manifest.data["weights_file"]
        if share_weights and any(a.initializers for a in engines.manifest.artefacts.values()):  # older folders: no
            from runtime.shared_weights import SharedWeights

            self.shared = SharedWeights(weights, self.arrays.device_type, self.arrays.device_id)
        if prepack is None:  # CPU kernels prepack a private copy of each shared weight per session
            prepack = self.shared is None or weights.stat().st_size <= PREPACK_MAX_BYTES
        self.prepack = prepack and CUDA not in providers  # the CUDA provider does not prepack
        self.shared_arena = shared_arena and CUDA not in providers
        self._options = lambda: session_options(threads, no_prepacking=CUDA not in providers and not prepack,
                                                shared_arena=self.shared_arena)
        self.sessions = {}
        for name in engines.graph_names():
            self.sessions[name] = self._open(name)
        # onnxruntime-gpu without a usable GPU silently falls back to CPU: report what runs.
        self.provider = self.sessions["embed"].get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise UserError(f"--device cuda: onnxruntime-gpu fell back to {self.provider} (no usable GPU/CUDA here)")
        for name, session in self.sessions.items():
            _check_declared(engines, name, session)
        self.blocks = tuple(engines.block_graphs()) if blocks else ()
        self._io = {name: engines.io(name) for name in [*self.sessions, *(b.name for b in self.blocks)]}
        self.run_options = ort.RunOptions()
        if self.provider == CUDA:  # one stream for everything: the host never waits for a run
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        bind = self.provider == CUDA if io_binding is None else io_binding
        self._bindings: dict = {}  # graph name -> (its IOBinding, input specs, output specs), made on first call
        self._run = self._run_bound if bind else self._run_cpu

    def _open(self, name: str):
        import onnxruntime as ort

        path = self.engines.path(name)
        options = self._options()  # one per session: the shared initializers' names are the graph's own
        if self.shared is not None:
            self.shared.add_to(options, self.engines.manifest.artefacts[name].initializers)
        try:
            return ort.InferenceSession(str(path), options, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"onnxruntime cannot open {self.engines.path(name)}: {str(e).splitlines()[0]}") from None

    def _session(self, name: str):
        session = self.sessions.get(name)
        if session is None:  # a block graph's first call
            session = self.sessions[name] = self._open(name)
            _check_declared(self.engines, name, session)
        return session

    def describe(self) -> str:
        return f"onnxruntime {__import__('onnxruntime').__version__} ({self.provider})"


    # --- calls -----------------------------------------------------------------------------------
    def _run_cpu(self, name: str, inputs: tuple) -> list[np.ndarray]:
        ins, outs = self._io[name]
        return self._session(name).run(outs, dict(zip(ins, inputs)))

    def _run_bound(self, name: str, inputs: tuple) -> list:
        """IO binding: inputs and outputs by pointer, in `self.arrays` (CuPy on CUDA). Outputs
        are fresh arrays of the declared shapes (the loop caches them, so no buffer is reused);
        an output whose shape the inputs do not fix is left to ORT and taken over by DLPack."""
        ins, outs = self._io[name]
        if name not in self._bindings:
            art = self.engines.manifest.artefacts[name]
            self._bindings[name] = (self._session(name).io_binding(), {t.name: t for t in art.inputs},
                                    {t.name: t for t in art.outputs})
        binding, in_specs, out_specs = self._bindings[name]
        arrays = self.arrays
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        fed = [arrays.put(v, np.dtype(in_specs[k].dtype)) for k, v in zip(ins, inputs)]  # alive until the run is queued
        for key, a in zip(ins, fed):
            binding.bind_input(key, arrays.device_type, arrays.device_id, a.dtype, a.shape, arrays.ptr(a))
        dims = named_dims([in_specs[k] for k in ins], fed)
        results = []
        for key in outs:
            shape = resolve_shape(out_specs[key].shape, dims)
            if shape is None:
                binding.bind_output(key, arrays.device_type, arrays.device_id)
                results.append(None)
                continue
            out = arrays.empty(shape, np.dtype(out_specs[key].dtype))
            binding.bind_output(key, arrays.device_type, arrays.device_id, out.dtype, out.shape, arrays.ptr(out))
            results.append(out)
        self._session(name).run_with_iobinding(binding, self.run_options)
        if any(r is None for r in results):
            values = binding.get_outputs()
            results = [arrays.from_ortvalue(values[i]) if r is None else r for i, r in enumerate(results)]
        return results
