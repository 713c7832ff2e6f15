"""The drift report and accuracy guard of reduced-precision exports, and the fp16 export's fp16 KV cache."""
from __future__ import annotations

import json
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from segllm_edge.errors import AccuracyGuardError
from segllm_edge.export.drift import RoundOutcome, compare_rounds, format_drift, guard
from segllm_edge.export.files import save_graph
from segllm_edge.contracts.manifest import Manifest
from segllm_edge.export.quantize import REPORT_FILE, enforce_guard

H = np.ones((4, 8), np.float32)


def _ok(mask) -> RoundOutcome:
    return RoundOutcome(mask=np.asarray(mask, bool), hidden=H, query_index=3)


def _report(rounds):
    return {"precision": "int4", "graphs": ["llm"], "rounds": rounds, "guard": guard(rounds),
            "size_bytes": {"fp32": {"llm": 4_000_000}, "int4": {"llm": 1_000_000}}}


def test_empty_masks_on_both_sides_agree():
    rounds = compare_rounds([_ok(np.zeros((4, 4)))], [_ok(np.zeros((4, 4)))], "fp16")
    assert rounds[0]["compared"] and rounds[0]["mask_iou_vs_fp32"] == 1.0
    assert rounds[0]["empty_masks"] == [True, True]
    assert guard(rounds)["passed"] is True
    assert "both masks empty" in format_drift(_report(rounds))


def test_round_neither_run_could_answer_is_not_compared_and_does_not_fail():
    err = "round 1 produced an empty mask; there is nothing to refer to"
    rounds = compare_rounds([_ok(np.zeros((4, 4))), RoundOutcome(error=err)],
                            [_ok(np.zeros((4, 4))), RoundOutcome(error=err)], "fp16")
    assert rounds[1] == {"round": 2, "compared": False, "mismatch": False,
                         "reason": f"neither run could answer it: {err}"}
    g = guard(rounds)
    assert g["passed"] is True and g["compared_rounds"] == [1]
    assert "round 2: not compared (neither run could answer it" in format_drift(_report(rounds))


def test_nothing_comparable_is_inconclusive_not_a_failure(tmp_path):
    rounds = compare_rounds([RoundOutcome(error="x")], [RoundOutcome(error="x")], "int4")
    report = _report(rounds)
    assert report["guard"]["passed"] is None
    assert "inconclusive" in format_drift(report)
    enforce_guard(report, tmp_path)  # no error


def test_a_round_only_one_precision_can_run_fails_the_guard():
    mask = np.eye(4)
    rounds = compare_rounds([_ok(mask), _ok(mask)], [_ok(mask), RoundOutcome(error="no mask")], "int4")
    assert rounds[1]["mismatch"] and rounds[1]["reason"] == "only the int4 run failed: no mask"
    g = guard(rounds)
    assert g["passed"] is False and g["mismatched_rounds"] == [2] and g["worst_mask_iou"] == 1.0


def test_low_iou_fails_the_guard_and_raises_unless_allowed(tmp_path):
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[:2], b[1:3] = 1, 1  # IoU 4/12
    report = _report(compare_rounds([_ok(a)], [_ok(b)], "int4"))
    assert report["rounds"][0]["mask_iou_vs_fp32"] == pytest.approx(1 / 3)
    assert report["guard"]["passed"] is False
    with pytest.raises(AccuracyGuardError, match=r"failed its accuracy guard.*--allow-accuracy-drop(.|\n)*worst mask IoU 0.333"):
        enforce_guard(report, tmp_path)
    enforce_guard(report, tmp_path, allow_accuracy_drop=True)


def test_external_data_gets_the_graph_file_mode(golden_export, tmp_path):
    m = onnx.load(str(golden_export / "seg_head.onnx"))
    p = tmp_path / "g.onnx"
    save_graph(m, p, external=True)
    assert stat.S_IMODE((tmp_path / "g.onnx.data").stat().st_mode) == stat.S_IMODE(p.stat().st_mode)


