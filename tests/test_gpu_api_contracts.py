"""GPU-only code (no GPU, TensorRT or onnxruntime-gpu here) held to what the official APIs say,
through small fakes of exactly the behaviour cited: TensorRT 11 removed the fp16/bf16 builder
flags; `IExecutionContext.set_input_shape` returns False rather than raising; CuPy's
`Stream.use()` makes a stream current for all later work; older onnxruntime OrtValues keep
`__dlpack__` on the C-level value they wrap (`_ortvalue`)."""
from types import SimpleNamespace

import numpy as np
import pytest

from soda.errors import UserError


def test_fp16_without_the_builder_flag_is_one_clear_error():
    from export.trt import precision_flag

    trt10 = SimpleNamespace(__version__="10.13.0", BuilderFlag=SimpleNamespace(FP16="fp16-flag", BF16="bf16-flag"))
    trt11 = SimpleNamespace(__version__="11.4.0", BuilderFlag=SimpleNamespace(STRONGLY_TYPED="st"))
    assert precision_flag(trt10, "fp16") == "fp16-flag" and precision_flag(trt10, "bf16") == "bf16-flag"
    assert precision_flag(trt11, "fp32") is None
    with pytest.raises(UserError, match=r"TensorRT 11.4.0 has no bf16 builder flag .* --trt-precision fp32"):
        precision_flag(trt11, "bf16")


class FakeStream:
    made = 0

    def __init__(self, non_blocking=False):
        FakeStream.made += 1
        self.ptr = 1000 + FakeStream.made

    def use(self):
        FakeCupy.current = self


class FakeCupy:
    current = None
    cuda = SimpleNamespace(Stream=FakeStream, Device=lambda i: SimpleNamespace(use=lambda: None))

    @staticmethod
    def from_dlpack(x):
        return ("dlpack", x)


def test_every_cupy_arrays_shares_one_stream(monkeypatch):
    """Two backends in one process (bench's per-module path, gpu_check's monolithic engine):
    the second must not make another stream current under the first one's engines."""
    import runtime.device as device

    monkeypatch.setattr(device, "cuda_availability", lambda: (FakeCupy, ""))
    monkeypatch.setattr(device, "_STREAMS", {})
    first, second = device.CupyArrays(), device.CupyArrays()
    assert first.stream is second.stream is FakeCupy.current and first.stream_ptr == second.stream_ptr


def test_ort_output_without_python_dlpack_uses_the_wrapped_value(monkeypatch):
    import runtime.device as device

    monkeypatch.setattr(device, "cuda_availability", lambda: (FakeCupy, ""))
    monkeypatch.setattr(device, "_STREAMS", {})
    arrays = device.CupyArrays()
    new = SimpleNamespace(__dlpack__=lambda: None)
    old = SimpleNamespace(_ortvalue="c-level")
    assert arrays.from_ortvalue(new) == ("dlpack", new) and arrays.from_ortvalue(old) == ("dlpack", "c-level")


def test_an_input_shape_outside_the_profile_is_one_clear_error():
    from runtime.trt_backend import TrtEngine

    engine = TrtEngine.__new__(TrtEngine)  # only what __call__ reads; the rest needs a GPU
    engine.name, engine.inputs, engine.outputs, engine.dtypes = "attn.0.plan", ["tokens"], [], {"tokens": np.float32}
    engine.profile_by_key, engine.axes, engine.active_profile = {5: 0}, {}, 0  # a profile for 5 tokens: chosen
    engine.arrays = SimpleNamespace(stream_ptr=0, put=lambda a, dtype: np.asarray(a, dtype), ptr=lambda a: 0)
    engine.context = SimpleNamespace(set_input_shape=lambda name, shape: False, set_tensor_address=lambda n, p: None)
    with pytest.raises(UserError, match=r"attn.0.plan: input tokens of shape \[2, 5, 8\] is outside its profile"):
        engine({"tokens": np.zeros((2, 5, 8), np.float32)}, ())
