"""OpenVINO backend and the CPU path choice of ``load(export)``: the default path runs the golden conversation
like the research code; a reduced precision is a default only with a passing accuracy guard for this CPU."""
import json

import pytest

import segllm_edge
from conftest import GOLDEN_QUESTIONS
from segllm_edge.runtime import cpu_paths as C

pytest.importorskip("openvino")


def _linked_copy(export, tmp_path):
    """The shared export, file by file as symlinks, so a test can add its own cpu_guard.json (the export's own
    guard record, if any, is left out: writing through its link would change the shared export)."""
    out = tmp_path / "export"
    out.mkdir()
    for f in export.iterdir():
        if f.name != C.GUARD_FILE:
            (out / f.name).symlink_to(f.resolve())
    return out


def test_default_cpu_path_is_openvino_fp32_and_matches_research_code(golden_export, golden_image, golden_rounds):
    from test_fidelity import iou

    model = segllm_edge.load(golden_export)              # no options: the fastest exact/guarded path
    assert model.backend.name == "openvino"
    assert "path=openvino-fp32" in repr(model) and "precision=fp32" in repr(model)
    engines = json.loads(model.backend.describe())["engines"]
    assert engines["mask_decoder"] == "OpenVINO CPU f32" and engines["llm"] == "OpenVINO CPU f32"
    s = model.session(golden_image)
    for r, q in enumerate(GOLDEN_QUESTIONS, 1):
        res = s.ask(q)
        assert iou(res.model_mask, golden_rounds[r]["final_mask"]) >= 0.99
        assert res.query_index == int(golden_rounds[r]["selected_fg_query_id_last"])


def test_reduced_precision_is_default_only_with_a_passing_guard(golden_export, tmp_path):
    export = _linked_copy(golden_export, tmp_path)
    if C.OV_BF16 not in C.available_cpu_paths(export):
        pytest.skip("this CPU has no bf16")
    assert C.default_cpu_path(export) == C.OV_FP32
    record = {"mask_iou_per_round": [1.0, 0.995, 0.992], "worst": 0.992, "passed": True, "cpu": C.cpu_name()}
    (export / C.GUARD_FILE).write_text(json.dumps({"paths": {"openvino-bf16": record}}))
    assert C.default_cpu_path(export) == C.OV_BF16
    (export / C.GUARD_FILE).write_text(json.dumps({"paths": {"openvino-bf16": {**record, "cpu": "another CPU"}}}))
    assert C.default_cpu_path(export) == C.OV_FP32            # a guard from another CPU model does not count
    (export / C.GUARD_FILE).write_text(json.dumps({"paths": {"openvino-bf16": {**record, "passed": False}}}))
    assert C.default_cpu_path(export) == C.OV_FP32


def test_accuracy_guard_records_per_round_iou(golden_export, tmp_path):
    export = _linked_copy(golden_export, tmp_path)
    if C.OV_BF16 not in C.available_cpu_paths(export):
        pytest.skip("this CPU has no bf16")
    rep = C.accuracy_guard(export, paths=[C.OV_BF16], questions=GOLDEN_QUESTIONS[:1])
    rec = rep["paths"]["openvino-bf16"]
    assert len(rec["mask_iou_per_round"]) == 1 and 0.0 <= rec["worst"] <= 1.0
    assert rec["passed"] == (rec["worst"] >= C.GUARD_MIN_IOU) and rec["cpu"] == C.cpu_name()
    assert json.loads((export / C.GUARD_FILE).read_text())["paths"]["openvino-bf16"] == rec
    assert C.guard_passed(export, C.OV_BF16) == rec["passed"]


def test_openvino_errors_are_clear(golden_export):
    for bad in ("int3", ["bf16"], None):     # a bad option value: ConfigError naming it (a list is no TypeError)
        with pytest.raises(segllm_edge.ConfigError, match="unknown hipie_precision .* use one of fp32, bf16"):
            segllm_edge.load(golden_export, backend="openvino", hipie_precision=bad)
    with pytest.raises(segllm_edge.BackendError, match="CPU only"):
        segllm_edge.load(golden_export, backend="openvino", device="cuda")