# ------------------------------------------------------------------ the shared fp16 export
def test_fp16_drift_report_says_what_it_compared(golden_export_fp16):
    report = json.loads((golden_export_fp16 / REPORT_FILE).read_text())
    r1, r2 = report["rounds"]
    assert r1["compared"] and r1["mask_iou_vs_fp32"] >= 0.98 and r1["same_query"]
    assert not r2["compared"] and not r2["mismatch"] and "refers to round 4" in r2["reason"]
    assert report["guard"]["passed"] is True and report["guard"]["compared_rounds"] == [1]
    assert report["probe_backends"] == {"export": "onnxruntime", "fp32": "onnxruntime"}
    assert "probe ran on export: onnxruntime, fp32: onnxruntime" in format_drift(report)


def test_bf16_probe_runs_its_fp32_reference_on_onnxruntime():
    """The export CLI's bf16 probe: the export on OpenVINO, the fp32 reference on onnxruntime (half the memory for
    an fp32 graph); the drift report loads each side with its own loader."""
    pytest.importorskip("openvino")   # without it the bf16 probe is the onnxruntime one (and says it cannot run)
    import segllm_edge
    from segllm_edge.export.cli import _probe

    probe = _probe(segllm_edge, "bf16")
    assert probe.backends == {"export": "openvino", "fp32": "onnxruntime"}
    assert probe.reference_load is not None and probe.for_reference().load is probe.reference_load
    same = _probe(segllm_edge, "fp16")
    assert same.backends == {"export": "onnxruntime", "fp32": "onnxruntime"} and same.for_reference() is same
    # the fit check's factor follows the runtime of each side: OpenVINO's is not onnxruntime's measured 1.5
    from segllm_edge.export.reference import OTHER_RUNTIME_PEAK_PER_BYTE, SESSION_PEAK_PER_BYTE, peak_per_byte
    assert peak_per_byte(probe, "fp32") == SESSION_PEAK_PER_BYTE
    assert peak_per_byte(probe, "export") == OTHER_RUNTIME_PEAK_PER_BYTE > SESSION_PEAK_PER_BYTE


def test_fp16_export_has_an_fp16_kv_cache(golden_export_fp16):
    man = Manifest.load(golden_export_fp16)
    llm = man.graphs["llm"]
    kv = [t for t in (*llm.inputs, *llm.outputs) if t.name.startswith(("past_key_values.", "present."))]
    assert kv and all(t.dtype == "float16" for t in kv)
    assert llm.inputs[0].dtype == "float32" and llm.outputs[0].dtype == "float32"
    sess = ort.InferenceSession(str(golden_export_fp16 / llm.file))
    got = {t.name: t.type for t in (*sess.get_inputs(), *sess.get_outputs())}
    assert all(got[t.name] == "tensor(float16)" for t in kv)
    assert got["inputs_embeds"] == got["hidden_states"] == "tensor(float)"
    # the runtime's cache follows the manifest: half the bytes per token of the fp32 export's
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.ort_backend import OrtBackend

    backend = OrtBackend(open_export(golden_export_fp16), None, {"llm": sess}, None)  # only the llm graph is needed
    cache = backend.new_cache()
    info = man.model
    rng = np.random.default_rng(0)
    backend.llm(rng.standard_normal((1, 5, info["hidden_size"]), dtype=np.float32), cache)
    backend.llm(rng.standard_normal((1, 2, info["hidden_size"]), dtype=np.float32), cache)
    assert cache.length == 7 and all(a.dtype == np.float16 for a in cache.arrays)
    per_token = 2 * info["num_layers"] * info["num_kv_heads"] * info["head_dim"] * 2
    assert cache.nbytes() == per_token * 7 == 7 * 1024  # docs/memory.md: 1 KiB per token for the golden-size model in fp16

def test_fp16_external_and_graph_files_are_world_readable(golden_export_fp16):
    for f in golden_export_fp16.glob("*.onnx*"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f
