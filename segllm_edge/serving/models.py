"""The stateless python-backend models of a generated repository (``--target python``).

* :class:`OrtGraphModel` -- one exported graph run by onnxruntime, or by OpenVINO (CPU; the ``segllm_graph_engine``
  parameter, ``--graph-engine``).  Its tensor names and
  dtypes come from the model's ``config.pbtxt``, which the generator wrote from the manifest;
  the graph file is the ``segllm_graph_file`` parameter (absolute, or relative to the model folder).
* :class:`PreprocessModel` -- encoded image bytes → the CLIP and HIPIE input tensors, plus what
  the round loop needs from the preprocessing (the padded 1024² uint8 image, valid size).

Both are plain :class:`~segllm_edge.serving.pystub.PythonModel` classes: ``infer(inputs, ctx)``
on numpy dicts, usable without Triton (the unit tests and the in-process BLS caller do that).
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np

from ..contracts.serving import (GRAPH_ENGINE_OPENVINO, GRAPH_ENGINE_ORT, GRAPH_ENGINES, HIPIE_IMAGE, PARAM_AXES,
                                PARAM_AXIS_LIMITS, PARAM_CLIP_SIZE, PARAM_GRAPH_ENGINE, PARAM_GRAPH_FILE,
                                PARAM_THREADS, PIXEL_VALUES)
from ..errors import ImageError
from ..runtime.arena import trim_heap
from ..runtime.ort_values import run as run_session
from .pystub import PythonModel, RequestContext, numpy_dtype

#: a graph run longer than this is followed by a heap trim (3-30 ms: <= a few % of such a run)
TRIM_AFTER_S = 0.5



def resolve_model_path(value: str, args: dict | None, model_name: str) -> Path:
    """A path parameter: absolute, or relative to ``<model_repository>/<model>/`` (as Triton passes it)."""
    p = Path(value)
    if p.is_absolute():
        return p
    repo = (args or {}).get("model_repository")
    if repo:
        base = Path(repo)
        # the python backend passes the model's own folder as model_repository
        if base.name != model_name and (base / model_name).is_dir():
            base = base / model_name
        return base / p
    return p


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session (one inter-op thread; intra-op threads as given, default all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no CPU memory arena: a server's models keep their weights, not their peak activations (the
    # mask decoder's arena held 1.8 GB more after two runs, growing; same speed without it)
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_graph_engine(engine: str, here: bool = True) -> str:
    """``engine`` if it is one of :data:`GRAPH_ENGINES` (else ConfigError naming the choices) and, with ``here``,
    a graph model can run on it in this Python (BackendError with the install hint when OpenVINO is not
    installed; a repository written for another machine checks the name only)."""
    from ..errors import ConfigError

    if engine not in GRAPH_ENGINES:
        raise ConfigError(f"unknown graph engine {engine!r}; choose one of {', '.join(GRAPH_ENGINES)}")
    if here and engine == GRAPH_ENGINE_OPENVINO:
        from ..runtime.openvino_backend import require_openvino

        require_openvino()
    return engine


def graph_session(path: str | os.PathLike, name: str, engine: str = GRAPH_ENGINE_ORT, threads: int | None = None):
    """The session a graph model runs its graph with: :func:`ort_session`, or OpenVINO's CPU plugin in fp32
    (:func:`~segllm_edge.runtime.openvino_backend.open_graph`, as ``load(export, backend="openvino")`` opens it;
    a graph OpenVINO cannot compile runs on onnxruntime, with a warning, in :func:`ort_session`'s settings)."""
    if check_graph_engine(engine) == GRAPH_ENGINE_ORT:
        return ort_session(path, threads)
    import openvino as ov

    from ..runtime.openvino_backend import OpenVinoSession, open_graph

    session = open_graph(ov.Core(), Path(path), name, "f32", int(threads or os.cpu_count() or 1))
    if isinstance(session, OpenVinoSession):
        return session
    import warnings

    warnings.warn(f"graph model {name!r}: OpenVINO cannot compile {path}; it runs on onnxruntime", stacklevel=2)
    return ort_session(path, threads)


class OrtGraphModel(PythonModel):
    """Runs one exported graph with onnxruntime (or OpenVINO: the ``segllm_graph_engine`` parameter); inputs
    and outputs as listed in its config (= the manifest)."""

    def initialize(self) -> None:
        name = self.config.get("name", "")
        graph_file = self.params.get(PARAM_GRAPH_FILE)
        if not graph_file:
            raise ValueError(f"model {name!r} has no {PARAM_GRAPH_FILE!r} parameter")
        self.graph_path = resolve_model_path(graph_file, self.args, name)
        threads = int(self.params.get(PARAM_THREADS) or 0) or None
        self.engine = self.params.get(PARAM_GRAPH_ENGINE) or GRAPH_ENGINE_ORT
        self.session = graph_session(self.graph_path, name, self.engine, threads)
        self.input_dtypes = {i["name"]: numpy_dtype(i["data_type"]) for i in self.config.get("input", [])}
        self.output_names = [o["name"] for o in self.config.get("output", [])]
        import json

        self.axes = json.loads(self.params.get(PARAM_AXES) or "{}")
        self.axis_limits = json.loads(self.params.get(PARAM_AXIS_LIMITS) or "{}")
        got = [i.name for i in self.session.get_inputs()]
        if sorted(got) != sorted(self.input_dtypes):
            raise ValueError(f"graph {self.graph_path} has inputs {got}, the model config says "
                             f"{list(self.input_dtypes)}: regenerate the repository from the export's manifest")

    def error_message(self, exc: BaseException) -> str:
        from .wire import bracketed

        return bracketed(exc)

    def check_shapes(self, inputs: dict) -> None:
        """Every input as the manifest declares it, symbolic axes within their limits (before running)."""
        from ..errors import LimitError

        name = self.config.get("name", "")
        seen: dict[str, int] = {}
        for k, v in inputs.items():
            axes = self.axes.get(k)
            if axes is None:
                continue
            shape = np.shape(v)
            if len(shape) != len(axes):
                raise LimitError(f"model {name!r}: input {k!r} has shape {list(shape)}, expected {axes}")
            for d, a in zip(shape, axes):
                if isinstance(a, int) and d != a:
                    raise LimitError(f"model {name!r}: input {k!r} has shape {list(shape)}, expected {axes}")
                if isinstance(a, str):
                    lim = self.axis_limits.get(a)
                    if lim is not None and d > lim:
                        raise LimitError(f"model {name!r}: axis {a!r} of input {k!r} is {d}, over its limit of {lim}")
                    if seen.setdefault(a, d) != d:
                        raise LimitError(f"model {name!r}: axis {a!r} is {seen[a]} in one input and {d} in {k!r}")
        total = self.axis_limits.get("total")
        if total is not None and seen.get("past", 0) + seen.get("seq", 0) > total:
            raise LimitError(f"model {name!r}: past {seen.get('past', 0)} + seq {seen.get('seq', 0)} tokens is over "
                             f"the context of {total}")

    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        self.check_shapes(inputs)
        feeds = {k: np.ascontiguousarray(v, dtype=self.input_dtypes[k]) for k, v in inputs.items()
                 if k in self.input_dtypes}
        t0 = time.perf_counter()
        outs = run_session(self.session, self.output_names, feeds)   # bf16 feeds through OrtValues
        if time.perf_counter() - t0 > TRIM_AFTER_S:   # a long run (HIPIE): its freed activations back to the system
            trim_heap()
        return dict(zip(self.output_names, outs))


def decode_image_bytes(payload) -> np.ndarray:
    """Encoded PNG/JPEG/... bytes → HxWx3 uint8 RGB; :class:`ImageError` for anything unreadable or over
    the limits of :mod:`segllm_edge.limits` (checked from the header, before decoding)."""
    from ..limits import check_image_bytes
    from ..pipeline.images import read_image

    if isinstance(payload, np.ndarray):
        payload = payload.reshape(-1)[0] if payload.size else b""
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise ImageError("the image payload is empty: send the encoded PNG/JPEG bytes with the first round")
    check_image_bytes(len(payload), "the image payload")
    return read_image(io.BytesIO(bytes(payload)), f"the image payload ({len(payload)} bytes)", verb="decode")


def preprocess_arrays(rgb: np.ndarray, clip_size: int) -> dict[str, np.ndarray]:
    """The tensors :class:`PreprocessModel` returns, for an RGB array."""
    from ..pipeline.images import clip_preprocess, hipie_preprocess

    clip = clip_preprocess(rgb, clip_size)[None]
    hipie, padded, input_hw = hipie_preprocess(rgb)
    return {
        PIXEL_VALUES: np.ascontiguousarray(clip, dtype=np.float32),
        HIPIE_IMAGE: np.ascontiguousarray(hipie, dtype=np.float32),
        "resized_padded": np.ascontiguousarray(padded, dtype=np.uint8),
        "input_hw": np.asarray(input_hw, dtype=np.int32),
    }


class PreprocessModel(PythonModel):
    """``image`` (BYTES [1]: encoded PNG/JPEG) → CLIP pixels, HIPIE input, padded image, sizes."""

    def initialize(self) -> None:
        self.clip_size = int(self.params.get(PARAM_CLIP_SIZE) or 224)

    def error_message(self, exc: BaseException) -> str:
        from .wire import bracketed

        return bracketed(exc)

    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        rgb = decode_image_bytes(inputs["image"])
        return preprocess_arrays(rgb, self.clip_size)
