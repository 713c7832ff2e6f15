"""The onnxruntime backend: runs an export folder's graphs (numpy in, numpy out), same Backend protocol as
the torch backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contracts.export_folder import ExportFolder, open_export
from ..contracts.manifest import KV_INPLACE, kv_names
from ..contracts import ort as ortc
from ..contracts.precisions import numpy_dtype
from ..errors import BackendError, CheckpointError
from ..pipeline.tokenizer import SegLLMTokenizer
from .arena import llm_run_options
from .device_kv_cache import OrtValueKVCache, concat_kv_cache, run_llm_bound
from .kv_buffer import inplace_cache, run_llm_inplace, session_kv_device
from .kv_cache import HostKVCache
from .ort_values import run as run_session
from .shared_weights import CLIP_GRAPHS, open_sessions_sharing_weights


def check_precision_runs_on(export: ExportFolder, provs) -> None:
    """BackendError for a bf16 export on onnxruntime's CPU provider alone (it has no bf16 kernels)."""
    if export.manifest.precision == "bf16" and all(
            (p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in provs):
        raise BackendError(f"{export.folder} is a bf16 export: onnxruntime's CPU provider has no bf16 kernels "
                           "(Conv, MatMul, Mul); run it with backend='openvino' (bf16 on the CPU), on CUDA, "
                           "or export fp16/fp32 for onnxruntime on the CPU")


def check_graph_inputs(spec, session) -> None:
    """CheckpointError when an opened graph's inputs are not the manifest's."""
    got = [i.name for i in session.get_inputs()]
    want = [t.name for t in spec.inputs]
    if got != want:
        raise CheckpointError(f"graph {spec.file} has inputs {got}, the manifest says {want}: re-export")


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, export: ExportFolder, tokenizer: SegLLMTokenizer, sessions: dict, embed: np.ndarray):
        self.export = export
        self.folder = export.folder
        self.manifest = export.manifest
        self.precision = export.manifest.precision
        self.info = export.info
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.embed = embed
        self._past, self._present = kv_names(self.info.num_layers)
        self._dtypes = {name: {t.name: numpy_dtype(t.dtype) for t in g.inputs} for name, g in self.manifest.graphs.items()}
        self._decoder_outputs = [t.name for t in self.manifest.graphs["mask_decoder"].outputs]
        # where a concat-layout KV cache lives between rounds: on the llm session's device (a CUDA session keeps
        # it there as OrtValues, bound with IOBinding: only embeddings go in and hidden states come out per
        # round), None for host numpy arrays. bind_kv(device) forces the OrtValue cache (tests, on the CPU).
        self.kv_device = session_kv_device(sessions["llm"]) if "llm" in sessions else None

    @classmethod
    def from_export(cls, path, device: str = "cpu", threads: int | None = None, providers=None,
                    session_options=None, hipie_int8: bool = False) -> "OrtBackend":
        """Open ``path`` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``), or on the given onnxruntime
        ``providers`` (then ``device`` is not read) with the given ``session_options``. ``hipie_int8``: run
        ``mask_decoder.int8.onnx`` (INT8 feed-forward, :func:`segllm_edge.export.hipie_quant.quantize_hipie_int8`)
        instead of the fp32 mask decoder."""
        ortc.require_onnxruntime()
        export = open_export(Path(path))
        provs = ortc.check_providers(providers) if providers is not None else ortc.providers_for(device)
        check_precision_runs_on(export, provs)
        opts = ortc.session_options(threads, session_options)
        files = {name: export.graph_path(name) for name in export.manifest.graphs}
        if hipie_int8:
            from ..contracts.hipie_int8 import int8_path

            files["mask_decoder"] = int8_path(files["mask_decoder"])
            if not files["mask_decoder"].is_file():
                raise CheckpointError(f"{export.folder} has no {files['mask_decoder'].name}: write it with "
                                      "`segllm_edge.export.hipie_quant.quantize_hipie_int8`")
        sessions, shared = {}, None
        if session_options is None and all(g in files for g in CLIP_GRAPHS):   # CLIP held once for both graphs
            sessions, shared = open_sessions_sharing_weights({g: files[g] for g in CLIP_GRAPHS},
                                                             lambda: ortc.session_options(threads), provs)
        for name, g in export.manifest.graphs.items():
            if name not in sessions:
                sessions[name] = ortc.open_session(files[name], opts, provs, name)
            check_graph_inputs(g, sessions[name])
        backend = cls.from_sessions(export, sessions)
        backend.shared_weights = shared     # the buffers under the CLIP sessions: alive as long as they are
        if hipie_int8:
            backend.precision = f"{export.manifest.precision}+hipie-int8"
        return backend

    @classmethod
    def from_sessions(cls, export: ExportFolder, sessions: dict):
        """The backend over already opened graph sessions (anything with ``run(None, feeds)``)."""
        return cls(export, SegLLMTokenizer.from_folder(export.tokenizer_dir), sessions, export.embed_table())

    # ------------------------------------------------------------------ helpers
    def _run(self, graph: str, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        dt = self._dtypes[graph]
        feeds = {k: np.ascontiguousarray(v, dtype=dt[k]) for k, v in feeds.items()}
        return run_session(self.sessions[graph], None, feeds, run_options)    # bf16 feeds through OrtValues

    # ----------------------------------------------------------------- protocol
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_image(self, pixels):
        return self._run("vision_encoder", {"pixel_values": pixels})[0]

    def encode_masks(self, crops, boxes):
        return self._run("mask_encoder", {"crops": crops, "boxes": boxes})[0]

    def bind_kv(self, device=("cpu", 0)) -> None:
        """Keep concat-layout KV caches as OrtValues on ``device`` (what a CUDA llm session does by itself)."""
        self.kv_device = (str(device[0]), int(device[1]))

    def new_cache(self) -> HostKVCache | OrtValueKVCache:
        dt = self._dtypes["llm"][self._past[0]]
        if self.manifest.kv_layout == KV_INPLACE:      # buffers the graph writes into (runtime/kv_buffer.py)
            return inplace_cache(self.info, dt, session_kv_device(self.sessions["llm"]))
        return concat_kv_cache(self.info, dt, self.kv_device)

    def llm(self, embeds, cache: HostKVCache | None):
        keep = cache is not None
        if not keep:
            cache = self.new_cache()
        if self.manifest.kv_layout == KV_INPLACE:
            sess = self.sessions["llm"]
            return run_llm_inplace(sess, np.asarray(embeds, dtype=self._dtypes["llm"]["inputs_embeds"]), cache,
                                   "inputs_embeds", self._past, "hidden_states", self._present,
                                   llm_run_options(sess, np.shape(embeds)[1]))
        if isinstance(cache, OrtValueKVCache):       # the past stays on the device, the present is bound there
            return run_llm_bound(self.sessions["llm"], np.asarray(embeds, dtype=self._dtypes["llm"]["inputs_embeds"]),
                                 cache, "inputs_embeds", self._past, "hidden_states", self._present)
        feeds = {"inputs_embeds": embeds}
        feeds.update(zip(self._past, cache.arrays))
        # after a prefill the llm's arena gives back what it grew by
        out = self._run("llm", feeds, llm_run_options(self.sessions["llm"], np.shape(embeds)[1]))
        if keep:
            cache.arrays = out[1:]
        return out[0]

    def seg_head(self, hidden):
        return self._run("seg_head", {"hidden": hidden})[0]

    def mask_backbone(self, image):
        return self._run("mask_backbone", {"image": image})

    def mask_decode(self, features, cond):
        feeds = {f"features.{i}": f for i, f in enumerate(features)}
        feeds["conditioning"] = cond
        return dict(zip(self._decoder_outputs, self._run("mask_decoder", feeds)))

    def memory_bytes(self):
        return None

