"""The exported llm graph cut into blocks of decoder layers by node ranges, without loading its weights.

:func:`split_llm` cuts an export's ``llm.onnx`` (concat KV layout) into stages: a node belongs to the first decoder
layer whose ``present.<i>.*`` it feeds (the key/value projections of layer i feed ``present.i``; its query, attention
and MLP feed ``present.i+1`` and join the next layer; what feeds ``hidden_states`` only joins the last), and stage
``b`` holds the nodes of layers ``[b*k, (b+1)*k)``. Every edge of the graph goes from a stage to the same or a
later one (a node feeds at least what its consumers feed), so running the stages in order runs every node of the
whole graph once, on the same inputs: the tensors that cross a cut (the residual stream and the normed hidden state
in the graph's dtype, the rotary tables, the attention mask, a layer's keys/values) are handed over as the graph
types them. Each stage is an ONNX file next to a hard link of the graph's external data (its initializers keep
their offsets in it; no weight is copied or read here).

Used by the drift report's probe (the runtime's :class:`segllm_edge.runtime.graph_blocks.BlockedSession` runs the
stages one session at a time; the exporter plans the block size from :func:`llm_layer_weight_bytes`), so it lives
with the on-disk contracts, below both.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError
from .manifest import KV_INPLACE, kv_names


@dataclass
class Stage:
    path: Path
    inputs: list[str]                # what it reads: graph inputs or tensors of earlier stages
    outputs: list[str]               # what it hands on: graph outputs or tensors later stages read
    layers: tuple[int, int]          # the decoder layers [first, last] whose nodes it holds (see the module doc)
    weight_bytes: int = 0


@dataclass
class LlmBlocks:
    """The stages of one llm graph, their folder (removed with the object) and the graph's own inputs/outputs."""
    stages: list[Stage]
    inputs: list[Any]                # the whole graph's input ValueInfos (name, type) in order
    outputs: list[str]
    folder: Path
    layers_per_block: int
    _cleanup: Any = field(default=None, repr=False)

    def plan(self) -> dict:
        return {"layers_per_block": self.layers_per_block, "blocks": len(self.stages),
                "block_weight_bytes": [s.weight_bytes for s in self.stages]}


def _tensor_bytes(t) -> int:
    import onnx

    n = math.prod(t.dims) if len(t.dims) else 1
    return int(n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)


def llm_layer_weight_bytes(llm_path: Path) -> list[int]:
    """The weight bytes of each decoder layer's nodes (as :func:`split_llm` assigns them), from the graph alone."""
    import onnx

    model = onnx.load(str(llm_path), load_external_data=False)
    _toposort(model.graph)
    layer_of, n = _assign_layers(model.graph)
    inits = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    out = [0] * n
    seen: set[str] = set()
    for node, layer in zip(model.graph.node, layer_of):
        if layer == DEAD:
            continue
        for i in node.input:
            if i in inits and (layer, i) not in seen:
                seen.add((layer, i))
                out[layer] += inits[i]
    return out


DEAD = -1


