"""INT8 for the HIPIE mask decoder on CPU: dynamic INT8 (onnxruntime ``quantize_dynamic``) of the feed-forward
MatMuls only (6 encoder + 6 decoder layers, 256<->2048): the encoder's are ~80% of the graph's multiply-adds
(21760 tokens each).

Everything position-sensitive stays fp32: the sampling-offset and attention-weight projections, value/output
projections, GridSample, the fusion block, the query decoder and the mask head. The quantized graph is written
next to the fp32 one as ``mask_decoder.int8.onnx`` (the fp32 graph stays: exact fp32 remains available), and is
used only through :mod:`segllm_edge.runtime.cpu_paths` behind the accuracy guard.
"""
from __future__ import annotations

from pathlib import Path

from ..contracts.hipie_int8 import int8_path

FFN_SHAPES = ((256, 2048), (2048, 256))


def ffn_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose weight is a feed-forward initializer (256x2048 or 2048x256)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and inits.get(n.input[1]) in FFN_SHAPES]


def quantize_hipie_int8(fp32_graph: Path, out: Path | None = None) -> Path:
    """Write the INT8-FFN variant of ``mask_decoder.onnx``; returns its path."""
    import onnx

    from .quantize import _require_onnxruntime

    _require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_graph = Path(fp32_graph)
    out = Path(out) if out is not None else int8_path(fp32_graph)
    nodes = ffn_matmuls(onnx.load(str(fp32_graph), load_external_data=False))
    if not nodes:
        from ..errors import CheckpointError

        raise CheckpointError(f"{fp32_graph} has no feed-forward MatMuls to quantize: is it a HIPIE mask decoder?")
    quantize_dynamic(str(fp32_graph), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=nodes)
    return out
