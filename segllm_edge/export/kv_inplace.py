"""The llm graph with its KV cache written in place (``Manifest.kv_layout == "inplace"``).

The exported graph makes each layer's ``present.*`` as ``Concat(past, new)``: every round onnxruntime
allocates a tensor of the whole conversation and copies the past into it (at 7B width and ~1,800 tokens
~7 ms per layer and round, growing with the conversation), and a server's allocator takes a new block for
each longer present. This pass replaces, per layer, the Concat and the attention on its result
(``Q @ K^T``, the causal mask, Softmax, the IsNaN/Where guard for fully masked rows, ``@ V``) by one
``com.microsoft.GroupQueryAttention`` node (onnxruntime's CPU and CUDA kernels) on the round's query,
key and value, with

* ``past_key_values.*``: buffers ``(batch, kv_heads, capacity, head_dim)`` of which the first ``past_length``
  tokens are valid (a new input, :data:`~segllm_edge.contracts.manifest.PAST_LENGTH`; the positions and the
  causal mask came from the past's shape before, now from it);
* ``present.*``: the same buffers. When the caller binds each present to its past's memory (IOBinding,
  :mod:`segllm_edge.runtime.kv_buffer`), the kernel writes the round's keys/values at ``past_length`` and
  reads the past where it lies (``past_present_share_buffer`` in onnxruntime's ``gqa_attention_base.h``);
  nothing copies the past. Attention runs over the ``past_length + seq`` valid tokens only.

The mask of this graph is the causal one (key position <= query position, no padding), which is what
the kernel applies; a row is never fully masked (each token sees itself), so dropping the IsNaN/Where
guard changes nothing. The kernel's softmax is fp32 (as the graph's was for an fp32 cache); outputs equal
the Concat graph's within float rounding (tests/test_kv_inplace.py).

:func:`to_inplace_kv` rewrites a loaded ``onnx.ModelProto``; :func:`convert_export` turns an export folder's
llm (written by any segllm-edge version) into the in-place layout, its weights untouched.
"""
from __future__ import annotations

from pathlib import Path

from ..contracts.manifest import KV_CONCAT, KV_INPLACE, MANIFEST_NAME, PAST_LENGTH, Manifest, kv_names, llm_spec
from ..errors import CheckpointError
from .attention_layout import _drop_dead_nodes

MS_DOMAIN = "com.microsoft"
#: ops that may lie between the scores MatMul and the probabilities @ V MatMul of the exported attention
_SOFTMAX_PATH = {"Add", "Softmax", "IsNaN", "Where", "Cast"}


def _scalar(name: str, consts: dict) -> float | None:
    v = consts.get(name)
    return None if v is None or v.size != 1 else float(v.reshape(-1)[0])


def _layer_attention(i: int, g, prod: dict, cons: dict, consts: dict):
    """The nodes of layer ``i``'s attention: (concat_k, concat_v, q, k_new, v_new, scale, out_name, removed)."""
    past, present = kv_names(i + 1)
    pk, pv, ok, ov = past[-2], past[-1], present[-2], present[-1]
    ck, cv = prod.get(ok), prod.get(ov)
    for c, p in ((ck, pk), (cv, pv)):
        if c is None or c.op_type != "Concat" or len(c.input) != 2 or c.input[0] != p:
            raise CheckpointError(f"llm layer {i}: {p} is not concatenated with the new tokens as the exporter "
                                  "writes it; cannot convert this graph to the in-place KV layout")
    # K side: present.key -> Transpose(0,1,3,2) [-> Mul(c)] -> MatMul(q, .)
    scale, x = 1.0, ok
    chain = []
    while True:
        users = cons.get(x, [])
        if len(users) != 1:
            raise CheckpointError(f"llm layer {i}: {x} has {len(users)} consumers; expected the attention alone")
        n = users[0]
        if n.op_type == "MatMul" and n.input[1] == x:
            scores = n
            break
        if n.op_type == "Transpose" and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[0, 1, 3, 2]]:
            pass
        elif n.op_type == "Mul" and _scalar(n.input[1], consts) is not None:
            scale *= _scalar(n.input[1], consts)
        else:
            raise CheckpointError(f"llm layer {i}: unexpected {n.op_type} on the key path of the attention")
        chain.append(n)
        x = n.output[0]
    q = scores.input[0]
    qn = prod.get(q)
    if qn is not None and qn.op_type == "Mul" and _scalar(qn.input[1], consts) is not None \
            and len(cons.get(q, [])) == 1:
        scale *= _scalar(qn.input[1], consts)
        chain.append(qn)
        q = qn.input[0]
    # scores -> (Add mask, Softmax, IsNaN/Where, Cast) -> MatMul(., present.value)
    x, out = scores.output[0], None
    chain.append(scores)
    while out is None:
        users = [u for u in cons.get(x, []) if u not in chain]
        if not users:
            raise CheckpointError(f"llm layer {i}: the attention scores lead nowhere")
        for u in users:
            if u.op_type == "MatMul" and u.input[0] == x:
                if u.input[1] != ov:
                    raise CheckpointError(f"llm layer {i}: the probabilities multiply {u.input[1]}, not {ov}")
                out = u
            elif u.op_type not in _SOFTMAX_PATH:
                raise CheckpointError(f"llm layer {i}: unexpected {u.op_type} between the scores and @ V")
        chain.extend(u for u in users if u is not out)
        nxt = [u for u in users if u is not out and u.op_type in ("Softmax", "Where", "Cast", "Add")]
        if out is None:
            if not nxt:
                raise CheckpointError(f"llm layer {i}: no softmax path after the attention scores")
            x = nxt[-1].output[0]
    if sorted(u.name for u in cons.get(ov, [])) != [out.name]:
        raise CheckpointError(f"llm layer {i}: {ov} has consumers besides the attention")
    return ck, cv, q, ck.input[1], cv.input[1], scale, out.output[0]