def test_hipie_int8_quantizes_only_the_feed_forward(golden_export, tmp_path):
    import onnx

    from segllm_edge.export.hipie_quant import ffn_matmuls, int8_path, quantize_hipie_int8

    export = _linked_copy(golden_export, tmp_path)
    assert C.ORT_INT8 not in C.available_cpu_paths(export)       # no INT8 graph written yet
    fp32 = onnx.load(str(export / "mask_decoder.onnx"), load_external_data=False)
    assert len(ffn_matmuls(fp32)) == 24           # 6 encoder + 6 decoder layers x (256->2048, 2048->256)
    out = quantize_hipie_int8(export / "mask_decoder.onnx")
    assert out == int8_path(export / "mask_decoder.onnx") and out.name == "mask_decoder.int8.onnx"
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 24
    assert ffn_matmuls(q) == [] and ops.count("GridSample") == sum(n.op_type == "GridSample" for n in fp32.graph.node)
    assert ops.count("MatMul") >= sum(n.op_type == "MatMul" for n in fp32.graph.node) - 24   # the rest stays fp32
    assert C.ORT_INT8 in C.available_cpu_paths(export)
    assert C.default_cpu_path(export) == C.OV_FP32               # not a default without a passing guard
    model = segllm_edge.load(export, backend="onnxruntime", hipie_int8=True)
    assert model.backend.precision == "fp32+hipie-int8" and "precision=fp32+hipie-int8" in repr(model)


def test_bf16_ffn_puts_only_the_feed_forward_matmuls_in_bf16(golden_export):
    import openvino as ov

    from segllm_edge.runtime.openvino_mixed import FFN_WEIGHT_SHAPES, read_ffn_bf16

    if C.OV_BF16_FFN not in C.available_cpu_paths(golden_export):
        pytest.skip("this CPU has no bf16")
    model = read_ffn_bf16(ov.Core(), golden_export / "mask_decoder.onnx")
    bf16 = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Convert", "Constant")
            and any(op.get_output_element_type(i) == ov.Type.bf16 for i in range(op.get_output_size()))]
    assert len(bf16) == 24 and {op.get_type_name() for op in bf16} == {"MatMul"}   # 12 layers x 2
    weights = {tuple(op.input_value(1).get_partial_shape().to_shape()) for op in bf16}
    assert weights <= FFN_WEIGHT_SHAPES, weights
    f32_matmuls = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
                   and op.get_output_element_type(0) == ov.Type.f32]
    assert f32_matmuls                                                   # sampling offsets, projections, heads


def test_bf16_ffn_path_loads_and_is_not_a_default_without_its_guard(golden_export, tmp_path):
    export = _linked_copy(golden_export, tmp_path)
    if C.OV_BF16_FFN not in C.available_cpu_paths(export):
        pytest.skip("this CPU has no bf16")
    _loads_ffn_path_and_is_default_only_with_its_guard(export, C.OV_BF16_FFN, "bf16")


def _loads_ffn_path_and_is_default_only_with_its_guard(export, path, ffn: str):
    model = path.load(export)
    engines = json.loads(model.backend.describe())["engines"]
    assert engines["mask_decoder"] == f"OpenVINO CPU f32+ffn-{ffn}" and engines["mask_backbone"] == "OpenVINO CPU f32"
    assert f"precision=fp32+hipie-{ffn}-ffn" in repr(model)
    assert C.default_cpu_path(export) == C.OV_FP32
    record = {"mask_iou_per_round": [1.0, 0.995], "worst": 0.995, "passed": True, "cpu": C.cpu_name()}
    (export / C.GUARD_FILE).write_text(json.dumps({"paths": {path.name: record}}))
    assert C.default_cpu_path(export) == path


def test_guard_counts_a_round_that_cannot_run_as_failed():
    """A reduced precision whose round-1 mask comes out empty cannot answer a question referring to it: the
    guard records IoU 0 for that round and the rest (and does not crash)."""
    import numpy as np

    from segllm_edge.errors import RoundReferenceError

    class Conversation:               # stands in for a session whose reduced-precision round 1 came out empty
        def __init__(self):
            self.rounds = 0

        def ask(self, question):
            self.rounds += 1
            if "[REF:" in question:
                raise RoundReferenceError("round 1 produced an empty mask; there is nothing to refer to")
            return type("R", (), {"model_mask": np.zeros((4, 4), bool)})()

    class Model:
        def session(self, image):
            return Conversation()

    got = C.conversation_masks(Model(), None, GOLDEN_QUESTIONS, strict=False)
    assert got[0].shape == (4, 4) and got[1:] == [None, None]
    with pytest.raises(RoundReferenceError):
        C.conversation_masks(Model(), None, GOLDEN_QUESTIONS)


def test_side_by_side_bench_reports_a_round_a_path_cannot_run():
    """bench_cpu_paths / `segllm-edge bench`: a reduced path whose earlier mask came out empty fails a later round
    that refers to it; the comparison records the failure (IoU 0, no time) and measures the other paths."""
    import numpy as np

    from segllm_edge.cpu_bench import compare_paths, format_paths
    from segllm_edge.errors import RoundReferenceError

    class Conversation:
        def __init__(self, fail):
            self.fail = fail

        def ask(self, question):
            if self.fail and "[REF:" in question:
                raise RoundReferenceError("round 1 produced an empty mask; there is nothing to refer to")
            return type("R", (), {"model_mask": np.ones((4, 4), bool), "timings": {"mask_decoder": 1.0}})()

        def close(self):
            pass

    class Model:
        def __init__(self, fail=False):
            self.fail = fail

        def session(self, image):
            return Conversation(self.fail)

    rep = compare_paths({"exact": Model(), "reduced": Model(fail=True)}, None, GOLDEN_QUESTIONS, repeats=2)
    exact, reduced = rep["paths"]
    assert exact["errors"] == [None] * 3 and all(len(r) == 2 for r in exact["runs_ms"])
    assert reduced["errors"][0] is None and "empty mask" in reduced["errors"][1]
    assert reduced["iou_vs_exact"][0] == 1.0 and reduced["iou_vs_exact"][1:] == [0.0, 0.0]
    assert np.isnan(reduced["median_ms_per_round"][1]) and "nan" in format_paths(rep)


