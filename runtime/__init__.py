"""The deploy runtime: an exported engines folder -> samples, with numpy and onnxruntime (or
TensorRT) only. torch is never imported here, so `cli.py run` works where it is not installed.

The sampling loop, the stitching loop (`soda.executor.Executor`), schedules, policies and token
selectors are the same code the PyTorch reference runs; this package only adds backends that
compute `embed`, `modulation.{l}`, `{module}.{l}` and `final` from the exported graphs. On a GPU
(onnxruntime CUDA, TensorRT) the loop's arrays are CuPy arrays on one stream (`runtime.device`).
"""
from runtime.engines import Engines, open_engines, resolve_schedule

__all__ = ["Engines", "open_engines", "resolve_schedule"]
