"""Importing TensorRT: the one place that says how to get it when it is missing, and which API generation
it has.

TensorRT 10 (JetPack 6, Jetson Orin) still has the weak-typing API: builder precision flags
(``BuilderFlag.FP16/BF16``), ``OBEY_PRECISION_CONSTRAINTS`` and per-layer ``precision``. TensorRT 11 removed
it: networks are strongly typed, the ONNX graph carries every tensor's type (fp32 islands are explicit
``Cast`` nodes). :func:`api_generation` tells the builder which path to take.
"""
from __future__ import annotations

import re

from ...errors import BackendError

MIN_MAJOR = 10                    # the oldest TensorRT this builder and runtime use (JetPack 6 ships 10.x)
STRONGLY_TYPED_FROM = 11          # TensorRT majors >= this only build strongly typed networks
WEAK = "weak"                     # precision flags + per-layer constraints (TensorRT 10)
STRONG = "strong"                 # strongly typed networks, types from the ONNX graph (TensorRT >= 11)

INSTALL_HINT = (
    "TensorRT is not installed (the Python module `tensorrt` cannot be imported). TensorRT is not on the "
    "package registries segllm-edge installs from; get it from NVIDIA: on Jetson it ships with JetPack "
    "(apt packages `nvidia-tensorrt` and `python3-libnvinfer`; use the system python3 or a venv made with "
    "--system-site-packages); on x86_64 servers use the NGC container `nvcr.io/nvidia/tensorrt:<yy.mm>-py3` "
    "(or `pip install tensorrt` with access to pypi.nvidia.com). See docs/tensorrt.md. The onnxruntime backend "
    "(`load(export, backend=\"onnxruntime\")`, or backend=\"cuda\" with onnxruntime-gpu) works without it."
)


def parse_version(v: str) -> tuple[int, int]:
    """'10.3.0.26' → (10, 3); BackendError for a version string that is not one."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(v))
    if not m:
        raise BackendError(f"cannot read the TensorRT version {v!r} (tensorrt.__version__)")
    return int(m.group(1)), int(m.group(2))


def api_generation(version: str) -> str:
    """:data:`WEAK` for TensorRT 10, :data:`STRONG` for TensorRT 11 and later."""
    return STRONG if parse_version(version)[0] >= STRONGLY_TYPED_FROM else WEAK


def check_version(version: str) -> tuple[int, int]:
    major, minor = parse_version(version)
    if major < MIN_MAJOR:
        raise BackendError(f"TensorRT {major}.{minor} is too old: segllm-edge needs TensorRT {MIN_MAJOR} or later "
                           "(JetPack 6 on Jetson; the NGC tensorrt container 24.05 or later on x86_64)")
    return major, minor


def require_tensorrt():
    """``import tensorrt`` (version checked: >= 10) or a BackendError saying how to get it."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} (import error: {exc})") from None
    except OSError as exc:  # bindings present, libnvinfer missing (e.g. a bare tensorrt-cuXX-bindings wheel)
        raise BackendError(f"{INSTALL_HINT} (the bindings are installed but the TensorRT libraries are not: {exc})") from None
    check_version(getattr(trt, "__version__", "unknown"))
    return trt
