"""The one manifest of graph names, inputs, outputs, dtypes and dynamic axes.

The exporter writes graphs from it, the onnxruntime backend feeds them from it, the Triton
repository generator and the TensorRT builder read it. No other module lists graph I/O.
String dimensions are named dynamic axes; integers are fixed.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
HIPIE_LEVELS = ((128, 128), (64, 64), (32, 32), (16, 16))  # at the fixed 1024x1024 input
HIPIE_QUERIES = 110
SEG_TOKENS, SEG_DIM = 8, 768

#: how the llm graph holds its KV cache (``Manifest.kv_layout``; an export written before it existed is "concat"):
#: "concat": ``present.* = Concat(past, new)`` -- each round's present is a new tensor holding the whole past;
#: "inplace": ``past_key_values.*`` are buffers of ``capacity >= past_length + seq`` tokens of which the first
#: ``past_length`` are valid (the extra input :data:`PAST_LENGTH`), ``present.*`` are the same buffers with the
#: round's tokens written after them (onnxruntime's ``com.microsoft.GroupQueryAttention``, past and present bound
#: to one buffer: :mod:`segllm_edge.runtime.kv_buffer`); see :mod:`segllm_edge.export.kv_inplace`.
KV_CONCAT, KV_INPLACE = "concat", "inplace"
KV_LAYOUTS = (KV_CONCAT, KV_INPLACE)
PAST_LENGTH = "past_length"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                          # numpy dtype name: float32, float16, int64, ...
    shape: tuple                        # ints (fixed) and strs (named dynamic axes)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass
class Manifest:
    model: dict                         # ModelInfo fields
    precision: str = "fp32"
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    arrays: dict[str, str] = field(default_factory=dict)   # name → .npy file (e.g. the token embedding table)
    tokenizer_dir: str = "tokenizer"
    format_version: int = FORMAT_VERSION
    version: str = ""                   # segllm-edge version that wrote it
    extra: dict = field(default_factory=dict)  # exporter notes (exporter path per graph, quantization, ...)
    kv_layout: str = KV_CONCAT          # one of KV_LAYOUTS: how the llm graph holds its KV cache

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        d = asdict(self)
        d["graphs"] = {k: asdict(g) for k, g in self.graphs.items()}
        return d

    def save(self, folder: str | Path) -> Path:
        p = Path(folder) / MANIFEST_NAME
        # a new file renamed over the old one: never written through a hard link (a Triton repository links
        # the export's manifest) and never half-written
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        p = Path(folder) / MANIFEST_NAME
        if not p.is_file():
            raise CheckpointError(f"{folder} is not a segllm-edge export: {MANIFEST_NAME} is missing")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p} is corrupt: {exc}") from None
        fv = d.get("format_version")
        if fv != FORMAT_VERSION:
            raise CheckpointError(f"{p} has manifest format version {fv!r}, this segllm-edge reads version "
                                  f"{FORMAT_VERSION}: re-export with `segllm-edge export`")
        try:
            graphs = {k: GraphSpec(g["name"], g["file"],
                                   tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["inputs"]),
                                   tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["outputs"]),
                                   g.get("doc", "")) for k, g in d["graphs"].items()}
            return cls(model=d["model"], precision=d["precision"], graphs=graphs, arrays=d.get("arrays", {}),
                       tokenizer_dir=d.get("tokenizer_dir", "tokenizer"), format_version=fv,
                       version=d.get("version", ""), extra=d.get("extra", {}),
                       kv_layout=_kv_layout(d.get("kv_layout", KV_CONCAT), p))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{p} is missing a field ({exc}); re-export") from None

    def check_files(self, folder: str | Path) -> None:
        folder = Path(folder)
        missing = [g.file for g in self.graphs.values() if not (folder / g.file).is_file()]
        missing += [f for f in self.arrays.values() if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"export {folder} is incomplete: missing {', '.join(missing)}")

    def axes(self) -> set[str]:
        return {d for g in self.graphs.values() for t in (*g.inputs, *g.outputs) for d in t.shape if isinstance(d, str)}


def _kv_layout(layout, path) -> str:
    if layout not in KV_LAYOUTS:
        raise CheckpointError(f"{path} has kv_layout {layout!r}, this segllm-edge reads {', '.join(KV_LAYOUTS)}: "
                              "upgrade segllm-edge or re-export")
    return layout


def _t(name, shape, dtype="float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def llm_spec(info, f: str = "float32", kv_layout: str = KV_CONCAT, kv_dtype: str | None = None) -> GraphSpec:
    """The llm graph's I/O for ``kv_layout`` (KV tensors in ``kv_dtype``, default ``f``)."""
    H, kvh, hd = info.hidden_size, info.num_kv_heads, info.head_dim
    kv = kv_dtype or f
    past, present = kv_names(info.num_layers)
    if kv_layout == KV_INPLACE:
        return GraphSpec("llm", "llm.onnx",
                         (_t("inputs_embeds", ("batch", "seq", H), f),
                          *[_t(n, ("batch", kvh, "capacity", hd), kv) for n in past], _t(PAST_LENGTH, (1,), "int64")),
                         (_t("hidden_states", ("batch", "seq", H), f),
                          *[_t(n, ("batch", kvh, "capacity", hd), kv) for n in present]),
                         "Llama decoder on inputs_embeds with a KV cache held in buffers of `capacity` tokens, the first "
                         "`past_length` valid (>= past_length + seq: the caller grows them); positions = past_length + "
                         "arange(seq); present.* are the same buffers with the new tokens written at past_length "
                         "(bind each present to its past). One graph for prefill and cached steps.")
    if kv_layout != KV_CONCAT:
        raise CheckpointError(f"unknown kv_layout {kv_layout!r}: one of {', '.join(KV_LAYOUTS)}")
    return GraphSpec("llm", "llm.onnx",
                     (_t("inputs_embeds", ("batch", "seq", H), f),
                      *[_t(n, ("batch", kvh, "past", hd), kv) for n in past]),
                     (_t("hidden_states", ("batch", "seq", H), f),
                      *[_t(n, ("batch", kvh, "total", hd), kv) for n in present]),
                     "Llama decoder on inputs_embeds with a KV cache (past may be empty); positions = past + arange(seq); "
                     "final-norm hidden states for every new token. One graph for prefill and cached steps.")


