"""The package's front door: ``segllm_edge.load(path)`` → a model that opens sessions."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import BackendError, CheckpointError

BACKENDS = ("torch", "onnxruntime", "cuda", "tensorrt")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise BackendError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")


class SegLLM:
    """A loaded model on one backend. Open one :meth:`session` per image/conversation."""

    def __init__(self, backend):
        self.backend = backend

    @property
    def info(self):
        return self.backend.info

    def session(self, image, reuse: bool = True, trace: bool = False, max_kv_bytes: int | None = None,
                max_bytes: int | None = None):
        """Start a conversation over ``image`` (a path, PIL image or HxWx3 uint8 array).

        ``max_kv_bytes`` caps the KV cache, ``max_bytes`` the whole session state (KV cache, image
        features and every round's masks); a round over either raises ContextOverflowError first."""
        from .runtime.session import Session

        return Session(self.backend, image, reuse=reuse, trace=trace, max_kv_bytes=max_kv_bytes,
                       max_bytes=max_bytes)

    def __repr__(self) -> str:
        i = self.info
        return (f"SegLLM(backend={self.backend.name}, hidden={i.hidden_size}, layers={i.num_layers}, "
                f"clip={i.clip_hidden}, dtype={i.dtype})")


def _is_export(path: Path) -> bool:
    from .export.manifest import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()


def _require_torch_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else f"PyTorch built for CUDA {torch.version.cuda}"
        raise BackendError(f"{what} needs an NVIDIA GPU, but PyTorch sees no CUDA device here ({build}; check "
                           "the driver, CUDA_VISIBLE_DEVICES or the container's --gpus flag)")


def _require_ort_cuda() -> None:
    from .runtime.ort_backend import require_onnxruntime

    ort = require_onnxruntime()
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" not in avail:
        raise BackendError("backend='cuda' on an export folder runs onnxruntime's CUDAExecutionProvider, which this "
                           f"onnxruntime does not have (available: {', '.join(avail)}). Install onnxruntime-gpu "
                           "instead of onnxruntime (pip uninstall onnxruntime; pip install 'segllm-edge[gpu]'; on "
                           "Jetson, NVIDIA's onnxruntime-gpu wheel for your JetPack) on a machine with an NVIDIA GPU")


def load(path: str | Path, backend: str = "torch", dtype=None, device: str = "cpu",
         use_stored_gammas: bool = False, **kwargs) -> SegLLM:
    """Load a SegLLM checkpoint or export folder on one of :data:`BACKENDS`:

    * ``"torch"``: a checkpoint folder, PyTorch on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) in ``dtype``;
    * ``"onnxruntime"``: an export folder (``segllm-edge export``) on ``device`` (``"cpu"`` or ``"cuda"``:
      the CUDA execution provider of onnxruntime-gpu);
    * ``"cuda"``: the GPU whatever the folder is: an export folder (it has ``manifest.json``) runs on
      onnxruntime's CUDA execution provider, a checkpoint folder on PyTorch CUDA;
    * ``"tensorrt"``: an export folder with engines from ``segllm-edge build-engines`` (``engines_dir=``,
      default ``<export>/engines``; ``precision=`` picks among several builds); needs TensorRT and a GPU.

    A backend that cannot run here (no GPU, no onnxruntime-gpu, no TensorRT) raises BackendError
    saying what is missing. ``use_stored_gammas`` (torch): use the fusion block's stored
    ``gamma_v/gamma_l`` instead of the 1/6 the released research loader actually runs with (see the
    model notes in the README).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or export folder: {path}")
    if backend == "cuda":
        dev = device if str(device).startswith("cuda") else "cuda"
        if _is_export(path):
            _require_ort_cuda()
            from .runtime.ort_backend import OrtBackend

            return SegLLM(OrtBackend.from_export(path, device=dev, **kwargs))
        _require_torch_cuda("backend='cuda' on a checkpoint folder (PyTorch on the GPU)")
        backend, device = "torch", dev
    if backend == "torch":
        from .modeling.loader import load_checkpoint
        from .runtime.backend import TorchBackend

        if str(device).startswith("cuda"):
            _require_torch_cuda(f"device={device!r}")
        loaded = load_checkpoint(path, dtype=_dtype(dtype), use_stored_gammas=use_stored_gammas, **kwargs)
        return SegLLM(TorchBackend(loaded, device=device))
    if backend == "onnxruntime":
        try:
            from .runtime.ort_backend import OrtBackend
        except ImportError as exc:
            raise BackendError(f"the onnxruntime backend is not available here: {exc}") from None
        return SegLLM(OrtBackend.from_export(path, device=device, **kwargs))
    if backend == "tensorrt":
        from .runtime.trt_backend import TrtBackend

        return SegLLM(TrtBackend.from_export(path, device=device if str(device).startswith("cuda") else "cuda",
                                             **kwargs))
    raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
