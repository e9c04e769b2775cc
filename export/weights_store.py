"""One shared external-data weights file for every graph of an export.

Each graph's initializers are moved into `weights.bin` and referenced by location/offset/
length (the ONNX external-data fields), so onnxruntime and TensorRT read them from the one
file next to the graphs. Tensors are stored by content: an identical tensor (same dtype and
bytes) is written once however many graphs use it. Big tensors start on a 4096-byte
boundary (from 1 MiB) so they can be memory-mapped; small constants (< `threshold` bytes, e.g. shape
vectors) stay inside their graph.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20  # like onnxruntime's own saver: only tensors >= 1 MiB start on a page
SMALL_ALIGN = 64


class WeightsStore:
    def __init__(self, path: Path, threshold: int = 256):
        self.path = Path(path)
        self.threshold = threshold
        self._file = open(self.path, "wb")
        self._offset = 0
        self._index: dict[tuple[int, str], tuple[int, int]] = {}

    def externalize(self, model: onnx.ModelProto) -> list[list]:
        """Move every initializer of >= threshold bytes into the shared file (in place). Returns
        where each lies, `[name, offset, length, dtype, shape]` per initializer: the manifest's
        `initializers` of the graph, from which the runtime hands every session one shared copy
        (runtime.shared_weights) without reading the graph."""
        placed = []
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            data = array.tobytes()
            if len(data) < self.threshold:
                continue
            offset, length = self._put(tensor.data_type, data)
            placed.append([tensor.name, offset, length, array.dtype.name, list(array.shape)])
            for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(fld)
            tensor.raw_data = data  # set_external_data insists on raw_data being present
            set_external_data(tensor, location=self.path.name, offset=offset, length=length)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
        self._file.flush()  # the graph is checked (and run) right after it is saved
        return placed

    @property
    def bytes_written(self) -> int:
        return self._offset

    def _put(self, dtype: int, data: bytes) -> tuple[int, int]:
        key = (dtype, hashlib.sha256(data).hexdigest())
        if key in self._index:
            return self._index[key]
        align = PAGE if len(data) >= PAGE_ALIGN_FROM else SMALL_ALIGN
        pad = -self._offset % align
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(data)
        self._index[key] = (self._offset, len(data))
        self._offset += len(data)
        return self._index[key]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "WeightsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
