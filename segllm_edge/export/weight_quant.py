"""Weight-only quantization of a streamed graph's MatMuls, one weight at a time (:mod:`.streamed`).

onnxruntime's quantizers (``quantize_dynamic``, ``MatMulNBitsQuantizer``) load the whole fp32 graph; here each
``MatMul(x, W)`` whose ``W`` is a lazily read initializer is rewritten in the graph first, and ``W`` is quantized
only when ``onnx_ir.save`` writes the quantized tensors (the fp32 weight lives for one tensor's time).

* ``int4``: ``MatMulNBits`` (com.microsoft), symmetric, blocks of 32 along K, the packing and scales computed by
  onnxruntime's own kernel (``DefaultWeightOnlyQuantizer.qbits_block_quant``), as ``MatMulNBitsQuantizer`` does.
* ``int8``: ``DynamicQuantizeMatMul`` (com.microsoft; what onnxruntime fuses ``quantize_dynamic``'s output
  into): per-tensor symmetric INT8 weights (``quantize_dynamic``'s QInt8 default), activations quantized at run time.
"""
from __future__ import annotations

import numpy as np

INT4_BLOCK = 32
MS_DOMAIN = "com.microsoft"


class _Memo:
    """The last quantized weight: the packed data and its scales are two initializers from one computation."""

    def __init__(self, fn):
        self.fn, self.key, self.value = fn, None, None

    def __call__(self, key, lazy):
        if self.key != key:
            self.key, self.value = None, None  # drop the previous weight first
            self.value = self.fn(lazy.numpy().astype(np.float32))
            self.key = key
        return self.value


def _int4(w: np.ndarray):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    q = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True))
    packed, scales, _ = q.qbits_block_quant(np.ascontiguousarray(w))
    return packed, scales.reshape(-1).astype(np.float32)


def _int8(w: np.ndarray):
    rmax = float(np.abs(w).max()) if w.size else 0.0
    scale = np.float32(rmax / 127.0 if rmax > 0 else 1.0)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.array(scale, dtype=np.float32), np.array(0, dtype=np.int8)


def _is_plain_matmul(node) -> bool:
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx")


def quantizable_weight(value) -> bool:
    """A 2-D fp32 lazily read initializer whose every use is the weight (input 1) of a plain MatMul, and which is
    not a graph output: what :func:`quantize_weight_matmuls` may replace. A weight another op reads too (a
    Gather of tied embeddings, a Transpose, an Add) stays fp32 for all of them."""
    import onnx_ir as ir

    if value is None or not value.is_initializer() or value.is_graph_output() \
            or not isinstance(value.const_value, ir.LazyTensor) \
            or len(value.const_value.shape) != 2 or value.const_value.dtype != ir.DataType.FLOAT:
        return False
    uses = value.uses()
    return bool(uses) and all(_is_plain_matmul(u.node) and u.idx == 1 for u in uses)


def quantize_weight_matmuls(graph, precision: str) -> int:
    """Rewrite every ``MatMul`` whose weight passes :func:`quantizable_weight` to ``precision`` (int8 or int4); a
    weight shared by several MatMuls is quantized once and its quantized initializers are shared by all of them.
    Returns how many MatMuls were rewritten."""
    import onnx_ir as ir

    memo = _Memo(_int4 if precision == "int4" else _int8)
    quantized: dict[str, list] = {}   # weight name → its quantized initializers (one set per weight)
    done = 0
    for node in list(graph):
        if not _is_plain_matmul(node):
            continue
        w = node.inputs[1]
        if w is None or (w.name not in quantized and not quantizable_weight(w)):
            continue
        key = w.name
        K, N = (int(d) for d in w.const_value.shape)
        if key not in quantized:
            quantized[key] = _quantized_values(graph, w.const_value, key, precision, memo, K, N)
        if precision == "int4":
            op, attrs = "MatMulNBits", {"K": K, "N": N, "bits": 4, "block_size": INT4_BLOCK}
        else:
            op, attrs = "DynamicQuantizeMatMul", {}
        new = ir.Node(MS_DOMAIN, op, [node.inputs[0], *quantized[key]],
                      attributes=[ir.Attr(k, ir.AttributeType.INT, v) for k, v in attrs.items()],
                      num_outputs=1, name=(node.name or key) + f"_{precision}")
        graph.insert_before(node, new)
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0], replace_graph_outputs=True)
        out_name = node.outputs[0].name
        graph.remove(node, safe=True)
        new.outputs[0].name = out_name
        if not w.uses():   # its last MatMul is rewritten: the fp32 weight goes
            graph.initializers.pop(key)
        done += 1
    if done:
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return done


def _quantized_values(graph, lazy, key: str, precision: str, memo: _Memo, K: int, N: int) -> list:
    """The quantized initializers of weight ``key`` (registered in ``graph``), computed when they are written."""
    import onnx_ir as ir

    def part(i, dtype, shape):
        return ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(memo(key, lazy)[i]), name=f"{key}.q{i}"),
                             dtype=dtype, shape=ir.Shape(shape), name=f"{key}.q{i}")

    if precision == "int4":
        blocks = (K + INT4_BLOCK - 1) // INT4_BLOCK
        parts = [part(0, ir.DataType.UINT8, (N, blocks, INT4_BLOCK // 2)), part(1, ir.DataType.FLOAT, (N * blocks,))]
        names = [f"{key}_Q4", f"{key}_scales"]
    else:
        parts = [part(0, ir.DataType.INT8, (K, N)), part(1, ir.DataType.FLOAT, ()), part(2, ir.DataType.INT8, ())]
        names = [f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"]
    values = [ir.Value(name=n, shape=p.shape, type=ir.TensorType(p.dtype), const_value=p)
              for n, p in zip(names, parts)]
    for v in values:
        graph.register_initializer(v)
    return values
