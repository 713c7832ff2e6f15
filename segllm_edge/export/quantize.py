"""Reduced-precision exports with an accuracy guard (a drift report against fp32).

* ``fp16``: CLIP encoders, LLM and seg head converted to fp16 (I/O kept fp32); normalisations stay fp32;
  the HIPIE graphs stay fp32 (the research code runs the HIPIE encoder in fp32 too).
* ``int8``: dynamic INT8 quantization of the LLM's MatMul weights (onnxruntime ``quantize_dynamic``).
* ``int4``: INT4 weight-only (block 32, ``MatMulNBits``) for the LLM.

The drift report runs the same 3-round conversation on the fp32 graphs and on the quantized ones and
records mask IoU per round, the LLM hidden-state error and the graph sizes on disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..contracts.demo import DEMO_QUESTIONS as DRIFT_QUESTIONS
from ..contracts.precisions import EXPORT_PRECISIONS as PRECISIONS

FP16_GRAPHS = ("vision_encoder", "mask_encoder", "llm", "seg_head")
FP16_KEEP_FP32_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt",
                      "Reciprocal", "Softmax", "Cos", "Sin"]
GUARD_MIN_IOU = 0.9  # a round whose mask IoU vs fp32 falls below this fails the accuracy guard


def _external(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()


def _require_onnxruntime():
    from ..contracts.ort import require_onnxruntime

    return require_onnxruntime()


def _save(model, path: Path, external: bool) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name if external else None)


def to_fp16(path: Path) -> None:
    _require_onnxruntime()  # the quantizers are part of onnxruntime (either the cpu or the gpu build)
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(path))
    m16 = convert_float_to_float16(m, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS, disable_shape_infer=True)
    _save(m16, path, _external(path))


def to_int8(path: Path) -> None:
    _require_onnxruntime()  # the quantizers are part of onnxruntime (either the cpu or the gpu build)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("int8_" + path.name)
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=_external(path))
    _replace(tmp, path)


def to_int4(path: Path, block_size: int = 32) -> None:
    _require_onnxruntime()  # the quantizers are part of onnxruntime (either the cpu or the gpu build)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(path))
    q = MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=True)
    q.process()
    _save(q.model.model, path, _external(path))


def _replace(tmp: Path, path: Path) -> None:
    data, tmp_data = path.with_name(path.name + ".data"), tmp.with_name(tmp.name + ".data")
    tmp.replace(path)
    if data.exists():
        data.unlink()
    if tmp_data.exists():  # the external data file name is recorded inside the model: rewrite it under the new name
        import onnx

        m = onnx.load(str(path))
        _save(m, path, True)
        tmp_data.unlink()


def run_conversation(export_dir: Path) -> list:
    import segllm_edge
    from ..contracts.demo import demo_image

    model = segllm_edge.load(export_dir, backend="onnxruntime")
    s = model.session(demo_image(), trace=True)
    return [s.ask(q) for q in DRIFT_QUESTIONS]


def _iou(a, b) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def quantize_export(export_dir, precision: str, drift_report: bool = True, progress: bool = True):
    """Convert an fp32 export in place to ``precision``; writes ``drift_report.json``; returns the manifest."""
    from ..errors import CheckpointError
    from ..contracts.manifest import Manifest
    from .onnx_export import graph_sizes

    folder = Path(export_dir)
    manifest = Manifest.load(folder)
    if manifest.precision != "fp32":
        raise CheckpointError(f"{folder} is already {manifest.precision}; quantize from an fp32 export")
    if precision not in PRECISIONS:
        raise CheckpointError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    sizes_fp32 = graph_sizes(folder, manifest)
    ref = run_conversation(folder) if drift_report else None
    if precision == "fp16":
        targets, fn = FP16_GRAPHS, to_fp16
    elif precision == "int8":
        targets, fn = ("llm",), to_int8
    else:
        targets, fn = ("llm",), to_int4
    for name in targets:
        fn(folder / manifest.graphs[name].file)
    manifest.precision = precision
    manifest.extra["quantized_graphs"] = list(targets)
    manifest.save(folder)
    report = {"precision": precision, "graphs": list(targets),
              "size_bytes": {"fp32": sizes_fp32, precision: graph_sizes(folder, manifest)}}
    if ref is not None:
        got = run_conversation(folder)
        rounds = []
        for i, (a, b) in enumerate(zip(ref, got), 1):
            ha, hb = np.asarray(a.trace["hidden"]), np.asarray(b.trace["hidden"])
            err = np.abs(ha - hb)
            rounds.append({"round": i, "mask_iou_vs_fp32": _iou(a.model_mask, b.model_mask),
                           "hidden_max_rel_err": float(err.max() / max(np.abs(ha).max(), 1e-12)),
                           "hidden_mean_rel_err": float(err.mean() / max(np.abs(ha).mean(), 1e-12)),
                           "same_query": a.query_index == b.query_index})
        report["rounds"] = rounds
        worst = min(r["mask_iou_vs_fp32"] for r in rounds)
        report["guard"] = {"min_mask_iou": GUARD_MIN_IOU, "worst_mask_iou": worst, "passed": worst >= GUARD_MIN_IOU}
    (folder / "drift_report.json").write_text(json.dumps(report, indent=1))
    return manifest


def format_drift(report: dict) -> str:
    lines = [f"precision {report['precision']} (quantized graphs: {', '.join(report['graphs'])})"]
    for r in report.get("rounds", []):
        lines.append(f"  round {r['round']}: mask IoU vs fp32 {r['mask_iou_vs_fp32']:.4f}, hidden max rel err "
                     f"{r['hidden_max_rel_err']:.2e}, mean {r['hidden_mean_rel_err']:.2e}, same query {r['same_query']}")
    guard = report.get("guard")
    if guard:
        verdict = "passed" if guard["passed"] else "FAILED: do not deploy this precision without checking accuracy"
        lines.append(f"  accuracy guard (mask IoU >= {guard['min_mask_iou']}): {verdict} (worst {guard['worst_mask_iou']:.3f})")
    fp32, q = report["size_bytes"]["fp32"], report["size_bytes"][report["precision"]]
    for g in fp32:
        lines.append(f"  {g}: {fp32[g] / 1e6:.1f} MB → {q[g] / 1e6:.1f} MB")
    return "\n".join(lines)