def test_int8_weights_keep_one_scale_per_output_channel():
    """A MatMul whose weight columns differ by orders of magnitude stays accurate in every output column
    (one scale per output channel; a scale per input row would wipe out the small columns)."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from segllm_edge.runtime.openvino_mixed import matmuls_to_int8_weights

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 8)) * 10.0 ** np.arange(-3, 5)).astype(np.float32)    # K=64, N=8
    x = rng.standard_normal((16, 64)).astype(np.float32)
    for transpose_b in (False, True):
        p = ops.parameter([16, 64], ov.Type.f32)
        mm = ops.matmul(p, ops.constant(w.T.copy() if transpose_b else w), False, transpose_b)
        model = ov.Model([mm], [p])
        assert matmuls_to_int8_weights(model, [mm]) == 1
        assert any(op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8
                   for op in model.get_ordered_ops())
        got = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})(x)[0]
        want = x @ w
        err = np.abs(got - want).max(0) / np.abs(want).max(0)
        assert err.max() < 0.02, (transpose_b, err)


def test_int8_ffn_path_quantizes_only_the_feed_forward_and_is_not_a_default_without_its_guard(golden_export,
                                                                                              tmp_path):
    import openvino as ov

    from segllm_edge.runtime.openvino_mixed import FFN_WEIGHT_SHAPES, read_ffn

    export = _linked_copy(golden_export, tmp_path)
    if C.OV_INT8_FFN not in C.available_cpu_paths(export):
        pytest.skip("this CPU has no INT8 kernels")
    model = read_ffn(ov.Core(), export / "mask_decoder.onnx", "int8")
    int8 = [op for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]
    assert len(int8) == 24 and {tuple(op.get_output_shape(0)) for op in int8} <= FFN_WEIGHT_SHAPES
    f32_weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
                   and op.input_value(1).get_node().get_type_name() == "Constant"]
    assert f32_weights                                        # sampling offsets, projections, heads stay f32
    _loads_ffn_path_and_is_default_only_with_its_guard(export, C.OV_INT8_FFN, "int8")


def test_the_server_round_loop_with_openvino_graph_models_gives_the_onnxruntime_masks(golden_export, golden_image):
    """``--graph-engine openvino``: the BLS round loop (in process: the model classes Triton runs, minus the
    transport) with the stateless graph models on OpenVINO gives the masks of ``load(backend="onnxruntime")``
    up to a few boundary pixels."""
    import numpy as np

    from segllm_edge.serving.bls import ConversationService, InProcessCaller, TritonBlsBackend
    from segllm_edge.serving.pystub import RequestContext
    from segllm_edge.serving.wire import decode_mask_png
    from test_fidelity import iou

    caller = InProcessCaller(golden_export, graph_engine="openvino")
    assert caller.models["mask_decoder"].session.get_providers() == ["OpenVINO CPU f32"]
    reference = segllm_edge.load(golden_export, backend="onnxruntime").session(golden_image)
    service = ConversationService(lambda: TritonBlsBackend(golden_export, caller))
    token = None
    for i, q in enumerate(GOLDEN_QUESTIONS):
        inputs = {"question": np.array([q.encode()], dtype=np.object_),
                  "end": np.array([i == len(GOLDEN_QUESTIONS) - 1])}
        if token is None:
            inputs.update(start=np.array([True]), image=np.array([golden_image.read_bytes()], dtype=np.object_))
        else:
            inputs["conversation"] = np.array([token], dtype=np.object_)
        got = service.handle(inputs, RequestContext())
        token = got["conversation"].reshape(-1)[0]
        want = reference.ask(q).mask
        assert iou(decode_mask_png(got["mask"].reshape(-1)[0]), want) >= 0.999, f"round {i + 1}"


def test_a_graph_engine_that_is_not_there_is_refused_by_name():
    from segllm_edge.errors import ConfigError
    from segllm_edge.serving.models import check_graph_engine

    assert check_graph_engine("openvino") == "openvino"
    with pytest.raises(ConfigError, match="unknown graph engine 'openvin'.*onnxruntime, openvino"):
        check_graph_engine("openvin")
