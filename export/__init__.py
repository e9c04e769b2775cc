"""torch model -> ONNX subgraphs + one shared weights file + manifest (+ TensorRT engines).

`export.manifest` is json + hashlib only so the torch-free runtime can import it; the rest
(`onnx_export`, `graphs`, `weights_store`, `trt`) needs torch and onnx.
"""
