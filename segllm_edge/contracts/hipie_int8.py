"""Where an export keeps its INT8-FFN HIPIE mask decoder (written by segllm_edge.export.hipie_quant, read by the
onnxruntime backend and the CPU path choice): next to the fp32 graph, which stays."""
from __future__ import annotations

from pathlib import Path

INT8_SUFFIX = ".int8.onnx"


def int8_path(fp32_graph) -> Path:
    p = Path(fp32_graph)
    return p.with_name(p.name[: -len(".onnx")] + INT8_SUFFIX)