def build_manifest(info, precision: str = "fp32", float_dtype: str = "float32") -> Manifest:
    """The graphs of a SegLLM export for a model described by ``info`` (a ModelInfo)."""
    H = info.hidden_size
    S = info.clip_image_size
    P = info.image_tokens
    f = float_dtype
    feats = [_t(f"features.{i}", (1, 256, h, w)) for i, (h, w) in enumerate(HIPIE_LEVELS)]
    graphs = [
        GraphSpec("vision_encoder", "vision_encoder.onnx",
                  (_t("pixel_values", ("batch", 3, S, S)),), (_t("image_tokens", ("batch", P, H), f),),
                  "CLIP-preprocessed image(s) → CLIP layer -2 patch tokens through mm_projector (the 256 <video> rows)."),
        GraphSpec("mask_encoder", "mask_encoder.onnx",
                  (_t("crops", ("masks", 3, S, S)), _t("boxes", ("masks", 4))), (_t("mask_tokens", ("masks", 2, H), f),),
                  "Masked crops + [y0,x0,y1,x1]/1024 boxes → (mask token, box token) × 0.5 per referenced mask. "
                  "ONNX files cannot share initializers, so the CLIP weights are stored again (cost: one CLIP on disk)."),
        llm_spec(info, f),
        GraphSpec("seg_head", "seg_head.onnx",
                  (_t("hidden", ("n", H), f),), (_t("conditioning", ("n", SEG_TOKENS, SEG_DIM)),),
                  "segmentator_predictor: hidden state before each <seg> → 8 conditioning tokens of width 768."),
        GraphSpec("mask_backbone", "mask_backbone.onnx",
                  (_t("image", (1, 3, 1024, 1024)),), tuple(feats),
                  "HIPIE ResNet-50 + input projections on the normalised 1024² image (run once per image). fp32."),
        GraphSpec("mask_decoder", "mask_decoder.onnx",
                  (*feats, _t("conditioning", ("n", SEG_TOKENS, SEG_DIM))),
                  (_t("pred_logits", ("n", HIPIE_QUERIES, SEG_TOKENS)), _t("pred_boxes", ("n", HIPIE_QUERIES, 4)),
                   _t("pred_boxious", ("n", HIPIE_QUERIES, 1)), _t("pred_masks", ("n", HIPIE_QUERIES, 256, 256))),
                  "HIPIE fusion + deformable encoder/decoder + heads + mask head → raw outputs of every query "
                  "(10 background then 100 foreground). Selection (NMS 0.7, top-k, target class) runs outside the "
                  "graph in segllm_edge.modeling.hipie.selection. fp32."),
    ]
    from .. import __version__

    model = {k: getattr(info, k) for k in info.__dataclass_fields__}
    return Manifest(model=model, precision=precision, graphs={g.name: g for g in graphs},
                    arrays={"embed_tokens": "embed_tokens.npy"}, version=__version__)
