"""The llm graph's Q @ K^T reads the key cache in place: no per-round copy of it (export/attention_layout.py)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")


def _rank3_key_transposes(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Transpose"
               and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[0, 2, 1]])


def test_export_fuses_every_key_transpose(golden_export, tmp_path):
    manifest = json.loads((golden_export / "manifest.json").read_text())
    layers = manifest["model"]["num_layers"]
    model = onnx.load(str(golden_export / "llm.onnx"), load_external_data=False)
    assert _rank3_key_transposes(model) == 0
    assert manifest["extra"]["graphs"]["llm"]["key_transposes_fused"] == layers
    # what it is for: onnxruntime folds the transpose into the MatMul (FusedMatMul transB), no Transpose of K left
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(golden_export / "llm.onnx"), o, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    fused = [n for n in opt.graph.node if n.op_type == "FusedMatMul"
             and any(a.name == "transB" and a.i == 1 for a in n.attribute)]
    assert len(fused) == layers
    keys = {f"present.{i}.key" for i in range(layers)}
    assert not [n for n in opt.graph.node if n.op_type == "Transpose" and set(n.input) & keys]


def _sdpa_like_graph():
    """A graph with torch.onnx's rank-3 key transpose: out = (q*s) @ ((k^T)*s), k rank 4."""
    from onnx import TensorProto, helper, numpy_helper

    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["k"], ["shp"]),
        helper.make_node("Slice", ["shp", "m2", "m1"], ["d_len"]),
        helper.make_node("Slice", ["shp", "m1", "big"], ["d_dim"]),
        helper.make_node("Slice", ["shp", "small", "m2"], ["d_lead"]),
        helper.make_node("Concat", ["neg1", "d_len", "d_dim"], ["s1"], axis=0),
        helper.make_node("Reshape", ["k", "s1"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["d_lead", "d_dim", "d_len"], ["s2"], axis=0),
        helper.make_node("Reshape", ["k3t", "s2"], ["kt"]),
        helper.make_node("Mul", ["kt", "scale"], ["kts"]),
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        helper.make_node("MatMul", ["qs", "kts"], ["out"]),
    ]
    inits = [c("m2", [-2]), c("m1", [-1]), c("big", [2**63 - 1]), c("small", [-(2**63)]), c("neg1", [-1]),
             numpy_helper.from_array(np.asarray(0.3, dtype=np.float32), "scale")]
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "h", None, 8])  # noqa: E731
    g = helper.make_graph(nodes, "sdpa", [f("q"), f("k")],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "h", None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_rewrite_is_the_same_maths(tmp_path):
    from segllm_edge.export.attention_layout import rewrite_graph_file

    path = tmp_path / "g.onnx"
    onnx.save(_sdpa_like_graph(), str(path))
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 3, 5, 8), dtype=np.float32),
             "k": rng.standard_normal((1, 3, 11, 8), dtype=np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert rewrite_graph_file(path) == 1
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert _rank3_key_transposes(model) == 0 and not [n for n in model.graph.node if n.op_type == "Reshape"]
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(after, before)
    assert rewrite_graph_file(path) == 0      # idempotent: nothing left to rewrite
