"""Mixed precision for OpenVINO's CPU plugin: chosen MatMuls of a graph run in bf16 or INT8, every other node in f32.

OpenVINO's ``INFERENCE_PRECISION_HINT=bf16`` moves every float node to bf16, and its per-node "keep f32" marks
(rt_info) do not survive the CPU plugin's MatMul -> FullyConnected conversion. So the graph is edited instead:
each chosen MatMul gets bf16 ``Convert`` nodes on its two inputs and a ``Convert`` back to f32 on its output,
and the model is compiled with the ``f32`` hint — the CPU plugin then runs exactly those MatMuls in bf16
(avx512_bf16 / AMX) and everything else in f32. Nothing is written next to the export.

:func:`hipie_ffn_matmuls` picks the HIPIE feed-forward MatMuls (256->2048->256, 6 encoder + 6 decoder layers;
the encoder's run over all 21,760 tokens and are ~80% of the mask decoder's multiply-adds). Sampling offsets,
attention weights, value/output projections, GridSample, the fusion block, the query decoder's attention and
the mask head stay f32.

INT8 (:func:`matmuls_to_int8_weights`): each chosen MatMul's constant weight is stored as int8 (symmetric, one
scale per output channel) behind a ``Convert`` + ``Multiply``; the CPU plugin fuses that into a FullyConnected
with compressed weights and quantizes its activations at run time, per group of ``DYNAMIC_QUANTIZATION_GROUP_SIZE``
input channels (int8 VNNI kernels) — no calibration data, nothing written next to the export.
"""
from __future__ import annotations

#: weight shapes of the feed-forward MatMuls of the HIPIE encoder/decoder layers (d_model 256, d_ffn 2048)
FFN_WEIGHT_SHAPES = frozenset({(256, 2048), (2048, 256)})
_PASS_THROUGH = ("Convert", "Transpose", "Reshape")
#: activation group size of the INT8 path's dynamic quantization (OpenVINO's CPU default, set explicitly)
INT8_DYNAMIC_GROUP_SIZE = 32


def _const_shape(output):
    node = output.get_node()
    while node.get_type_name() in _PASS_THROUGH and node.get_input_size():
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return tuple(node.get_output_partial_shape(0).to_shape())


def hipie_ffn_matmuls(model) -> list:
    """The MatMul nodes of ``model`` whose weight is a feed-forward constant (256x2048 or 2048x256)."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and any(_const_shape(op.input_value(i)) in FFN_WEIGHT_SHAPES for i in range(2))]


def matmuls_to_bf16(model, matmuls) -> int:
    """Rewrite each MatMul of ``matmuls`` (nodes of ``model``) as bf16 between Converts; returns how many."""
    import openvino as ov
    from openvino import opset13 as ops

    for op in matmuls:
        attrs = op.get_attributes()
        mm = ops.matmul(ops.convert(op.input_value(0), ov.Type.bf16), ops.convert(op.input_value(1), ov.Type.bf16),
                        attrs["transpose_a"], attrs["transpose_b"])
        mm.set_friendly_name(op.get_friendly_name() + "/bf16")
        back = ops.convert(mm, op.get_output_element_type(0))
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
    model.validate_nodes_and_infer_types()
    return len(matmuls)


def matmuls_to_int8_weights(model, matmuls) -> int:
    """Give each MatMul of ``matmuls`` an int8 weight (per output channel scale) behind Convert + Multiply;
    returns how many. Only a MatMul whose weight is a direct Constant input is rewritten (one behind a Convert,
    Transpose or Reshape stays f32: its axes are not the Constant's)."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    done = 0
    for op in matmuls:
        idx = next((i for i in range(2) if op.input_value(i).get_node().get_type_name() == "Constant"), None)
        if idx is None:
            continue
        done += 1
        node = op.input_value(idx).get_node()
        w = node.get_data().astype(np.float32)
        transposed = op.get_attributes()["transpose_b" if idx == 1 else "transpose_a"]
        # the contracted (input) axis of a 2-d weight: rows of W (K, N), columns of a transposed one (N, K)
        k_axis = (w.ndim - 1 if transposed else w.ndim - 2) if idx == 1 else (w.ndim - 2 if transposed else w.ndim - 1)
        scale = np.maximum(np.abs(w).max(axis=k_axis, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        deq = ops.multiply(ops.convert(ops.constant(q), ov.Type.f32), ops.constant(scale.astype(np.float32)))
        deq.set_friendly_name(node.get_friendly_name() + "/int8")
        op.input(idx).replace_source_output(deq.output(0))
    model.validate_nodes_and_infer_types()
    return done


FFN_REWRITES = {"bf16": matmuls_to_bf16, "int8": matmuls_to_int8_weights}


def read_ffn(core, path, precision: str):
    """``path`` read by OpenVINO with its HIPIE feed-forward MatMuls in ``precision`` ("bf16" or "int8"; compile
    it with the f32 hint)."""
    from ..errors import CheckpointError

    model = core.read_model(str(path))
    if not FFN_REWRITES[precision](model, hipie_ffn_matmuls(model)):
        raise CheckpointError(f"{path} has no feed-forward MatMuls (256x2048 / 2048x256 weights): "
                              "is it a HIPIE mask decoder?")
    return model


def read_ffn_bf16(core, path):
    """``path`` read by OpenVINO with its HIPIE feed-forward MatMuls in bf16 (compile it with the f32 hint)."""
    return read_ffn(core, path, "bf16")
