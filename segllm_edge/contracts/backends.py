"""The backend names ``segllm_edge.load`` and the CLI take."""
from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "cuda", "tensorrt")
