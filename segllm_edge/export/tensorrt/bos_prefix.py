"""The BOS prefix of a TensorRT llm engine: K/V and hidden state of the BOS token at position 0, which the
TensorRT backend puts at the start of every KV cache (``empty_past='bos_prefix'``: an engine's profiles do
not take a past of length 0).

Computed with onnxruntime on the CPU from the export's llm graph, before the engine builds. A bf16 graph
(``segllm-edge export --precision bf16``) cannot run there: onnxruntime's CPU provider has no bf16 kernels
(and its Python API takes no bf16 arrays). For it, :func:`fp32_compute_graph` writes a companion graph that
computes in fp32 from the same bf16 weights: each bf16 weight goes through a ``Cast`` to fp32 placed just
before the node that first reads it, every bf16 type in the graph becomes fp32, and the weights stay where
they are (the companion refers to the export's external-data file; nothing is copied). onnxruntime runs it
without graph optimisations, so that the casts are not folded into fp32 copies of every weight (a 7B llm:
13 GB of bf16 weights, never 26 GB of fp32 ones). The result differs from bf16 compute by bf16 rounding.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import BackendError


def has_bf16(model) -> bool:
    """Whether an ONNX model (loaded without its external data) has a bf16 weight or a bf16 graph input/output."""
    import onnx

    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == bf16 for v in (*model.graph.input, *model.graph.output))


def _retype_tensor_to_fp32(t) -> None:
    """A small tensor value (a Constant's, ConstantOfShape's) from bf16 to fp32, in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    raw = numpy_helper.to_array(t)       # onnx >= 1.16 gives ml_dtypes.bfloat16 (or uint16 bits on older ones)
    if raw.dtype == np.uint16:
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    t.CopyFrom(numpy_helper.from_array(np.asarray(raw, dtype=np.float32), t.name))
    assert t.data_type == onnx.TensorProto.FLOAT


def fp32_compute_graph(model):
    """The graph of ``model`` (loaded with ``load_external_data=False``) computing in fp32 from its bf16 weights:
    a new ModelProto; ``model`` is not changed."""
    import onnx
    from onnx import helper

    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise BackendError(f"node {node.name or node.op_type} has a subgraph: the bf16 BOS-prefix rewrite "
                               "handles flat graphs only")
    renamed: dict[str, str] = {}
    for t in g.initializer:
        if t.data_type == bf16:
            renamed[t.name] = t.name + "__bf16"
            t.name = renamed[t.name]
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == bf16:
            v.type.tensor_type.elem_type = fp32
    nodes = []
    cast_done: set[str] = set()
    for node in g.node:
        for name in node.input:
            if name in renamed and name not in cast_done:   # the cast right before the weight's first reader
                nodes.append(helper.make_node("Cast", [renamed[name]], [name], to=fp32, name=f"{name}__to_fp32"))
                cast_done.add(name)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == bf16:
                a.i = fp32
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                _retype_tensor_to_fp32(a.t)
        nodes.append(node)
    for name in renamed:
        if name not in cast_done and any(o.name == name for o in g.output):
            nodes.append(helper.make_node("Cast", [renamed[name]], [name], to=fp32, name=f"{name}__to_fp32"))
    del g.node[:]
    g.node.extend(nodes)
    return m


def write_bos_prefix(export_dir, out_path) -> Path:
    """Compute the BOS prefix of the export in ``export_dir`` (see the module's docstring) into ``out_path``
    (``.npz``: ``bos_id``, ``bos_embedding``, ``hidden_states``, ``present.*`` in fp32, ``onnx_sha256`` of the
    llm graph it came from)."""
    import numpy as np
    import onnx

    from ...contracts.engines import file_sha256
    from ...contracts.manifest import Manifest, kv_names
    from ...contracts.ort import require_onnxruntime
    from ...pipeline.tokenizer import SegLLMTokenizer

    folder = Path(export_dir)
    man = Manifest.load(folder)
    spec = man.graphs["llm"]
    graph = folder / spec.file
    tok = SegLLMTokenizer.from_folder(folder / man.tokenizer_dir)
    embed = np.load(folder / man.arrays["embed_tokens"], mmap_mode="r")
    past, present = kv_names(int(man.model["num_layers"]))
    kvh, hd = int(man.model["num_kv_heads"]), int(man.model["head_dim"])
    ort = require_onnxruntime()  # the BOS prefix is computed on the CPU, with either onnxruntime build
    opts = ort.SessionOptions()
    proto = onnx.load(str(graph), load_external_data=False)
    companion = None
    if has_bf16(proto):
        # next to the graph, so that its external-data references resolve to the export's own file
        companion = graph.with_name(f".{graph.stem}.bos-fp32-compute.onnx")
        onnx.save_model(fp32_compute_graph(proto), str(companion))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    del proto
    try:
        sess = ort.InferenceSession(str(companion or graph), opts, providers=["CPUExecutionProvider"])
        dt = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in sess.get_inputs()}
        feeds = {"inputs_embeds": np.asarray(embed[[tok.bos_id]], dtype=np.float32).astype(dt["inputs_embeds"])[None]}
        feeds.update({n: np.zeros((1, kvh, 0, hd), dtype=dt[n]) for n in past})
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    finally:
        if companion is not None:
            companion.unlink(missing_ok=True)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, bos_id=np.int64(tok.bos_id), bos_embedding=feeds["inputs_embeds"][0, 0].astype(np.float32),
             hidden_states=outs["hidden_states"].astype(np.float32),
             onnx_sha256=np.array(file_sha256(graph)),
             **{n: outs[n].astype(np.float32) for n in present})
    return out
