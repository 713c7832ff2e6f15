"""The onnxruntime backend: runs an export folder's graphs, same Backend protocol as the torch backend."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError, CheckpointError
from ..export.manifest import Manifest, kv_names
from ..modeling.segllm import ModelInfo
from ..modeling.tokenizer import SegLLMTokenizer


class OrtKVCache:
    """Per-layer key/value arrays as the llm graph returned them (kept by reference, no copy per round)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype=np.float32):
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
        self.arrays: list[np.ndarray] = [empty] * (2 * layers)

    @property
    def length(self) -> int:
        return int(self.arrays[0].shape[2])

    def crop(self, length: int) -> None:
        if length < self.length:
            self.arrays = [np.ascontiguousarray(a[:, :, :length]) for a in self.arrays]

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))


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


def _providers(device: str) -> list:
    ort = require_onnxruntime()

    avail = ort.get_available_providers()
    device = str(device)
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in avail:
            raise BackendError("onnxruntime has no CUDAExecutionProvider here (available: "
                               f"{', '.join(avail)}): install onnxruntime-gpu instead of onnxruntime "
                               "(pip uninstall onnxruntime; pip install 'segllm-edge[gpu]') on a machine with an "
                               "NVIDIA GPU")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device != "cpu":
        raise BackendError(f"unknown device {device!r} for the onnxruntime backend; use 'cpu', 'cuda' or 'cuda:N'")
    return ["CPUExecutionProvider"]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, tokenizer: SegLLMTokenizer, sessions: dict, embed: np.ndarray):
        self.folder = folder
        self.manifest = manifest
        self.precision = manifest.precision
        self.info = ModelInfo(**manifest.model)
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.embed = embed
        self._past, self._present = kv_names(self.info.num_layers)
        self._dtypes = {name: {t.name: np.dtype(t.dtype) for t in g.inputs} for name, g in manifest.graphs.items()}

    @classmethod
    def from_export(cls, path, device: str = "cpu", threads: int | None = None, hipie_int8: bool = False,
                    **_ignored) -> "OrtBackend":
        """``hipie_int8``: run ``mask_decoder.int8.onnx`` (INT8 feed-forward, written by
        :func:`segllm_edge.export.hipie_quant.quantize_hipie_int8`) instead of the fp32 mask decoder."""
        ort = require_onnxruntime()
        folder = Path(path)
        manifest = Manifest.load(folder)
        manifest.check_files(folder)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3
        providers = _providers(device)
        sessions = {}
        files = {name: g.file for name, g in manifest.graphs.items()}
        if hipie_int8:
            from ..export.hipie_quant import int8_path

            files["mask_decoder"] = int8_path(Path(files["mask_decoder"])).name
            if not (folder / files["mask_decoder"]).is_file():
                raise CheckpointError(f"{folder} has no {files['mask_decoder']}: write it with "
                                      "`segllm_edge.export.hipie_quant.quantize_hipie_int8`")
        for name, g in manifest.graphs.items():
            try:
                sessions[name] = ort.InferenceSession(str(folder / files[name]), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
                raise CheckpointError(f"cannot load graph {name} from {folder / g.file}: {exc}") from None
            if providers[0] != "CPUExecutionProvider" and sessions[name].get_providers()[0] != "CUDAExecutionProvider":
                # onnxruntime-gpu falls back to the CPU (with a log line only) when CUDA/cuDNN cannot be loaded
                raise BackendError(f"onnxruntime could not use CUDA for graph {name} (it fell back to "
                                   f"{sessions[name].get_providers()[0]}): check the NVIDIA driver and that the CUDA "
                                   "and cuDNN versions match this onnxruntime-gpu build")
            got = [i.name for i in sessions[name].get_inputs()]
            want = [t.name for t in g.inputs]
            if got != want:
                raise CheckpointError(f"graph {g.file} has inputs {got}, the manifest says {want}: re-export")
        backend = cls.from_sessions(folder, manifest, sessions)
        if hipie_int8:
            backend.precision = f"{manifest.precision}+hipie-int8"
        return backend

    @classmethod
    def from_sessions(cls, folder: Path, manifest: Manifest, sessions: dict):
        """The backend over already opened graph sessions (anything with ``run(None, feeds)``)."""
        try:
            embed = np.load(folder / manifest.arrays["embed_tokens"], mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"cannot read {manifest.arrays['embed_tokens']} in {folder}: {exc}") from None
        tokenizer = SegLLMTokenizer.from_folder(folder / manifest.tokenizer_dir)
        return cls(folder, manifest, tokenizer, sessions, embed)

    # ------------------------------------------------------------------ helpers
    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        dt = self._dtypes[graph]
        feeds = {k: np.ascontiguousarray(v, dtype=dt[k]) for k, v in feeds.items()}
        return self.sessions[graph].run(None, feeds)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().float().numpy()

    # ----------------------------------------------------------------- protocol
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.embed[ids.cpu().numpy()], dtype=np.float32))

    def encode_image(self, pixels):
        return torch.from_numpy(self._run("vision_encoder", {"pixel_values": self._np(pixels)})[0]).float()

    def encode_masks(self, crops, boxes):
        out = self._run("mask_encoder", {"crops": self._np(crops), "boxes": self._np(boxes)})[0]
        return torch.from_numpy(out).float()

    def new_cache(self) -> OrtKVCache:
        dt = self._dtypes["llm"][self._past[0]]
        return OrtKVCache(self.info.num_layers, self.info.num_kv_heads, self.info.head_dim, dtype=dt)

    def llm(self, embeds, cache: OrtKVCache | None):
        if cache is None:
            cache = self.new_cache()
            keep = False
        else:
            keep = True
        feeds = {"inputs_embeds": self._np(embeds)}
        feeds.update(zip(self._past, cache.arrays))
        out = self._run("llm", feeds)
        if keep:
            cache.arrays = out[1:]
        return torch.from_numpy(out[0]).float()

    def seg_head(self, hidden):
        return torch.from_numpy(self._run("seg_head", {"hidden": self._np(hidden)})[0])

    def mask_backbone(self, image):
        return [torch.from_numpy(a) for a in self._run("mask_backbone", {"image": self._np(image)})]

    def mask_decode(self, features, cond):
        feeds = {f"features.{i}": f.numpy() for i, f in enumerate(features)}
        feeds["conditioning"] = self._np(cond)
        names = [t.name for t in self.manifest.graphs["mask_decoder"].outputs]
        return {n: torch.from_numpy(a) for n, a in zip(names, self._run("mask_decoder", feeds))}

    def memory_bytes(self):
        return None

    def describe(self) -> str:
        return json.dumps({"folder": str(self.folder), "precision": self.precision,
                           "providers": {k: s.get_providers()[0] for k, s in self.sessions.items()}})
