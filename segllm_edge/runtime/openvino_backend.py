"""The OpenVINO backend: runs an export folder's ONNX graphs with OpenVINO's CPU plugin (``pip install
'segllm-edge[openvino]'``), same Backend protocol and round loop as the onnxruntime backend.

OpenVINO reads the ONNX files directly (no conversion step, nothing written next to the export). Its CPU plugin
defaults to bf16 on CPUs that have it; this backend always sets the inference precision explicitly:

* ``hipie_precision="fp32"`` (default): ``f32`` for every graph — parity with onnxruntime / PyTorch;
* ``hipie_precision="bf16"``: the two HIPIE graphs (``mask_backbone``, ``mask_decoder``) in ``bf16`` (faster on
  CPUs with avx512_bf16 / AMX), the other graphs ``f32``;
* ``hipie_precision="bf16-ffn"``: only the mask decoder's feed-forward MatMuls in bf16, every other node of every
  graph f32 (:mod:`.openvino_mixed`);
* ``hipie_precision="int8-ffn"``: only the mask decoder's feed-forward MatMuls in INT8 (int8 weights, activations
  quantized at run time; CPUs with INT8 support, e.g. avx512_vnni), every other node f32 (:mod:`.openvino_mixed`).

Check a reduced precision's accuracy with :func:`segllm_edge.runtime.cpu_paths.accuracy_guard` before using it.

A graph OpenVINO cannot compile (e.g. onnxruntime-only quantized ops) runs on onnxruntime instead; ``describe()``
says which engine runs each graph.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from ..contracts.export_folder import open_export
from ..contracts.manifest import KV_CONCAT
from ..contracts.ort import require_onnxruntime
from ..errors import BackendError, CheckpointError, ConfigError
from .ort_backend import OrtBackend, check_graph_inputs

HIPIE_GRAPHS = ("mask_backbone", "mask_decoder")
HIPIE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "bf16-ffn": "f32", "int8-ffn": "f32"}  # → HIPIE graphs' hint
FFN_BF16_GRAPHS = ("mask_decoder",)   # graphs whose feed-forward MatMuls "bf16-ffn"/"int8-ffn" change
FFN_PRECISIONS = {"bf16-ffn": "bf16", "int8-ffn": "int8"}   # hipie_precision → the FFN MatMuls' precision
OPENVINO_INSTALL_HINT = "OpenVINO is not installed: `pip install 'segllm-edge[openvino]'`"


def require_openvino():
    """``import openvino`` or a BackendError naming the extra."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(f"{OPENVINO_INSTALL_HINT} (import error: {exc})") from None
    return openvino


def openvino_available() -> bool:
    try:
        require_openvino()
    except BackendError:
        return False
    return True


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 natively here (avx512_bf16 or AMX)."""
    if not openvino_available():
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_has_int8() -> bool:
    """Whether OpenVINO's CPU plugin has INT8 kernels here (VNNI / AMX, or its AVX2/AVX-512 emulation)."""
    if not openvino_available():
        return False
    import openvino as ov

    return "INT8" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _Input:
    def __init__(self, name: str):
        self.name = name


