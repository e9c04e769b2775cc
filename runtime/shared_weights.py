"""One copy of the weights for every onnxruntime session of an engines folder.

Every graph of a folder keeps its big initializers in the one `weights.bin` (external data:
location, offset, length; `export.weights_store`), and a layer's weights are read by several
graphs: its per-module graphs and each block graph of that layer. Left to itself every session
loads (and on the CPU prepacks) its own copy, so with block graphs DiT-S/2's weights sat in
memory about five times (docs/runtime.md "Memory"). Here each stored tensor becomes one OrtValue,
keyed by where it lies in weights.bin (offset, length, dtype, shape: the initializer names differ
from graph to graph), and is handed to every session that reads it with
`SessionOptions.add_initializer`, which onnxruntime uses in place when the value lives on the
device the session plans the initializer for:

- CPU: the OrtValues are views of a read-only memory map of weights.bin (no copy; the page cache
  holds the bytes once). onnxruntime's CPU kernels still prepack each session's own packed copy
  of every MatMul/Gemm weight (the C API's PrepackedWeightsContainer, which shares those, is not
  in the Python API): `OrtBackend` lets them up to `PREPACK_MAX_BYTES` of weights (packed GEMMs
  are 4-5% faster per call) and runs larger folders with `session.disable_prepacking`.
- CUDA: each tensor is uploaded once (`OrtValue.ortvalue_from_numpy(a, "cuda", id)`); the CUDA
  provider does not prepack.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soda.errors import UserError


class SharedWeights:
    """The OrtValues of one weights file, made on first use and kept for the sessions' lifetime
    (onnxruntime holds only pointers to them). Where a graph's initializers lie comes from the
    manifest (`Artefact.initializers`, written by export): the runtime never parses a graph."""

    def __init__(self, weights: Path, device_type: str = "cpu", device_id: int = 0):
        self.path = Path(weights)
        self.device_type, self.device_id = device_type, device_id
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._values: dict[tuple, object] = {}
        self.requests = 0  # initializers handed to sessions (>= len(self), the tensors made)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct tensors made (each held once)."""
        return sum(key[1] for key in self._values)

    def initializers(self, placed) -> list[tuple[str, object]]:
        """(initializer name, OrtValue) for a graph's `placed` initializers, `(name, offset,
        length, dtype, shape)` each: one OrtValue per distinct (offset, length, dtype, shape)."""
        out = []
        for name, offset, length, dtype, shape in placed:
            key = (offset, length, dtype, tuple(shape))
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = self._make(*key)
            out.append((name, value))
        self.requests += len(out)
        return out

    def _make(self, offset: int, length: int, dtype: str, shape: tuple):
        import onnxruntime as ort

        a = self._map[offset:offset + length]
        if offset + length > len(self._map) or length != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise UserError(f"{self.path} ({len(self._map)} bytes) does not hold a {dtype} {list(shape)} at bytes "
                            f"{offset}..{offset + length}; re-run `cli.py export`")
        a = a.view(dtype).reshape(shape)
        if self.device_type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(a)  # a view: it keeps the map alive, nothing is copied
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device_type, self.device_id)

    def add_to(self, options, placed) -> None:
        """Give `options` (one session's SessionOptions) the shared tensors of one graph."""
        for name, value in self.initializers(placed):
            options.add_initializer(name, value)
