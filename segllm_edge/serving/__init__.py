"""Triton Inference Server plumbing.

* :mod:`segllm_edge.serving.tritonserver` finds the ``tritonserver`` binary that the
  ``nvidia-pytriton`` wheel ships, prepares its python backend for the running
  interpreter and runs the server (:class:`TritonServer`).
* :mod:`segllm_edge.serving.pystub` is what a generated python-backend ``model.py``
  calls: it makes the project importable inside Triton's stub process and adapts a
  plain-numpy model class (:class:`PythonModel`) to the python backend's request API.

Nothing here imports Triton, tritonclient or pytriton at import time.
"""
from __future__ import annotations

from .pystub import PythonModel, RequestContext, SequenceError, SequenceStore, write_python_model
from .tritonserver import (TritonInstall, TritonServer, TritonServerError, TritonUnavailableError,
                           find_triton, prepare_backends)

__all__ = [
    "TritonServer",
    "TritonInstall",
    "TritonServerError",
    "TritonUnavailableError",
    "find_triton",
    "prepare_backends",
    "PythonModel",
    "RequestContext",
    "SequenceStore",
    "SequenceError",
    "write_python_model",
]
