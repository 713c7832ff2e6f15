"""What TensorRT's ONNX parser (TensorRT 10.x) accepts, and a checker for exported graphs.

:data:`SUPPORTED_OPS` declares the default-domain ONNX operators the ONNX-TensorRT importer of
TensorRT 10.0/10.1 has an importer for, with the conditions under which the import succeeds
(summarised from ``onnx-tensorrt/docs/operators.md`` and the importer source of the 10.1 GA release).
:func:`check_graph` walks every node of a model — subgraphs of ``If``/``Loop``/``Scan`` and
model-local functions included — and reports unsupported operators and unsupported attribute or
input combinations by node name, before anyone spends an hour on a GPU finding out.

This is a static check. It has not been validated against a real TensorRT parser in this project
(no TensorRT is installable here); a clean report means "nothing known to fail", not "parses".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TRT_VERSION_DOCUMENTED = "10.1"
OPSET_RANGE = (9, 20)  # ONNX-TensorRT 10.0/10.1: opset 9..20 of the default domain
TOPK_MAX_K = 3840      # documented limit of TensorRT 10.0/10.1's TopK
NONZERO_OUTPUT_NOTE = ("data-dependent output shape: TensorRT needs an output allocator for it (or the op must be "
                       "consumed inside the graph)")

# Default-domain operators with an importer, and the condition under which it imports ("" = none known).
# Types are not listed: every op takes FP32/FP16 (most BF16 too); INT32/INT64/BOOL where the op is integer-valued.
SUPPORTED_OPS: dict[str, str] = {
    **{op: "" for op in (
        "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization Cast CastLike Ceil Celu "
        "Clip Concat ConstantOfShape Conv ConvTranspose Cos Cosh DepthToSpace Div Einsum Elu Equal Erf Exp "
        "Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool "
        "GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity ImageScaler "
        "InstanceNormalization IsInf IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax LRN LpNormalization "
        "MatMul Max Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression Not Or "
        "ParametricSoftplus Pow PRelu RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range "
        "Reciprocal Relu Reshape ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements "
        "Selu Shape Shrink Sigmoid Sign Sin Sinh Size Softmax Softplus Softsign SpaceToDepth Split Sqrt Sub "
        "Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu Upsample Where Xor").split()},
    "AveragePool": "2-D or 3-D pooling only; dilations empty or all ones",
    "Constant": "sparse_value / value_string / value_strings unsupported",
    "CumSum": "axis must be a build-time constant",
    "DeformConv": "1-D or 2-D spatial input; symmetric pads",
    "DequantizeLinear": "INT8/FP8/INT4 input; zero point must be 0 (explicit quantization, Q/DQ)",
    "Dropout": "inference only (training_mode constant False)",
    "EyeLike": "input must have static dimensions",
    "GridSample": "4-D input and grid (N,C,H,W); mode bilinear/nearest/bicubic (opset 16 names); any padding_mode",
    "GRU": "bidirectional: same activations both directions",
    "Hardmax": "the axis dimension must be a build-time constant",
    "If": "both branches' outputs of equal rank and distinct names",
    "LayerNormalization": "only the first output (Y)",
    "Loop": "scan outputs of static length; loop-carried shapes fixed across iterations",
    "LpPool": "dilations empty or all ones",
    "LSTM": "bidirectional: same activations; input_forget=0; layout=0",
    "MaxPool": "2-D or 3-D only; no Indices output; dilations empty or all ones",
    "NonZero": "FP32/FP16/BF16/INT32/INT64/INT8/BOOL input; " + NONZERO_OUTPUT_NOTE,
    "OneHot": "depth must be a build-time constant",
    "Pad": "axes input must be a build-time constant",
    "QuantizeLinear": "zero point must be 0 (explicit quantization, Q/DQ)",
    "ReduceL1": "axes must be a build-time constant", "ReduceL2": "axes must be a build-time constant",
    "ReduceLogSum": "axes must be a build-time constant", "ReduceLogSumExp": "axes must be a build-time constant",
    "ReduceMax": "axes must be a build-time constant", "ReduceMean": "axes must be a build-time constant",
    "ReduceMin": "axes must be a build-time constant", "ReduceProd": "axes must be a build-time constant",
    "ReduceSum": "axes must be a build-time constant", "ReduceSumSquare": "axes must be a build-time constant",
    "Resize": ("modes nearest/linear (cubic undocumented); coordinate transforms half_pixel, pytorch_half_pixel, "
               "tf_half_pixel_for_nn, asymmetric, align_corners; keep_aspect_ratio_policy stretch; no antialias"),
    "ScatterND": "no reduction",
    "Slice": "axes must be a build-time constant",
    "Squeeze": "axes must be a build-time constant",
    "TopK": f"sorted=1; K < {TOPK_MAX_K}",
    "Unsqueeze": "axes must be a build-time constant",
}

# Default-domain operators TensorRT 10.0/10.1 documents as unsupported (no importer).
UNSUPPORTED_OPS = frozenset((
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im "
    "CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow "
    "HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
    "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul "
    "RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength "
    "SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit "
    "TfIdfVectorizer Unique").split())

# Custom-domain nodes the parser hands to a registered plugin creator (by op_type) — present in TensorRT's
# open-source plugin library (libnvinfer_plugin), which must be loaded (trt.init_libnvinfer_plugins).
KNOWN_PLUGINS = {
    "MultiscaleDeformableAttnPlugin_TRT": "TensorRT OSS multi-scale deformable attention plugin "
                                          "(value, spatial_shapes, level_start_index, sampling_locations, "
                                          "attention_weights) → (N, Lq, M*D)",
}

_CONST_AXES_INPUT = {  # op → index of the input that must be a build-time constant (opset-dependent inputs)
    "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
_RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_NONZERO_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "INT8", "BOOL"}


@dataclass(frozen=True)
class Issue:
    """One finding of :func:`check_graph`. ``severity``: ``error`` (the parser will reject it or compute
    something else), ``warning`` (may fail or need runtime support), ``info`` (needs something extra)."""

    severity: str
    node: str           # node name ("" for model-level findings)
    op: str             # "Domain::OpType" for custom domains, "OpType" otherwise ("" for model-level)
    message: str
    where: str = "graph"  # "graph", "graph/If:node_x/then_branch", "function:Name", ...

    def __str__(self) -> str:
        who = f"{self.op} node {self.node!r}" if self.node else "model"
        return f"[{self.severity}] {who} ({self.where}): {self.message}"


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        # weights are not needed to check ops; external data stays on disk
        return onnx.load(str(model_or_path), load_external_data=False)
    return model_or_path


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _iter_subgraphs(node) -> Iterator[tuple[str, object]]:
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def _const_values(graph, outer: dict) -> dict:
    """name → numpy value (or None when constant but unreadable) for initializers and Constant outputs."""
    from onnx import numpy_helper

    consts = dict(outer)
    for init in graph.initializer:
        try:
            consts[init.name] = numpy_helper.to_array(init) if not init.external_data else None
        except Exception:  # noqa: BLE001 - external or exotic storage: constant, value unknown
            consts[init.name] = None
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    try:
                        consts[n.output[0]] = numpy_helper.to_array(a.t)
                    except Exception:  # noqa: BLE001
                        consts[n.output[0]] = None
                elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    consts[n.output[0]] = _attrs(n)[a.name]
    return consts


def _elem_types(model) -> dict[str, str]:
    """Tensor name → ONNX element type name, from shape inference where it works (best effort)."""
    import onnx

    types: dict[str, str] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is optional
        inferred = model
    g = inferred.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
    for init in g.initializer:
        types[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
    return types


def _ranks(model) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001
        inferred = model
    g = inferred.graph
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in (*g.input, *g.output, *g.value_info)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def _check_node(node, consts: dict, types: dict, ranks: dict, opset: int, local_functions: set,
                where: str) -> list[Issue]:
    op, dom = node.op_type, node.domain
    name = node.name or f"<unnamed {op} → {node.output[0] if node.output else '?'}>"
    issues: list[Issue] = []

    def add(sev, msg):
        issues.append(Issue(sev, name, op if dom in ("", "ai.onnx") else f"{dom}::{op}", msg, where))

    if (dom, op) in local_functions:
        return issues  # its body is checked separately (the parser imports local functions node by node)
    if dom not in ("", "ai.onnx"):
        if op in KNOWN_PLUGINS:
            add("info", f"TensorRT plugin node: needs libnvinfer_plugin loaded at build and run time "
                        f"({KNOWN_PLUGINS[op]})")
        elif dom == "com.microsoft":
            add("error", "onnxruntime contrib operator: TensorRT's ONNX parser has no importer for it "
                         "(build engines from the fp32/fp16 export, or from a ModelOpt Q/DQ graph for int8/fp8/int4)")
        else:
            add("error", f"custom-domain operator {dom!r}: TensorRT imports it only if a plugin named {op!r} "
                         "is registered")
        return issues
    if op in UNSUPPORTED_OPS:
        add("error", f"not supported by TensorRT {TRT_VERSION_DOCUMENTED}'s ONNX parser")
        return issues
    if op not in SUPPORTED_OPS:
        add("error", f"no TensorRT {TRT_VERSION_DOCUMENTED} importer for {op!r} (not in the declared op list)")
        return issues

    a = _attrs(node)
    inputs = list(node.input)

    def is_const(i: int) -> bool:
        return i < len(inputs) and (inputs[i] == "" or inputs[i] in consts)

    idx = _CONST_AXES_INPUT.get(op)
    if idx is not None and idx < len(inputs) and inputs[idx] and not is_const(idx):
        what = "axis" if op == "CumSum" else "axes"
        add("error", f"input {idx} ({what}) {inputs[idx]!r} is computed at run time; TensorRT needs a constant")

    if op == "GridSample":
        mode = a.get("mode", "bilinear")
        if mode in ("linear", "cubic"):
            add("error", f"mode={mode!r} is the opset-20 spelling; the TensorRT 10.1 importer reads only "
                         "'bilinear'/'nearest'/'bicubic' and silently falls back to nearest for others — "
                         "export with opset 16..19")
        elif mode not in ("bilinear", "nearest", "bicubic"):
            add("error", f"unknown mode {mode!r}")
        if a.get("padding_mode", "zeros") not in ("zeros", "border", "reflection"):
            add("error", f"unknown padding_mode {a['padding_mode']!r}")
        for i in (0, 1):
            r = ranks.get(inputs[i]) if i < len(inputs) else None
            if r is not None and r != 4:
                add("error", f"input {i} has rank {r}: TensorRT's GridSample layer is 4-D only")
        if opset < 16:
            add("error", f"GridSample needs opset >= 16 (model has {opset})")
    elif op == "TopK":
        if a.get("sorted", 1) != 1:
            add("error", "sorted=0 is not supported")
        if is_const(1) and consts.get(inputs[1]) is not None:
            import numpy as np

            k = int(np.asarray(consts[inputs[1]]).reshape(-1)[0])
            if k >= TOPK_MAX_K:
                add("error", f"K={k} >= {TOPK_MAX_K}, over TensorRT's TopK limit")
        elif len(inputs) > 1:
            add("warning", f"K is computed at run time: TensorRT 10 accepts a dynamic K but it must stay < {TOPK_MAX_K}")
    elif op == "NonZero":
        t = types.get(inputs[0]) if inputs else None
        if t is not None and t not in _NONZERO_TYPES:
            add("error", f"input type {t} is not supported (allowed: {', '.join(sorted(_NONZERO_TYPES))})")
        add("warning", NONZERO_OUTPUT_NOTE)
    elif op == "Resize":
        mode = a.get("mode", "nearest")
        if mode == "cubic":
            add("warning", "mode='cubic': TensorRT's operator table documents nearest and linear only "
                           "(the resize layer has a cubic mode; not verified here)")
        elif mode not in ("nearest", "linear"):
            add("error", f"mode={mode!r} unsupported (nearest or linear)")
        if opset >= 11 and a.get("coordinate_transformation_mode", "half_pixel") not in _RESIZE_TRANSFORMS:
            add("error", f"coordinate_transformation_mode={a['coordinate_transformation_mode']!r} unsupported")
        if a.get("antialias", 0):
            add("error", "antialias=1 is not supported")
        if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            add("error", f"keep_aspect_ratio_policy={a['keep_aspect_ratio_policy']!r} unsupported (stretch only)")
    elif op == "ScatterND":
        if a.get("reduction", "none") != "none":
            add("error", f"reduction={a['reduction']!r} unsupported")
    elif op == "LayerNormalization":
        if len([o for o in node.output if o]) > 1:
            add("error", "only output Y is supported (Mean / InvStdDev outputs are used)")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            add("error", "the Indices output is not supported")
        if any(d != 1 for d in a.get("dilations", [])):
            add("error", f"dilations={a['dilations']} unsupported (all ones only)")
        ks = a.get("kernel_shape")
        if ks is not None and len(ks) not in (2, 3):
            add("error", f"{len(ks)}-D pooling unsupported (2-D or 3-D only)")
    elif op == "Einsum":
        eq = a.get("equation", "").replace(" ", "")
        if "..." in eq:
            add("error", f"equation {eq!r}: ellipsis is not supported by TensorRT {TRT_VERSION_DOCUMENTED}'s Einsum")
        for term in eq.split("->")[0].split(","):
            letters = term.replace("...", "")
            if len(set(letters)) != len(letters):
                add("error", f"equation {eq!r}: repeated subscript in {term!r} (diagonal) is not supported")
    elif op == "Constant":
        for bad in ("sparse_value", "value_string", "value_strings"):
            if bad in a:
                add("error", f"attribute {bad} is not supported")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        if len(inputs) > 2 and inputs[2] and inputs[2] in consts and consts[inputs[2]] is not None:
            import numpy as np

            if np.any(np.asarray(consts[inputs[2]]).astype(np.float64) != 0):
                add("error", "non-zero zero point: TensorRT supports symmetric quantization only")
    elif op == "Dropout":
        if len(inputs) > 2 and inputs[2] and not is_const(2):
            add("warning", "training_mode is computed at run time; it must be constant False")
    elif op == "LSTM":
        if a.get("input_forget", 0) or a.get("layout", 0):
            add("error", "input_forget and layout must be 0")
    elif op == "Cast":
        import onnx

        to = onnx.TensorProto.DataType.Name(a.get("to", 1))
        if to in ("STRING", "COMPLEX64", "COMPLEX128"):
            add("error", f"cast to {to} unsupported")
        elif to == "DOUBLE":
            add("warning", "cast to DOUBLE: TensorRT computes it as FLOAT")
    return issues


def _walk(graph, consts_outer: dict, types, ranks, opset, local_functions, where) -> list[Issue]:
    issues: list[Issue] = []
    consts = _const_values(graph, consts_outer)
    for node in graph.node:
        issues += _check_node(node, consts, types, ranks, opset, local_functions, where)
        for attr_name, sub in _iter_subgraphs(node):
            issues += _walk(sub, consts, types, ranks, opset, local_functions,
                            f"{where}/{node.op_type}:{node.name}/{attr_name}")
    return issues


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_graph(onnx_path_or_model) -> list[Issue]:
    """Static TensorRT-compatibility check of an ONNX model (path or ``onnx.ModelProto``).

    Returns issues sorted errors first; an empty list means nothing known to be unsupported.
    """
    import onnx

    model = _load(onnx_path_or_model)
    opset = default_opset(model)
    issues: list[Issue] = []
    lo, hi = OPSET_RANGE
    if opset and opset < lo:
        issues.append(Issue("error", "", "", f"default-domain opset {opset} is below {lo}", "model"))
    elif opset > hi:
        issues.append(Issue("warning", "", "", f"default-domain opset {opset} is newer than TensorRT "
                                               f"{TRT_VERSION_DOCUMENTED} documents ({lo}..{hi})", "model"))
    types = _elem_types(model)
    ranks = _ranks(model)
    for vi in (*model.graph.input, *model.graph.output):
        t = types.get(vi.name)
        if t in ("STRING", "COMPLEX64", "COMPLEX128"):
            issues.append(Issue("error", "", "", f"graph I/O {vi.name!r} has type {t}", "model"))
        elif t == "DOUBLE":
            issues.append(Issue("warning", "", "", f"graph I/O {vi.name!r} is DOUBLE (TensorRT casts to FLOAT)",
                                "model"))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            issues.append(Issue("warning", "", "", f"initializer {init.name!r} is DOUBLE (cast to FLOAT)", "model"))
    local = {(f.domain, f.name) for f in model.functions}
    issues += _walk(model.graph, {}, types, ranks, opset, local, "graph")
    for f in model.functions:
        fake_graph = onnx.helper.make_graph(list(f.node), f.name, [], [])
        issues += _walk(fake_graph, {}, types, ranks, opset, local, f"function:{f.domain}:{f.name}")
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(issues, key=lambda i: order.get(i.severity, 3))


def errors(issues: Iterable[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == "error"]


def op_inventory(onnx_path_or_model) -> dict[str, int]:
    """Operator counts (``Domain::Op`` for custom domains), subgraphs and local functions included."""
    from collections import Counter

    model = _load(onnx_path_or_model)
    c: Counter = Counter()

    def walk(g):
        for n in g.node:
            c[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
            for _, sub in _iter_subgraphs(n):
                walk(sub)

    walk(model.graph)
    for f in model.functions:
        for n in f.node:
            c[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
    return dict(sorted(c.items()))


def check_export(export_dir) -> dict[str, list[Issue]]:
    """:func:`check_graph` on every graph of an export folder (graph name → issues)."""
    from ...contracts.manifest import Manifest

    folder = Path(export_dir)
    manifest = Manifest.load(folder)
    manifest.check_files(folder)
    return {name: check_graph(folder / g.file) for name, g in manifest.graphs.items()}


def format_issues(issues: Iterable[Issue]) -> str:
    return "\n".join(str(i) for i in issues)
