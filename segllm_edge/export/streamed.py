"""Streaming export: a graph traced on the meta device, its weights read from the checkpoint one tensor at a time.

The exporter's peak memory no longer holds the model: the CLIP, LLM and seg-head modules of a lazily loaded
checkpoint (:func:`~segllm_edge.modeling.loader.load_checkpoint` with ``lazy=True``) have their parameters on the
meta device; torch.onnx traces them there (the graph, no weights); every initializer then becomes an
``onnx_ir.LazyTensor`` that reads its checkpoint tensor (bf16 in the released checkpoints) and converts it to the
graph's dtype when, and only when, ``onnx_ir.save`` writes it into the external data. The weight transposes that
onnxscript's optimizer would fold (materialising every transposed weight at once) are folded here, lazily.

Precisions (``PRECISION_DTYPES``): fp32 traces fp32; fp16 and bf16 trace the modules in that dtype (graph inputs
and outputs stay fp32 except the LLM's KV cache, which is in the precision's dtype: half the bytes per token;
transformers' RMSNorm and rotary embedding compute in fp32 inside the graph); int8/int4 trace fp32 and replace
the LLM's weight MatMuls (:mod:`.weight_quant`), each weight quantized as it is written.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..process_memory import release_memory  # noqa: F401 - the exporter's callers import it from here
from .files import match_mode
from .graphs import GRAPH_MODULES, dynamic_shapes, example_inputs

#: the graphs whose weights stream from the checkpoint (HIPIE is fixed-size and read for real)
STREAMED_GRAPHS = ("vision_encoder", "mask_encoder", "llm", "seg_head")
#: export precision → the torch dtype its streamed graphs are traced in
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                    "int8": torch.float32, "int4": torch.float32}
#: export precision → the numpy/manifest dtype name of the LLM's KV cache
KV_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# loggers whose warnings a user cannot act on: torch.onnx lists the torchvision ops it skips (segllm-edge uses none)
QUIET_LOGGERS = ("onnxscript", "torch.onnx._internal.exporter._registration")
#: ONNX opset per precision: bf16 Conv/LayerNormalization/... are typed only from opset 22 on
OPSETS = {"bf16": 22}
DEFAULT_OPSET = 18


class CastIO(nn.Module):
    """A graph module run in ``dtype`` behind fp32 inputs and outputs; the LLM's KV cache (past in, presents out)
    stays in ``dtype``."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, kv_outputs: bool):
        super().__init__()
        self.inner, self.dtype, self.kv_outputs = inner, dtype, kv_outputs

    def forward(self, *args):
        args = torch.utils._pytree.tree_map(lambda t: t.to(self.dtype) if t.is_floating_point() else t, args)
        out = self.inner(*args)
        if self.kv_outputs:
            return (out[0].float(), *out[1:])
        return out.float()


def _ir_tensor(t: torch.Tensor, name: str):
    """A torch tensor as an onnx_ir tensor (bf16 through ml_dtypes: numpy has no bfloat16)."""
    import onnx_ir as ir

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


def _sources(gm: nn.Module, model: nn.Module, weights, dtype: torch.dtype) -> dict:
    """graph-module tensor name → a function returning the real tensor (read from the checkpoint in ``dtype`` for
    the floating parameters left on the meta device, the live tensor for real buffers)."""
    keys = {id(t): k for k, t in chain(model.named_parameters(remove_duplicate=False),
                                       model.named_buffers(remove_duplicate=False))}
    out = {}
    for name, t in chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)):
        if t.is_meta:
            key = keys[id(t)]
            out[name] = (lambda key=key, dt=(dtype if t.is_floating_point() else t.dtype): weights.get(key, dt))
        else:
            out[name] = (lambda t=t: t)
    return out


def _make_lazy(value, fn, name: str):
    import onnx_ir as ir

    return ir.LazyTensor(lambda: _ir_tensor(fn(), name), dtype=value.dtype, shape=ir.Shape(value.shape), name=name)


def fold_weight_transposes(graph) -> int:
    """``Transpose(weight)`` of a lazily read initializer used only there → a lazily transposed initializer
    (what the optimizer's constant folding does, without reading every weight at once). Returns the count."""
    import onnx_ir as ir

    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or not isinstance(src.const_value, ir.LazyTensor) \
                or len(src.uses()) != 1:
            continue
        lazy = src.const_value
        rank = len(lazy.shape)
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(reversed(range(rank)))
        shape = ir.Shape([lazy.shape[p] for p in perm])
        name = src.name
        new = ir.LazyTensor(lambda lazy=lazy, perm=tuple(perm), name=name: ir.Tensor(lazy.numpy().transpose(perm),
                                                                                      name=name),
                            dtype=lazy.dtype, shape=shape, name=name)
        out = node.outputs[0]
        graph.initializers.pop(name)
        value = ir.Value(name=name, shape=shape, type=ir.TensorType(lazy.dtype), const_value=new)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        graph.register_initializer(value)
        folded += 1
    return folded


def trace_streamed(model, info, name: str, spec, weights, precision: str, verbose: bool = False):
    """The ONNX program of graph ``name`` traced on the meta device, every weight a LazyTensor."""
    import onnx_ir as ir

    dtype = PRECISION_DTYPES[precision]
    gm = GRAPH_MODULES[name](model).eval()
    sources = _sources(gm, model, weights, dtype)
    traced = copy.deepcopy(gm).to("meta")  # real buffers are copied (small), then everything is meta
    for p in traced.parameters():  # the parameters in the precision's dtype (buffers such as inv_freq keep theirs)
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    if dtype != torch.float32:
        traced = CastIO(traced, dtype, kv_outputs=name == "llm")
        sources = {f"inner.{k}": v for k, v in sources.items()}
    args = example_inputs(name, info)
    if name == "llm" and dtype != torch.float32:
        args = (args[0], tuple((k.to(dtype), v.to(dtype)) for k, v in args[1]))
    args = torch.utils._pytree.tree_map(lambda t: t.to("meta"), args)
    shapes = dynamic_shapes(name, spec, args)
    if dtype != torch.float32:
        shapes = (shapes,)  # CastIO.forward(*args): one varargs entry
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    with quiet, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for logger in QUIET_LOGGERS:
            logging.getLogger(logger).setLevel(logging.ERROR)
        prog = torch.onnx.export(traced, args, dynamo=True, opset_version=OPSETS.get(precision, DEFAULT_OPSET),
                                 optimize=False,
                                 dynamic_shapes=shapes,
                                 input_names=[t.name for t in spec.inputs],
                                 output_names=[t.name for t in spec.outputs], verbose=False)
    graph = prog.model.graph
    missing = []
    for iname, value in graph.initializers.items():
        if iname in sources:
            value.const_value = _make_lazy(value.const_value, sources[iname], iname)
        elif getattr(getattr(value.const_value, "raw", None), "is_meta", False):
            missing.append(iname)
    if missing:
        raise RuntimeError(f"internal: graph {name} has meta initializers without a source: {missing[:5]}")
    fold_weight_transposes(graph)
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog.optimize()
    ir.passes.common.RemoveUnusedNodesPass()(prog.model)
    return prog


def save_streamed(model_ir, path: Path, external: bool) -> None:
    """Write the graph, its weights into ``<graph>.onnx.data`` one tensor at a time when ``external``."""
    import onnx_ir as ir

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        ir.save(model_ir, str(path), external_data=data.name)
    else:
        ir.save(model_ir, str(path))
    match_mode(path)


def weight_bytes(model_ir) -> int:
    return sum(v.const_value.nbytes for v in model_ir.graph.initializers.values() if v.const_value is not None)
