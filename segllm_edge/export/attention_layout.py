"""The llm graph's ``Q @ K^T`` without a copy of the whole key cache every round.

torch.onnx lowers ``scaled_dot_product_attention`` with the key transposed through rank 3::

    Reshape(K, [-1, L, D]) -> Transpose(perm=[0, 2, 1]) -> Reshape(.., [B, H, D, L]) -> Mul(sqrt(scale)) -> MatMul

onnxruntime runs that ``Transpose`` as a copy of ``present.key`` (the whole past + the round's tokens) in
every layer, every round: at 7B width and ~1,800 tokens it was ~6 ms per layer, a cost that grows with
the conversation (the step is otherwise dominated by the weight MatMuls, which do not). Written as the
equivalent ``Transpose(K, perm=[0, 1, 3, 2])``, onnxruntime's optimizer folds it into the MatMul
(``FusedMatMul`` with ``transB``, the ``Mul`` into its ``alpha``): the kernel reads ``present.key`` where it
lies. Same maths, the same values bit for bit (a transpose moves elements, it rounds nothing).

:func:`fuse_key_transposes` rewrites a loaded ``onnx.ModelProto``; :func:`rewrite_graph_file` does it to a
saved graph (its ``.onnx.data`` is not touched). A graph without the pattern is left as it is.
"""
from __future__ import annotations

from pathlib import Path

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _const_ints(name: str, inits: dict) -> list[int] | None:
    from onnx import numpy_helper

    t = inits.get(name)
    return None if t is None else [int(v) for v in numpy_helper.to_array(t).reshape(-1)]


def _slice_of_shape(name: str, prod: dict, inits: dict, x: str) -> tuple[int, int] | None:
    """``(start, end)`` when ``name`` is ``Slice(Shape(x), start, end)`` (axis 0, step 1)."""
    n = prod.get(name)
    if n is None or n.op_type != "Slice" or len(n.input) < 3:
        return None
    shape = prod.get(n.input[0])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != x \
            or any(a.name != "start" or a.i != 0 for a in shape.attribute):   # the whole shape
        return None
    if len(n.input) > 3 and n.input[3] and _const_ints(n.input[3], inits) != [0]:
        return None
    if len(n.input) > 4 and n.input[4] and _const_ints(n.input[4], inits) != [1]:
        return None
    start, end = _const_ints(n.input[1], inits), _const_ints(n.input[2], inits)
    if start is None or end is None or len(start) != 1 or len(end) != 1:
        return None
    return start[0], end[0]


def _concat_parts(name: str, prod: dict):
    n = prod.get(name)
    if n is None or n.op_type != "Concat" or [a.i for a in n.attribute if a.name == "axis"] != [0]:
        return None
    return list(n.input)


def _is_flatten_heads(reshape, prod: dict, inits: dict) -> bool:
    """``Reshape(x, Concat([-1], Shape(x)[-2:-1], Shape(x)[-1:]))``."""
    x = reshape.input[0]
    parts = _concat_parts(reshape.input[1], prod)
    return (parts is not None and len(parts) == 3 and _const_ints(parts[0], inits) == [-1]
            and _slice_of_shape(parts[1], prod, inits, x) == (-2, -1)
            and _slice_of_shape(parts[2], prod, inits, x) in ((-1, INT64_MAX),))


def _is_unflatten_swapped(reshape, x: str, prod: dict, inits: dict) -> bool:
    """``Reshape(.., Concat(Shape(x)[:-2], Shape(x)[-1:], Shape(x)[-2:-1]))``."""
    parts = _concat_parts(reshape.input[1], prod)
    return (parts is not None and len(parts) == 3
            and _slice_of_shape(parts[0], prod, inits, x) in ((INT64_MIN, -2), (0, -2))
            and _slice_of_shape(parts[1], prod, inits, x) == (-1, INT64_MAX)
            and _slice_of_shape(parts[2], prod, inits, x) == (-2, -1))


def fuse_key_transposes(model) -> int:
    """Rewrite every rank-3 key transpose of the SDPA lowering as one rank-4 ``Transpose``; returns the count."""
    from onnx import helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*g.value_info, *g.input, *g.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    replaced = 0
    for r2 in list(g.node):
        if r2.op_type != "Reshape":
            continue
        t = prod.get(r2.input[0])
        if t is None or t.op_type != "Transpose" or uses.get(t.output[0]) != 1 \
                or [list(a.ints) for a in t.attribute if a.name == "perm"] != [[0, 2, 1]]:
            continue
        r1 = prod.get(t.input[0])
        if r1 is None or r1.op_type != "Reshape" or uses.get(r1.output[0]) != 1:
            continue
        x = r1.input[0]
        if ranks.get(x, 4) != 4:      # the rank-4 perm below is that of a (batch, heads, tokens, dim) key
            continue
        if not _is_flatten_heads(r1, prod, inits) or not _is_unflatten_swapped(r2, x, prod, inits):
            continue
        new = helper.make_node("Transpose", [x], [r2.output[0]], name=f"{t.name}_rank4", perm=[0, 1, 3, 2])
        new.metadata_props.extend(t.metadata_props)      # the torch scope it came from, for the TensorRT plans
        at = list(g.node).index(r1)   # x is made before r1, r2's consumers come after it
        for n in (r2, t, r1):
            g.node.remove(n)
        g.node.insert(at, new)
        replaced += 1
    if replaced:
        _drop_dead_nodes(g)
    return replaced


def _drop_dead_nodes(g) -> None:
    """Remove nodes none of whose outputs is used (the shape arithmetic of the removed reshapes)."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def rewrite_graph_file(path: Path) -> int:
    """:func:`fuse_key_transposes` on the graph saved at ``path`` (its external data stays as written)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    count = fuse_key_transposes(model)
    if count:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return count


__all__ = ["fuse_key_transposes", "rewrite_graph_file"]
