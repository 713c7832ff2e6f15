"""onnxruntime, as every part of the package opens it: the import (with the extra to install when it is
missing), the execution providers for a device, session options, and the check that CUDA was really used."""
from __future__ import annotations

import os

from ..errors import BackendError

ORT_INSTALL_HINT = (
    "onnxruntime is not installed: install segllm-edge with the extra for your machine, "
    "`pip install 'segllm-edge[cpu]'` (onnxruntime, CPU) or `pip install 'segllm-edge[gpu]'` (onnxruntime-gpu, "
    "x86_64 + NVIDIA GPU; on Jetson use NVIDIA's onnxruntime-gpu wheel for your JetPack). Install only one of "
    "the two: both provide the `onnxruntime` module")


def require_onnxruntime():
    """``import onnxruntime`` or a BackendError saying which extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError(f"{ORT_INSTALL_HINT} (import error: {exc})") from None
    return ort


def require_cuda_provider(what: str) -> None:
    """BackendError unless this onnxruntime has the CUDA execution provider."""
    ort = require_onnxruntime()
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" not in avail:
        raise BackendError(f"{what} needs onnxruntime's CUDAExecutionProvider, which this onnxruntime does not "
                           f"have (available: {', '.join(avail)}). Install onnxruntime-gpu instead of onnxruntime "
                           "(pip uninstall onnxruntime; pip install 'segllm-edge[gpu]'; on Jetson, NVIDIA's "
                           "onnxruntime-gpu wheel for your JetPack) on a machine with an NVIDIA GPU")


def providers_for(device: str) -> list:
    """The provider list for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    device = str(device)
    if device == "cuda" or device.startswith("cuda:"):
        require_cuda_provider(f"device={device!r}")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device != "cpu":
        raise BackendError(f"unknown device {device!r} for the onnxruntime backend; use 'cpu', 'cuda' or 'cuda:N'")
    return ["CPUExecutionProvider"]


def check_providers(providers) -> list:
    """A user's ``providers=`` list (names or ``(name, options)`` pairs), checked against this onnxruntime."""
    ort = require_onnxruntime()
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)) or not providers:
        raise BackendError(f"providers must be a non-empty list of onnxruntime provider names, got {providers!r}")
    avail = ort.get_available_providers()
    out = []
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) else p
        if not isinstance(name, str) or name not in avail:
            raise BackendError(f"onnxruntime provider {name!r} is not available here (available: {', '.join(avail)})")
        out.append(tuple(p) if isinstance(p, (tuple, list)) else p)
    return out


#: the session config key that turns MatMul weight prepacking off (lean probe sessions, CLIP weights shared by sessions)
DISABLE_PREPACKING = "session.disable_prepacking"


def session_options(threads: int | None = None, base=None):
    """The package's SessionOptions (all graph optimisations, quiet logs, one intra-op thread per core), or
    ``base`` (a user's ``onnxruntime.SessionOptions``) as given."""
    ort = require_onnxruntime()
    if base is not None:
        if not isinstance(base, ort.SessionOptions):
            raise BackendError(f"session_options must be an onnxruntime.SessionOptions, got {type(base).__name__}")
        return base
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3
    return opts


def open_session(path, options, providers, what: str):
    """One InferenceSession; a corrupt file is a CheckpointError, a silent CUDA→CPU fallback a BackendError."""
    from ..errors import CheckpointError

    ort = require_onnxruntime()
    try:
        sess = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        raise CheckpointError(f"cannot load graph {what} from {path}: {exc}") from None
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if first == "CUDAExecutionProvider" and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu falls back to the CPU (with a log line only) when CUDA/cuDNN cannot be loaded
        raise BackendError(f"onnxruntime could not use CUDA for graph {what} (it fell back to "
                           f"{sess.get_providers()[0]}): check the NVIDIA driver and that the CUDA "
                           "and cuDNN versions match this onnxruntime-gpu build")
    return sess