def to_inplace_kv(model, num_heads: int, kv_heads: int, head_dim: int, layers: int) -> int:
    """Rewrite the llm graph ``model`` to the in-place KV layout (module doc); returns the layers converted."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    names = {i.name for i in g.input}
    if PAST_LENGTH in names:
        raise CheckpointError(f"the llm graph already has a {PAST_LENGTH} input (in-place layout)")
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer if len(t.dims) <= 1 and not t.data_location}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4:   # TENSOR
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    past, present = kv_names(layers)
    found = [_layer_attention(i, g, prod, cons, consts) for i in range(layers)]

    # the past's length: every Shape(past)[2:3] becomes the new input; Shape(past)[0:1] (the batch) stays
    new_nodes, dead = [], set()
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] in past:
            attrs = {a.name: a.i for a in n.attribute}
            span = (attrs.get("start", 0), attrs.get("end"))
            if span == (2, 3):
                dead.add(n.name)
                new_nodes.append((n, helper.make_node("Identity", [PAST_LENGTH], [n.output[0]],
                                                      name=f"{n.name}_past_length")))
            elif span not in ((0, 1),):
                raise CheckpointError(f"llm: {n.name} reads dims {span} of {n.input[0]}; cannot convert")

    def c64(name, vals):
        g.initializer.append(numpy_helper.from_array(np.asarray(vals, dtype=np.int64), name))
        return name

    pre = "kv_inplace"
    shared = [
        helper.make_node("Shape", ["inputs_embeds"], [f"{pre}/seq"], start=1, end=2),
        helper.make_node("Shape", ["inputs_embeds"], [f"{pre}/batch"], start=0, end=1),
        helper.make_node("Add", [PAST_LENGTH, f"{pre}/seq"], [f"{pre}/total64"]),
        helper.make_node("Sub", [f"{pre}/total64", c64(f"{pre}/one", [1])], [f"{pre}/last64"]),
        helper.make_node("Expand", [f"{pre}/last64", f"{pre}/batch"], [f"{pre}/last64_b"]),
        helper.make_node("Cast", [f"{pre}/last64_b"], [f"{pre}/seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Squeeze", [f"{pre}/total64"], [f"{pre}/total64_s"]),
        helper.make_node("Cast", [f"{pre}/total64_s"], [f"{pre}/total"], to=TensorProto.INT32),
    ]
    flat = c64(f"{pre}/bs_flat", [0, 0, -1])
    split_q = c64(f"{pre}/bs_q_heads", [0, 0, num_heads, head_dim])
    replaced = {}
    for i, (ck, cv, q, k_new, v_new, scale, out) in enumerate(found):
        p = f"{pre}/layer{i}"
        nodes = []
        for what, x in (("q", q), ("k", k_new), ("v", v_new)):
            nodes += [helper.make_node("Transpose", [x], [f"{p}/{what}_bshd"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"{p}/{what}_bshd", flat], [f"{p}/{what}_bsd"])]
        nodes.append(helper.make_node(
            "GroupQueryAttention", [f"{p}/q_bsd", f"{p}/k_bsd", f"{p}/v_bsd", past[2 * i], past[2 * i + 1],
                                    f"{pre}/seqlens_k", f"{pre}/total"],
            [f"{p}/attn_bsd", present[2 * i], present[2 * i + 1]], name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale)))
        nodes += [helper.make_node("Reshape", [f"{p}/attn_bsd", split_q], [f"{p}/attn_bshd"]),
                  helper.make_node("Transpose", [f"{p}/attn_bshd"], [out], perm=[0, 2, 1, 3])]
        replaced[ck.name] = nodes
        dead.add(cv.name)
        dead.add(prod[out].name)
    out_nodes = []
    swaps = dict((n.name, m) for n, m in new_nodes)
    for n in g.node:
        if n.name in replaced:
            out_nodes.extend(replaced[n.name])
        elif n.name in swaps:
            out_nodes.append(swaps[n.name])
        elif n.name not in dead:
            out_nodes.append(n)
    del g.node[:]
    g.node.extend(shared)       # read only graph inputs: first
    g.node.extend(out_nodes)
    g.input.append(helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT64, [1]))
    _topo_sort(g)
    _drop_dead(g)
    # I/O: the past/present buffers of `capacity` tokens, the new input
    for v in (*g.input, *g.output):
        if v.name in past or v.name in present:
            v.type.tensor_type.shape.dim[2].ClearField("dim_value")
            v.type.tensor_type.shape.dim[2].dim_param = "capacity"
    keep = {v.name for v in (*g.input, *g.output)}
    kept = [v for v in g.value_info if v.name in keep]   # shapes inferred for the Concat graph no longer hold
    del g.value_info[:]
    g.value_info.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(found)


def _topo_sort(g) -> None:
    """Order the nodes so each comes after what it reads (the GQA nodes read the shared length nodes)."""
    have = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    todo, done = list(g.node), []
    while todo:
        rest = []
        for n in todo:
            if all(i in have for i in n.input):
                done.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(todo):
            raise CheckpointError(f"llm: {len(rest)} nodes read values nothing makes (e.g. {rest[0].name})")
        todo = rest
    del g.node[:]
    g.node.extend(done)


def _drop_dead(g) -> None:
    """The nodes no output depends on any more, then the initializers nothing reads."""
    _drop_dead_nodes(g)
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)


def convert_export(folder: str | Path, out: str | Path | None = None) -> Path:
    """The export at ``folder`` with its llm in the in-place KV layout, written to ``out`` (default: in place).

    Files other than ``llm.onnx`` and the manifest are hard-linked into ``out`` (copied where links fail); the
    llm's weights (``llm.onnx.data``) are not rewritten. Returns the folder converted."""
    import os
    import shutil

    import onnx

    from ..contracts.model_info import ModelInfo

    src = Path(folder)
    manifest = Manifest.load(src)
    if manifest.kv_layout == KV_INPLACE:
        raise CheckpointError(f"{src} already has the in-place KV layout")
    dst = Path(out) if out is not None else src
    if dst != src:
        if dst.exists() and any(dst.iterdir()):
            raise CheckpointError(f"{dst} exists and is not empty")
        for p in src.rglob("*"):
            if p.is_dir() or p.name in (MANIFEST_NAME, manifest.graphs["llm"].file):
                continue
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copyfile(p, target)
    info = ModelInfo(**manifest.model)
    spec = manifest.graphs["llm"]
    model = onnx.load(str(src / spec.file), load_external_data=False)
    layers = to_inplace_kv(model, info.hidden_size // info.head_dim, info.num_kv_heads, info.head_dim, info.num_layers)
    tmp = dst / (spec.file + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst / spec.file)
    kv_dtype = spec.input(kv_names(1)[0][0]).dtype
    f = spec.input("inputs_embeds").dtype
    new = llm_spec(info, f, KV_INPLACE, kv_dtype)
    manifest.graphs["llm"] = new.__class__(new.name, spec.file, new.inputs, new.outputs, new.doc)
    manifest.kv_layout = KV_INPLACE
    manifest.extra.setdefault("graphs", {}).setdefault("llm", {})["kv_inplace_layers"] = layers
    manifest.save(dst)
    return dst


__all__ = ["KV_CONCAT", "KV_INPLACE", "convert_export", "to_inplace_kv"]
