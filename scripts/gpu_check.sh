#!/bin/bash
# The GPU check of issue 13, prepared to run as one command on a machine with an NVIDIA GPU:
#   bash scripts/gpu_check.sh [OUT.json] [more scripts/gpu_check.py flags, e.g. --backends torch-cuda]
# Random-init DiT-XL/2, 256 px, DDIM-50, 8 images with CFG; every backend present is timed
# (stitched vs monolithic, every policy at 2.5x FLOPs), the others are skipped with the reason.
# Run from the repository root; a few minutes without TensorRT, more when engines are built.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no GPU visible"
python - <<'PY'
import importlib
for m in ("torch", "onnxruntime", "cupy", "tensorrt"):
    try:
        mod = importlib.import_module(m)
        extra = f", CUDA {mod.version.cuda}, available {mod.cuda.is_available()}" if m == "torch" else ""
        print(f"{m} {mod.__version__}{extra}")
    except ImportError as e:
        print(f"{m}: not installed ({e})")
PY
python scripts/gpu_check.py --json "$out" "$@"