def _toposort(graph) -> None:
    """Put ``graph``'s nodes in a topological order, in place (ONNX asks for one; converters do not always keep
    it: onnxconverter's fp16 pass appends its input casts at the end)."""
    from collections import deque

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[i] for i in n.input if i in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    count = [len(d) for d in deps]
    ready = deque(i for i, c in enumerate(count) if c == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            count[u] -= 1
            if count[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise BackendError("the llm graph has a cycle: it cannot be split by layers here")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _assign_layers(graph) -> tuple[list[int], int]:
    """Per node of ``graph`` (in its order): the decoder layer it belongs to, and the number of layers."""
    outputs = [o.name for o in graph.output]
    n = sum(1 for o in outputs if o.startswith("present.") and o.endswith(".key"))
    if n == 0 or "hidden_states" not in outputs:
        raise BackendError("the llm graph has no present.<i>.key outputs: not a concat-layout llm")
    _, present = kv_names(n)
    marker = {name: i // 2 for i, name in enumerate(present)}
    marker["hidden_states"] = n - 1
    big = n  # no path to an output
    value_layer: dict[str, int] = {k: v for k, v in marker.items()}
    layer_of = [big] * len(graph.node)
    for idx in range(len(graph.node) - 1, -1, -1):   # in topological order (_toposort)
        node = graph.node[idx]
        if node.op_type in ("If", "Loop", "Scan"):
            raise BackendError("the llm graph has control flow: it cannot be split by layers here")
        lay = min((value_layer.get(o, big) for o in node.output), default=big)
        layer_of[idx] = lay
        for i in node.input:
            if i and lay < value_layer.get(i, big):
                value_layer[i] = lay
    # a node that feeds no output (a converter's leftover) computes nothing the graph gives: no block runs it
    return [lay if lay < big else DEAD for lay in layer_of], n


def split_llm(llm_path: Path, layers_per_block: int, workdir: Path | None = None) -> LlmBlocks:
    """Write the stages of ``llm_path`` (blocks of ``layers_per_block`` layers) into a new folder under ``workdir``
    (default: next to the graph, so its external data can be hard-linked); see the module doc."""
    import onnx

    llm_path = Path(llm_path)
    model = onnx.load(str(llm_path), load_external_data=False)
    g = model.graph
    _toposort(g)
    layer_of, n = _assign_layers(g)
    k = max(1, int(layers_per_block))
    stage_of = [lay // k if lay != DEAD else DEAD for lay in layer_of]
    n_stages = (n - 1) // k + 1
    produced_in: dict[str, int] = {}
    for node, s in zip(g.node, stage_of):
        for o in node.output:
            produced_in[o] = s
    graph_outputs = [o.name for o in g.output]
    types = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    last_use: dict[str, int] = {}
    for node, s in zip(g.node, stage_of):
        for i in node.input:
            if i:
                last_use[i] = max(last_use.get(i, -1), s)
    missing = [name for name, s in produced_in.items()
               if name not in types and last_use.get(name, s) > s]
    if missing:   # a tensor crossing a cut needs its type: ask shape inference once
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update({v.name: v for v in inferred.graph.value_info})
        still = [m for m in missing if m not in types]
        if still:
            raise BackendError(f"the llm graph's tensors {still[:3]} have no type: it cannot be split here")
    workdir = Path(workdir) if workdir is not None else llm_path.parent
    folder = Path(tempfile.mkdtemp(prefix=".llm-blocks-", dir=workdir))
    try:
        stages = _write_stages(model, layer_of, stage_of, n_stages, last_use, types, llm_path, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    del model, g
    blocks = LlmBlocks(stages, _input_args(llm_path), graph_outputs, folder, k)
    blocks._cleanup = weakref.finalize(blocks, shutil.rmtree, str(folder), True)
    return blocks


def _write_stages(model, layer_of, stage_of, n_stages, last_use, types, llm_path, folder) -> list[Stage]:
    import onnx

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name: i for i in g.input}
    graph_outputs = [o.name for o in g.output]
    locations = {e.value for t in g.initializer for e in t.external_data if e.key == "location"}
    for loc in locations:   # the external data files, linked beside the stages (their offsets stay valid)
        src, dst = llm_path.parent / loc, folder / loc
        if Path(loc).is_absolute() or ".." in Path(loc).parts or not src.is_file():
            raise BackendError(f"the llm graph's external data {loc!r} is not a file beside it")
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)
    stages = []
    for s in range(n_stages):
        nodes = [node for node, st in zip(g.node, stage_of) if st == s]
        produced = {o for node in nodes for o in node.output}
        used = [i for node in nodes for i in node.input if i]
        ins = list(dict.fromkeys(i for i in used if i not in produced and i not in inits))
        outs = list(dict.fromkeys(o for o in (o for node in nodes for o in node.output)
                                  if o in graph_outputs or last_use.get(o, -1) > s))
        outs.sort(key=lambda o: (graph_outputs.index(o) if o in graph_outputs else len(graph_outputs)))
        stage_inits = [inits[i] for i in dict.fromkeys(used) if i in inits]

        def info(name):
            v = types.get(name) or graph_inputs.get(name)
            out = onnx.ValueInfoProto()
            out.CopyFrom(v)
            return out

        sg = onnx.helper.make_graph(nodes, f"{g.name}_block{s}", [info(i) for i in ins], [info(o) for o in outs],
                                    initializer=stage_inits)
        sm = onnx.helper.make_model(sg, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        sm.functions.extend(model.functions)
        path = folder / f"llm.block{s}.onnx"
        onnx.save_model(sm, str(path))
        layers = [lay for lay, st in zip(layer_of, stage_of) if st == s and lay != DEAD]
        stages.append(Stage(path, ins, outs, (min(layers), max(layers)),
                            sum(_tensor_bytes(t) for t in stage_inits)))
    return stages


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str
    shape: list


def _input_args(llm_path: Path) -> list[_Arg]:
    import onnx

    m = onnx.load(str(llm_path), load_external_data=False)
    out = []
    for i in m.graph.input:
        t = i.type.tensor_type
        out.append(_Arg(i.name, f"tensor({onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})",
                        [d.dim_param or d.dim_value for d in t.shape.dim]))
    return out


def layers_per_block_for(layer_bytes: list[int], per_byte: float, cap: float) -> int:
    """The most layers per block whose weights, times ``per_byte`` (a session's peak per weight byte), fit ``cap``
    bytes in every block (at least 1: one layer is the smallest block there is)."""
    n = len(layer_bytes)
    for k in range(n, 0, -1):
        if all(sum(layer_bytes[i:i + k]) * per_byte <= cap for i in range(0, n, k)):
            return k
    return 1


def can_split(kv_layout: str, runtime: str | None) -> bool:
    """Whether the probe can run an export's llm block by block: onnxruntime, concat KV layout (the in-place layout's
    GroupQueryAttention writes into buffers the runtime shares across the whole graph; OpenVINO compiles whole
    graphs)."""
    return runtime == "onnxruntime" and kv_layout != KV_INPLACE


__all__ = ["LlmBlocks", "Stage", "can_split", "layers_per_block_for", "llm_layer_weight_bytes", "split_llm"]
