"""TensorRT engines from a segllm-edge ONNX export: op check, shape profiles, engine cache, builder.

Nothing here imports ``tensorrt`` at module import time; :func:`builder.build_engines` and
:class:`segllm_edge.runtime.trt_backend.TrtBackend` import it when called and raise
:class:`segllm_edge.errors.BackendError` with install instructions when it is missing.
"""
from __future__ import annotations

__all__ = ["ops", "builder"]  # profiles and the engine cache: segllm_edge.contracts.engine_profiles, .engines
