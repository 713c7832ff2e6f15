"""export/weight_quant.py on weights with more than one consumer: a weight two MatMuls share is quantized once for
both; a weight another op reads too stays fp32 (quantizing it in place would leave that op without its input)."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from segllm_edge.export.weight_quant import quantize_weight_matmuls

K, N = 64, 32
W = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32)
X = np.random.default_rng(4).standard_normal((2, K)).astype(np.float32)


def _model(second: str):
    """y1 = x @ W and, reading W too, y2 = relu(x) @ W (``second="matmul"``) or y2 = transpose(W)."""
    x = ir.Value(name="x", shape=ir.Shape([2, K]), type=ir.TensorType(ir.DataType.FLOAT))
    lazy = ir.LazyTensor(lambda: ir.Tensor(W, name="W"), dtype=ir.DataType.FLOAT, shape=ir.Shape([K, N]), name="W")
    w = ir.Value(name="W", shape=ir.Shape([K, N]), type=ir.TensorType(ir.DataType.FLOAT), const_value=lazy)
    m1 = ir.Node("", "MatMul", [x, w], num_outputs=1, name="m1")
    if second == "matmul":
        relu = ir.Node("", "Relu", [x], num_outputs=1, name="relu")
        nodes = [m1, relu, ir.Node("", "MatMul", [relu.outputs[0], w], num_outputs=1, name="m2")]
    else:
        nodes = [m1, ir.Node("", "Transpose", [w], num_outputs=1, name="t")]
    outs = [ir.Node("", "Identity", [n.outputs[0]], num_outputs=1, name=f"out{i}")
            for i, n in enumerate((m1, nodes[-1]))]
    nodes += outs   # the MatMuls' outputs are not graph outputs, as in the exported llm graph
    y1, y2 = (o.outputs[0] for o in outs)
    y1.name, y2.name = "y1", "y2"
    for y, shape in ((y1, [2, N]), (y2, [2, N] if second == "matmul" else [N, K])):
        y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
    graph = ir.Graph([x], [y1, y2], nodes=nodes, opset_imports={"": 18}, name="g")
    graph.register_initializer(w)
    return ir.Model(graph, ir_version=10)


def _run(model, tmp_path):
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    onnx.checker.check_model(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_a_weight_two_matmuls_share_is_quantized_once_for_both(precision, tmp_path):
    model = _model("matmul")
    assert quantize_weight_matmuls(model.graph, precision) == 2
    ops = [n.op_type for n in model.graph]
    assert "MatMul" not in ops and ops.count("MatMulNBits" if precision == "int4" else "DynamicQuantizeMatMul") == 2
    assert "W" not in model.graph.initializers and len(model.graph.initializers) == (2 if precision == "int4" else 3)
    y1, y2 = _run(model, tmp_path)
    scale = np.abs(X @ W).max()
    assert np.abs(y1 - X @ W).max() < 0.1 * scale
    assert np.abs(y2 - np.maximum(X, 0) @ W).max() < 0.1 * scale


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_a_weight_another_op_reads_stays_fp32(precision, tmp_path):
    model = _model("transpose")
    assert quantize_weight_matmuls(model.graph, precision) == 0
    y1, y2 = _run(model, tmp_path)
    np.testing.assert_allclose(y1, X @ W, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y2, W.T)
