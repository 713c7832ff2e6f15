"""The package's front door: ``segllm_edge.load(path)`` → a model that opens sessions.

Imports neither torch nor onnxruntime: each backend is imported when it is chosen, so an install with
only ``[cpu]`` loads exports and the torch backend says which extra it needs.
"""
from __future__ import annotations

from pathlib import Path

from .contracts.backends import BACKENDS
from .contracts.export_folder import is_export
from .contracts.precisions import dtype_name
from .errors import BackendError, CheckpointError

EXPORT_INSTALL_HINT = ("the PyTorch reference backend needs torch and transformers: "
                       "pip install 'segllm-edge[export]' (see the README's install lines)")


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

    def save(self, session) -> bytes:
        """``session``'s durable part as bytes (image, questions, references, masks, boxes; not the KV cache):
        :meth:`restore` continues it, here or in another process (:mod:`segllm_edge.runtime.session_state`)."""
        from .runtime.session_state import save_session

        return save_session(session)

    def restore(self, state: bytes, trace: bool = False, max_kv_bytes: int | None = None,
                max_bytes: int | None = None):
        """Continue a conversation saved with :meth:`save` (SessionStateError for a state of another
        model/export, or a truncated/corrupt one): the image is encoded again and the KV cache rebuilt with
        one prefill; the next round is the one the saved session would have answered."""
        from .runtime.session_state import restore_session

        return restore_session(state, self.backend, trace=trace, max_kv_bytes=max_kv_bytes, max_bytes=max_bytes)

    def __repr__(self) -> str:
        i = self.info
        path = getattr(self.backend, "cpu_path", None)  # set when load() chose the CPU path itself
        chosen = f", path={path} (default for this CPU)" if path else ""
        precision = getattr(self.backend, "precision", None)
        prec = f", precision={precision}" if precision else ""
        return (f"SegLLM(backend={self.backend.name}{chosen}{prec}, hidden={i.hidden_size}, layers={i.num_layers}, "
                f"clip={i.clip_hidden}, dtype={i.dtype})")


def _import_torch():
    try:
        import torch
    except ImportError:
        raise BackendError(EXPORT_INSTALL_HINT) from None
    return torch


def _require_torch_cuda(what: str) -> None:
    torch = _import_torch()
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else f"PyTorch built for CUDA {torch.version.cuda}"
        raise BackendError(f"{what} needs an NVIDIA GPU, but PyTorch sees no CUDA device here ({build}; check "
                           "the driver, CUDA_VISIBLE_DEVICES or the container's --gpus flag)")


def _export_dtype(path: Path, dtype, backend: str) -> None:
    """An export runs in the dtype it was exported in: another ``dtype`` is an error, not ignored."""
    want = dtype_name(dtype)
    if want is None:
        return
    from .contracts.manifest import Manifest

    have = Manifest.load(path).graphs["llm"].input("inputs_embeds").dtype
    if want != have:
        raise BackendError(f"dtype={dtype!r} cannot be honoured by the {backend} backend: this export's LLM runs in "
                           f"{have} (precision {Manifest.load(path).precision!r}); use dtype='auto' or re-export "
                           "with `segllm-edge export --precision ...`")


def _no_ort_options(backend: str, kwargs: dict) -> None:
    given = [k for k in ("providers", "session_options", "threads") if kwargs.get(k) is not None]
    if given:
        raise BackendError(f"{', '.join(given)} apply to the onnxruntime backend only, not backend={backend!r}")