class OpenVinoSession:
    """One compiled graph behind onnxruntime's ``InferenceSession`` calls used by :class:`OrtBackend`."""

    def __init__(self, core, path: Path, precision: str, threads: int, ffn: str | None = None):
        """``ffn``: ``"bf16"`` or ``"int8"`` for the feed-forward MatMuls of a HIPIE mask decoder."""
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads)}
        if ffn:
            from .openvino_mixed import INT8_DYNAMIC_GROUP_SIZE, read_ffn

            model = read_ffn(core, path, ffn)
            if ffn == "int8":
                config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = INT8_DYNAMIC_GROUP_SIZE
        else:
            model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision + (f"+ffn-{ffn}" if ffn else "")
        self._inputs = [_Input(p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = {name: i for i, o in enumerate(self.compiled.outputs) for name in o.get_names()}
        # one infer request (its buffers are the size of the graph's activations): callers on several threads
        # (a server's round threads) take turns, as onnxruntime's session.run would let them run at once
        self._lock = threading.Lock()

    def get_inputs(self):
        return self._inputs

    def get_providers(self):
        return [f"OpenVINO CPU {self.precision}"]

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        """The outputs named (in that order; ``None``: all, in the graph's order), as onnxruntime returns them."""
        if output_names is None:
            index = list(range(len(self.compiled.outputs)))
        else:
            output_names = list(output_names)
            unknown = [n for n in output_names if n not in self._outputs]
            if unknown:
                raise BackendError(f"graph has no output {unknown[0]!r}; it has {sorted(self._outputs)}")
            index = [self._outputs[n] for n in output_names]
        with self._lock:
            self.request.infer({k: _tensor(v) for k, v in feeds.items()})
            # the request reuses its output buffers: copy before the next call overwrites them
            return [_array(self.request.get_output_tensor(i)) for i in index]


def _tensor(a: np.ndarray):
    """A feed as OpenVINO takes it: bfloat16 arrays (ml_dtypes) as bf16 tensors, which OpenVINO would otherwise
    read as float16 bits."""
    if a.dtype.name != "bfloat16":
        return a
    ov = require_openvino()
    return ov.Tensor(np.ascontiguousarray(a).view(np.uint16), a.shape, ov.Type.bf16)


def _array(tensor) -> np.ndarray:
    """An output tensor as numpy (a copy); bf16 outputs, which OpenVINO hands out as float16 bits, as bfloat16."""
    a = np.array(tensor.data)
    if tensor.element_type.get_type_name() == "bf16":
        from ..contracts.precisions import numpy_dtype

        a = a.view(np.uint16).view(numpy_dtype("bfloat16"))
    return a


class OpenVinoBackend(OrtBackend):
    name = "openvino"

    @classmethod
    def from_export(cls, path, device: str = "cpu", threads: int | None = None, hipie_precision: str = "fp32",
                    **_ignored) -> "OpenVinoBackend":
        if str(device) != "cpu":
            raise BackendError(f"the openvino backend runs on the CPU only, not {device!r}")
        if not isinstance(hipie_precision, str) or hipie_precision not in HIPIE_PRECISIONS:   # a bad value: ConfigError
            raise ConfigError(f"unknown hipie_precision {hipie_precision!r} for the openvino backend; use one of "
                              f"{', '.join(HIPIE_PRECISIONS)} (INT8 HIPIE: backend='onnxruntime', hipie_int8=True)")
        ov = require_openvino()
        export = open_export(Path(path))
        folder, manifest = export.folder, export.manifest
        threads = threads or os.cpu_count() or 1
        if hipie_precision == "int8-ffn" and not cpu_has_int8():
            raise BackendError("hipie_precision='int8-ffn' needs a CPU with INT8 support; OpenVINO reports none "
                               "here: use 'fp32'")
        if "bf16" in hipie_precision and not cpu_has_bf16():
            raise BackendError(f"hipie_precision={hipie_precision!r} needs a CPU with bf16 support "
                               "(avx512_bf16 or AMX); "
                               "OpenVINO reports none here: use 'fp32'")
        core = ov.Core()
        sessions = {}
        for name, g in manifest.graphs.items():
            prec = HIPIE_PRECISIONS[hipie_precision] if name in HIPIE_GRAPHS else "f32"
            ffn = FFN_PRECISIONS.get(hipie_precision) if name in FFN_BF16_GRAPHS else None
            sessions[name] = open_graph(core, folder / g.file, name, prec, threads, ffn=ffn,
                                        kv_layout=manifest.kv_layout)
            check_graph_inputs(g, sessions[name])
        backend = cls.from_sessions(export, sessions)
        backend.hipie_precision = hipie_precision
        backend.precision = (manifest.precision if hipie_precision == "fp32"
                             else f"{manifest.precision}+hipie-{hipie_precision}")
        return backend

    def describe(self) -> str:
        return json.dumps({"folder": str(self.folder), "precision": self.precision,
                           "engines": {k: s.get_providers()[0] for k, s in self.sessions.items()}})


def open_graph(core, path: Path, name: str, precision: str, threads: int, ffn=None, kv_layout: str = KV_CONCAT):
    """The graph at ``path`` compiled by OpenVINO at ``precision``, or on onnxruntime where OpenVINO cannot
    compile it; CheckpointError when the file is missing or neither can load it. The llm of an export in the
    in-place KV layout always runs on onnxruntime (its past and present are bound to one buffer: IOBinding)."""
    if name == "llm" and kv_layout != KV_CONCAT:
        return _ort_session(path, threads, name, f"the {kv_layout!r} KV layout needs onnxruntime's IOBinding")
    try:
        return OpenVinoSession(core, path, precision, threads, ffn=ffn)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        if not path.is_file():
            raise CheckpointError(f"cannot load graph {name}: {path} is missing") from None
        return _ort_session(path, threads, name, exc)


def _ort_session(path: Path, threads: int, name: str, why: Exception):
    """onnxruntime for a graph OpenVINO could not compile."""
    try:
        ort = require_onnxruntime()
    except BackendError:
        raise CheckpointError(f"OpenVINO cannot compile graph {name} ({path}): {why}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load graph {name} from {path}: OpenVINO: {why}; onnxruntime: {exc}") from None
