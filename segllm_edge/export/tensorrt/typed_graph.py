"""Strongly typed builds (TensorRT 11, or ``strongly_typed=True``): the precision lives in the ONNX graph.

TensorRT 11 has no precision flags or per-layer constraints; a strongly typed network runs every tensor
at the type the graph gives it. For an fp16 engine from the fp32 export this module writes a typed copy of
the graph: fp16 weights and compute, the fp32 islands of the weak-typing path (the plan's ``fp32_nodes``:
norms, softmax, RoPE — :func:`..builder.default_fp32_patterns`) kept fp32 behind explicit ``Cast`` nodes,
graph I/O fp32 except the llm's KV cache when the plan stores it reduced (``kv_dtype``).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import BackendError

TYPED_SUBDIR = "typed"
KV_PREFIXES = ("past_key_values.", "present.")


def _reduced_float_types(model) -> set[int]:
    import onnx

    reduced = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return {t.data_type for t in model.graph.initializer if t.data_type in reduced}


def typed_graph(plan, out_dir: Path) -> Path:
    """The ONNX file a strongly typed build of ``plan`` parses: the export's own file when its types already
    say the plan's precision (fp32 plans, Q/DQ graphs, graphs already converted), else a converted copy under
    ``out_dir/typed/``."""
    import onnx

    from ..quantize import to_fp16

    if plan.precision == "fp32" or plan.has_qdq:
        return plan.onnx
    model = onnx.load(str(plan.onnx), load_external_data=False)
    found = _reduced_float_types(model)
    want = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(plan.precision)
    if found and (want is None or want in found):
        return plan.onnx  # an fp16/bf16 export: its types (and fp32 islands as Casts) are already in the graph
    if found:
        have = "bf16" if onnx.TensorProto.BFLOAT16 in found else "fp16"
        raise BackendError(f"a strongly typed {plan.precision} engine of {plan.graph} needs a {plan.precision} ONNX "
                           f"graph, and {plan.onnx.name} is {have}: build with --precision {have}, or export "
                           f"`segllm-edge export --precision {plan.precision}`")
    if plan.precision != "fp16":
        raise BackendError(f"a strongly typed {plan.precision} engine of {plan.graph} needs a {plan.precision} ONNX "
                           f"graph, and {plan.onnx.name} is fp32 (build-engines converts to fp16 only): export with "
                           f"`segllm-edge export --precision {plan.precision}`, build with --precision fp16 on this "
                           "TensorRT, or give it a typed graph (TensorRT Model Optimizer)")
    io = [t.name for t in (*model.graph.input, *model.graph.output)]
    keep = [n for n in io if not (plan.kv_dtype and n.startswith(KV_PREFIXES))]
    out = Path(out_dir) / TYPED_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"{plan.graph}.fp16.onnx"
    del model
    # one load of the fp32 graph with its weights (a 7B llm is ~26 GB): converted in memory, written once to the
    # copy, whose external data goes under its own name
    to_fp16(plan.onnx, keep_fp32_io=keep, keep_fp32_nodes=sorted(plan.fp32_nodes), dst=dst)
    return dst