def load(path: str | Path, backend: str | None = None, dtype="auto", device: str = "cpu",
         use_stored_gammas: bool = False, **kwargs) -> SegLLM:
    """Load a SegLLM checkpoint or export folder on one of :data:`BACKENDS`:

    * ``None`` (default): inferred from the folder: an export (it has ``manifest.json``) on the CPU runs on the
      fastest CPU path that is exact or passed the accuracy guard
      (:func:`segllm_edge.runtime.cpu_paths.default_cpu_path`; ``repr(model)`` names it), on a GPU on
      ``"onnxruntime"``; a checkpoint folder on ``"torch"``;
    * ``"openvino"``: an export folder on OpenVINO's CPU plugin
      (``hipie_precision="fp32"|"bf16"|"bf16-ffn"|"int8-ffn"``, ``threads=``);
    * ``"torch"``: a checkpoint folder, PyTorch on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) in ``dtype``
      (``"auto"`` = fp32; ``"fp16"``/``"bf16"`` for the LLM and CLIP). Needs the ``[export]`` extra;
    * ``"onnxruntime"``: an export folder (``segllm-edge export``) on ``device`` (``"cpu"`` or ``"cuda"``:
      the CUDA execution provider of onnxruntime-gpu), or on ``providers=[...]`` with ``session_options=``
      (an ``onnxruntime.SessionOptions``) and ``threads=``;
    * ``"cuda"``: the GPU whatever the folder is: an export folder runs on onnxruntime's CUDA execution
      provider, a checkpoint folder on PyTorch CUDA;
    * ``"tensorrt"``: an export folder with engines from ``segllm-edge build-engines`` (``engines_dir=``,
      default ``<export>/engines``; ``precision=`` picks among several builds); needs TensorRT and a GPU.

    An export runs in the precision it was exported in: ``dtype`` must be ``"auto"`` or that dtype.
    A backend that cannot run here (no GPU, no onnxruntime-gpu, no TensorRT, no torch) or an option it
    cannot honour raises BackendError saying what is missing. ``use_stored_gammas`` (torch): use the
    fusion block's stored ``gamma_v/gamma_l`` instead of the 1/6 the released research loader actually
    runs with (see docs/model-notes.md).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or export folder: {path}")
    export = is_export(path)
    if backend is None and export and str(device) == "cpu" and not kwargs.get("providers"):
        from .runtime.cpu_paths import default_cpu_path  # the fastest exact or guard-passing CPU path

        chosen = default_cpu_path(path)
        model = chosen.load(path, dtype=dtype, **kwargs)
        model.backend.cpu_path = chosen.name
        return model
    if backend is None:
        backend = "onnxruntime" if export else "torch"
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cuda":
        device = device if str(device).startswith("cuda") else "cuda"
        if export:
            backend = "onnxruntime"
        else:
            _require_torch_cuda("backend='cuda' on a checkpoint folder (PyTorch on the GPU)")
            backend = "torch"
    if backend != "torch" and use_stored_gammas:
        raise BackendError("use_stored_gammas applies to the torch backend (a checkpoint folder); an export "
                           "has the gammas it was exported with")
    if backend == "torch":
        if export:
            raise BackendError(f"{path} is an export folder; the torch backend loads checkpoint folders "
                               "(use backend='onnxruntime' or 'tensorrt', or leave backend out)")
        _no_ort_options(backend, kwargs)
        torch = _import_torch()
        try:
            from .modeling.loader import load_checkpoint
            from .modeling.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendError(f"{EXPORT_INSTALL_HINT} ({exc})") from None
        if str(device).startswith("cuda"):
            _require_torch_cuda(f"device={device!r}")
        torch_dtype = getattr(torch, dtype_name(dtype) or "float32")
        loaded = load_checkpoint(path, dtype=torch_dtype, use_stored_gammas=use_stored_gammas, **kwargs)
        return SegLLM(TorchBackend(loaded, device=device))
    if not export:
        raise CheckpointError(f"{path} is not a segllm-edge export (no manifest.json): the {backend} backend runs "
                              "export folders (`segllm-edge export --checkpoint ... --out ...`)")
    _export_dtype(path, dtype, backend)
    if backend == "onnxruntime":
        from .runtime.ort_backend import OrtBackend

        return SegLLM(OrtBackend.from_export(path, device=device, **kwargs))
    if backend == "openvino":
        from .runtime.openvino_backend import OpenVinoBackend

        return SegLLM(OpenVinoBackend.from_export(path, device=device, **kwargs))
    _no_ort_options(backend, kwargs)
    from .runtime.trt_backend import TrtBackend

    return SegLLM(TrtBackend.from_export(path, device=device if str(device).startswith("cuda") else "cuda", **kwargs))


def drift_probe(image=None, questions=None, backend: str = "onnxruntime", device: str = "cpu", lean: bool = True,
                reference_backend: str | None = None):
    """The conversation a reduced-precision export's drift report runs (``export_model(drift_probe=...)``):
    by default the bundled demo image and questions. Each export folder is loaded with one graph resident at a
    time (``lean``, :mod:`segllm_edge.runtime.lean_sessions`: the same rounds at the memory of the largest graph),
    or with :func:`load` (every graph resident) when ``lean=False`` — and on any backend or device lean loading
    does not cover (TensorRT, torch, a GPU), where host memory is not what bounds the probe.
    ``reference_backend``: the backend of the fp32 reference conversation (default: ``backend``)."""
    from .contracts.demo import DEMO_QUESTIONS, demo_image
    from .export.drift import DriftProbe
    from .runtime.lean_sessions import LEAN_BACKENDS

    def opener(name: str):
        def open_folder(folder, llm_layers_per_block: int | None = None):
            if not (lean and name in LEAN_BACKENDS and str(device) == "cpu"):
                return load(folder, backend=name, device=device)
            from .runtime.lean_sessions import load_lean

            return SegLLM(load_lean(folder, backend=name, device=device, llm_layers_per_block=llm_layers_per_block))
        return open_folder

    reference_backend = reference_backend or backend
    return DriftProbe(load=opener(backend),
                      reference_load=None if reference_backend == backend else opener(reference_backend),
                      backends={"export": backend, "fp32": reference_backend},
                      splits_llm=lean and str(device) == "cpu",
                      image=demo_image() if image is None else image,
                      questions=tuple(questions or DEMO_QUESTIONS))
