"""onnxruntime backend: one session per exported graph behind the executor's numpy Backend API.

CPU: plain `session.run` on numpy arrays (measured against IO binding with preallocated
outputs: no faster on CPU, see docs/runtime.md). CUDA (onnxruntime-gpu on a machine with a
GPU): weights live on the device and each call goes through IO binding; the stitching loop
itself is numpy, so tokens cross the bus once in and once out per module call.
"""
from __future__ import annotations

import numpy as np

from soda.errors import UserError
from runtime.engines import Engines, GraphBackend

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def session_options(threads: int | None = None):
    """Options every session shares: no spinning (torch may share the process and is slowed 3x
    by spinning ORT threads), full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def choose_providers(device: str = "auto") -> list[str]:
    """auto: CUDA when this onnxruntime build has it, else CPU. The session says what it got."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise UserError(f"--device cuda needs onnxruntime-gpu; this onnxruntime has {', '.join(available)}")
    return [CUDA, CPU] if CUDA in available else [CPU]


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

    def __init__(self, engines: Engines, device: str = "auto", threads: int | None = None, blocks: bool = True):
        self.engines = engines
        self.modules = engines.modules
        self.num_layers = engines.config.depth
        self._setup_interface()
        self._options = session_options(threads)
        self._providers = choose_providers(device)
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
        self._run = self._run_device if self.provider == CUDA else self._run_cpu

    def _open(self, name: str):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.engines.path(name)), self._options, providers=self._providers)
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

    def _run_device(self, name: str, inputs: tuple) -> list[np.ndarray]:
        """CUDA: bind inputs once per call, let ORT allocate outputs on the device, copy back once."""
        ins, outs = self._io[name]
        session = self._session(name)
        binding = session.io_binding()
        for key, value in zip(ins, inputs):
            binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for key in outs:
            binding.bind_output(key, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
