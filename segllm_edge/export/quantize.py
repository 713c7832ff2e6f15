"""Reduced-precision exports with an accuracy guard (a drift report against fp32, :mod:`.drift`).

* ``fp16``: CLIP encoders, LLM and seg head converted to fp16; normalisations stay fp32; graph I/O stays
  fp32 except the LLM's KV cache (``past_key_values.*`` / ``present.*`` are fp16: half the memory per
  token); the HIPIE graphs stay fp32 (the research code runs the HIPIE encoder in fp32 too).
* ``int8``: dynamic INT8 quantization of the LLM's MatMul weights (onnxruntime ``quantize_dynamic``).
* ``int4``: INT4 weight-only (block 32, ``MatMulNBits``) for the LLM.

The drift report runs the probe conversation on the fp32 graphs and on the converted ones and records
mask IoU per round, the LLM hidden-state error and the graph sizes on disk; a failing guard raises
:class:`~segllm_edge.errors.AccuracyGuardError` (the export stays on disk) unless ``allow_accuracy_drop``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from ..errors import AccuracyGuardError, CheckpointError
from .drift import DriftProbe, compare_rounds, format_drift, guard, run_probe
from ..contracts.manifest import KV_CONCAT, Manifest, kv_names
from ..contracts.precisions import EXPORT_PRECISIONS as PRECISIONS
from .files import graph_sizes, has_external_data, replace_graph, save_graph

FP16_GRAPHS = ("vision_encoder", "mask_encoder", "llm", "seg_head")
FP16_KEEP_FP32_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt",
                      "Reciprocal", "Softmax", "Cos", "Sin"]
KV_PREFIXES = ("past_key_values.", "present.")
REPORT_FILE = "drift_report.json"


def _require_onnxruntime():
    # the quantizers are part of onnxruntime (either the cpu or the gpu build)
    from ..contracts.ort import require_onnxruntime

    return require_onnxruntime()


def to_fp16(path: Path, keep_fp32_io: bool | list[str] = True, keep_fp32_nodes: list[str] | None = None,
            dst: Path | None = None) -> None:
    """fp16 weights and compute, norms/softmax/RoPE kept fp32 (Cast nodes around them). ``keep_fp32_io``: True
    keeps every graph input and output fp32, a list keeps those named (the others become fp16);
    ``keep_fp32_nodes``: node names kept fp32 as well. Written over ``path``, or to ``dst`` (with its external
    data under its own name when ``path`` has external data): the graph is loaded once either way."""
    _require_onnxruntime()
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(path))
    m16 = convert_float_to_float16(m, keep_io_types=keep_fp32_io, op_block_list=FP16_KEEP_FP32_OPS,
                                   node_block_list=keep_fp32_nodes, disable_shape_infer=True)
    save_graph(m16, Path(dst or path), has_external_data(path))


def to_int8(path: Path) -> None:
    _require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("int8_" + path.name)
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=has_external_data(path))
    replace_graph(tmp, path)


def to_int4(path: Path, block_size: int = 32) -> None:
    _require_onnxruntime()
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it logs one INFO line per node it skips (hundreds): nothing a user can act on
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    m = onnx.load(str(path))
    q = MatMulNBitsQuantizer(m, block_size=block_size, is_symmetric=True)
    q.process()
    save_graph(q.model.model, path, has_external_data(path))


def _fp16_llm(path: Path) -> None:
    """The llm graph in fp16 with an fp16 KV cache: inputs_embeds and hidden_states stay fp32."""
    to_fp16(path, keep_fp32_io=["inputs_embeds", "hidden_states"])


def _retype_kv(manifest: Manifest, dtype: str) -> None:
    """The manifest's llm KV tensors as the converted graph has them (the runtimes size their caches from it)."""
    g = manifest.graphs["llm"]

    def re(ts):
        return tuple(replace(t, dtype=dtype) if t.name.startswith(KV_PREFIXES) else t for t in ts)

    manifest.graphs["llm"] = replace(g, inputs=re(g.inputs), outputs=re(g.outputs))


def converted_graphs(precision: str) -> list[str]:
    """The graphs a reduced precision changes (the others stay fp32)."""
    return list(FP16_GRAPHS) if precision in ("fp16", "bf16") else ["llm"]


def _conversions(precision: str) -> dict:
    if precision == "fp16":
        return {name: (_fp16_llm if name == "llm" else to_fp16) for name in FP16_GRAPHS}
    return {"llm": to_int8 if precision == "int8" else to_int4}


def quantize_export(export_dir, precision: str, drift_probe: DriftProbe | None = None, drift_report: bool = True,
                    allow_accuracy_drop: bool = False, progress: bool = True) -> Manifest:
    """Convert an fp32 export in place to ``precision``; writes ``drift_report.json``; returns the manifest.

    With a ``drift_probe`` (and ``drift_report``) the probe conversation runs on the fp32 graphs before and on
    the converted graphs after; a failing accuracy guard raises AccuracyGuardError once everything is written,
    unless ``allow_accuracy_drop``."""
    folder = Path(export_dir)
    manifest = Manifest.load(folder)
    if manifest.precision != "fp32":
        raise CheckpointError(f"{folder} is already {manifest.precision}; quantize from an fp32 export")
    if manifest.kv_layout != KV_CONCAT:
        raise CheckpointError(f"{folder} has the {manifest.kv_layout!r} KV layout: quantize the export first, then "
                              "convert it (`segllm-edge convert-kv-inplace`)")
    if precision not in PRECISIONS:
        raise CheckpointError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        raise CheckpointError("bf16 is exported directly from the checkpoint (`segllm-edge export --precision bf16`), "
                              "not converted from an fp32 export")
    probe = drift_probe if drift_report else None
    sizes_fp32 = graph_sizes(folder, manifest)
    ref = run_probe(probe.for_reference(), folder) if probe is not None else None
    conversions = _conversions(precision)
    for name, convert in conversions.items():
        convert(folder / manifest.graphs[name].file)
    if precision == "fp16":
        _retype_kv(manifest, "float16")
    manifest.precision = precision
    manifest.extra["quantized_graphs"] = list(conversions)
    manifest.extra["kv_cache_dtype"] = manifest.graphs["llm"].input(kv_names(1)[0][0]).dtype
    manifest.save(folder)
    report = {"precision": precision, "graphs": list(conversions),
              "size_bytes": {"fp32": sizes_fp32, precision: graph_sizes(folder, manifest)}}
    if ref is not None:
        report["rounds"] = compare_rounds(ref, run_probe(probe, folder), precision)
        report["guard"] = guard(report["rounds"])
        if probe.backends:
            report["probe_backends"] = dict(probe.backends)
    else:
        report["drift_skipped"] = "switched off" if not drift_report else "no drift probe was given"
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=1))
    enforce_guard(report, folder, allow_accuracy_drop)
    return manifest


def enforce_guard(report: dict, folder: Path, allow_accuracy_drop: bool = False) -> None:
    """AccuracyGuardError when the report's guard failed (an inconclusive or skipped guard passes)."""
    if report.get("guard", {}).get("passed") is False and not allow_accuracy_drop:
        raise AccuracyGuardError(f"the {report['precision']} export in {folder} failed its accuracy guard (the export "
                                 "is written; pass --allow-accuracy-drop / allow_accuracy_drop=True to accept it):\n"
                                 + format_drift(report))
