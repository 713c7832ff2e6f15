"""Build TensorRT engines from a segllm-edge ONNX export (TensorRT 10.x Python API).

``build_engines(export_dir, precision)`` parses every manifest graph with TensorRT's ONNX parser,
adds the optimisation profiles of :mod:`.profiles`, sets the precision flags, pins the layers that
need fp32 for parity, reuses a per-device timing cache, and writes ``<key>.plan`` engines with JSON
sidecars (:mod:`.cache`) plus ``llm_bos_prefix.npz`` (see :mod:`.profiles`, empty KV cache).

Precisions (what this module does vs. what is documented only — see docs/tensorrt.md):

* ``fp16`` / ``bf16``: implemented — builder flag on the CLIP, LLM and seg-head graphs; norms, softmax
  and RoPE (the ops the onnxruntime fp16 export keeps fp32) pinned to fp32; the HIPIE graphs
  (``mask_backbone``, ``mask_decoder``) built fp32 with TF32 off, as the research code runs them.
* ``int8`` / ``fp8``: explicit quantization only — the graphs must carry QuantizeLinear/DequantizeLinear
  nodes (NVIDIA TensorRT Model Optimizer, ``modelopt.onnx.quantization``). Graphs without Q/DQ are
  built fp16; the ``llm`` graph without Q/DQ is refused. The onnxruntime int8/int4 exports of
  ``segllm-edge export`` (DynamicQuantizeLinear/MatMulInteger, com.microsoft MatMulNBits) cannot be
  parsed by TensorRT. FP8 needs compute capability >= 8.9 (not Jetson Orin, sm_87).
* INT4 weight-only LLM: not built here; use TensorRT-LLM (or a ModelOpt INT4-AWQ Q/DQ graph).

Nothing in this module has been run against a real TensorRT in this project (none is installable
here); the pure-Python parts (op check, profiles, plan, BOS prefix, cache keys) are tested on CI.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...contracts.engines import BOS_PREFIX_FILE, DEFAULT_ENGINES_SUBDIR, STRONG, api_generation, require_tensorrt
from ...contracts.precisions import ENGINE_PRECISIONS as PRECISIONS
from ...errors import BackendError, CheckpointError
from .bos_prefix import write_bos_prefix

DEFORM_ATTN_MODES = ("gridsample", "plugin")
DEFAULT_FP32_GRAPHS = ("mask_backbone", "mask_decoder")   # HIPIE: fp32 in the research code too


# Whole modules kept fp32 (dynamo export scopes): op types alone leave the RMSNorm's ``+ eps`` and
# ``x * rsqrt`` and RoPE's ``position * inv_freq`` free to run fp16 — and fp16 has a spacing of 1 to 2
# above position 1024..2048, so RoPE angles would be off by up to a radian late in the context.
FP32_SCOPES = ("scope:*rotary_emb", "scope:*layernorm", "scope:*.norm")


def default_fp32_patterns() -> tuple[str, ...]:
    """Node patterns kept fp32 in fp16/bf16 graphs: the ops the onnxruntime fp16 export keeps fp32
    (one source of truth, :data:`segllm_edge.export.quantize.FP16_KEEP_FP32_OPS`) plus the LLM's
    norm and rotary-embedding modules (:data:`FP32_SCOPES`)."""
    from ..quantize import FP16_KEEP_FP32_OPS

    return tuple(f"op:{op}" for op in FP16_KEEP_FP32_OPS) + FP32_SCOPES


# --------------------------------------------------------------------------------------------- planning
@dataclass
class BuildOptions:
    workspace_gb: float = 8.0
    fp32_graphs: tuple = DEFAULT_FP32_GRAPHS
    fp32_patterns: tuple | None = None          # None → default_fp32_patterns()
    tf32: bool = False                          # TF32 in fp32 layers (off: parity with the fp32 reference)
    deform_attn: str = "gridsample"             # or "plugin" (graph must carry MultiscaleDeformableAttnPlugin_TRT)
    strongly_typed: bool = False                # TensorRT strongly-typed networks (ModelOpt FP8 graphs)
    max_batch: int | None = None
    max_masks: int | None = None
    max_seg: int | None = None
    empty_past: str = "bos_prefix"
    kv_cache_dtype: str = "auto"                # llm KV cache I/O: "auto" = the engine's precision, or "fp32"
    graphs: tuple | None = None                 # subset of the manifest's graphs
    check_ops: bool = True

    def hash(self, graph: str) -> str:
        d = asdict(self)
        d["fp32_patterns"] = list(self.fp32_patterns or default_fp32_patterns())
        d["fp32_graph"] = graph in self.fp32_graphs
        for k in ("graphs", "check_ops", "max_batch", "max_masks", "max_seg", "workspace_gb", "fp32_graphs"):
            d.pop(k)  # profiles are hashed separately; workspace does not change the plan's semantics
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class GraphPlan:
    graph: str
    onnx: Path
    precision: str                  # what the engine is built as ("fp32" for the HIPIE graphs)
    flags: tuple                    # TensorRT builder flags to set (names of trt.BuilderFlag)
    profiles: list                  # profiles.Profile
    fp32_nodes: set = field(default_factory=set)
    has_qdq: bool = False
    issues: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    kv_dtype: str | None = None     # trt.DataType name of the llm's past/present tensors (None: as in the ONNX)


KV_DTYPES = ("auto", "fp32")


def _kv_dtype(graph: str, precision: str, options: BuildOptions) -> str | None:
    """The exported graphs' I/O is fp32 (the onnxruntime fp16 export keeps fp32 I/O too), which would make the
    KV cache twice the size it needs to be on a reduced-precision engine; "auto" stores it at the engine's
    precision (fp16, or bf16 for bf16 engines) by retyping the network's past/present tensors."""
    if graph != "llm" or options.kv_cache_dtype == "fp32" or options.strongly_typed:
        return None
    return {"fp16": "HALF", "bf16": "BF16", "int8": "HALF", "fp8": "HALF"}.get(precision)


def match_pattern(pattern: str, node) -> bool:
    """``op:<OpType>`` exact op type, ``name:<glob>`` node name, ``scope:<glob>`` torch module path
    (dynamo export metadata ``pkg.torch.onnx.name_scopes``); a bare pattern is a node-name glob."""
    kind, _, pat = pattern.partition(":") if ":" in pattern else ("name", "", pattern)
    if kind == "op":
        return node.op_type == pat
    if kind == "name":
        return fnmatch.fnmatchcase(node.name, pat)
    if kind == "scope":
        for p in node.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = json.loads(p.value.replace("'", '"'))
                except ValueError:
                    scopes = [p.value]
                return any(fnmatch.fnmatchcase(s, pat) for s in scopes if s)
        return False
    raise ValueError(f"unknown pattern kind {kind!r} in {pattern!r} (use op:, name: or scope:)")


def fp32_nodes(model, patterns) -> set[str]:
    """Names of the nodes (subgraphs included) that match any pattern."""
    from .ops import _iter_subgraphs

    out: set[str] = set()

    def walk(g):
        for n in g.node:
            if any(match_pattern(p, n) for p in patterns):
                out.add(n.name)
            for _, sub in _iter_subgraphs(n):
                walk(sub)

    walk(model.graph)
    return out


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def plan_build(export_dir, precision: str = "fp16", options: BuildOptions | None = None) -> list[GraphPlan]:
    """Everything about the build that needs no GPU: graphs, profiles, flags, fp32 nodes, op issues.
    Raises CheckpointError for a bad export and BackendError for combinations that cannot work."""
    import onnx

    from ...contracts.manifest import KV_CONCAT, Manifest
    from .ops import check_graph
    from ...contracts.engine_profiles import ProfileLimits, check_profiles, make_profiles

    options = options or BuildOptions()
    if precision not in PRECISIONS:
        raise BackendError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.deform_attn not in DEFORM_ATTN_MODES:
        raise BackendError(f"deform_attn must be one of {DEFORM_ATTN_MODES}, got {options.deform_attn!r}")
    if options.kv_cache_dtype not in KV_DTYPES:
        raise BackendError(f"kv_cache_dtype must be one of {KV_DTYPES}, got {options.kv_cache_dtype!r}")
    folder = Path(export_dir)
    manifest = Manifest.load(folder)
    manifest.check_files(folder)
    if manifest.kv_layout != KV_CONCAT and "llm" in (options.graphs or manifest.graphs):
        raise BackendError(f"{folder} holds its llm in the {manifest.kv_layout!r} KV layout "
                           "(com.microsoft.GroupQueryAttention, onnxruntime only); TensorRT engines are built from "
                           "the concat layout: build from an export without `segllm-edge convert-kv-inplace`, or "
                           "leave the llm out (graphs=...)")
    limits = ProfileLimits.from_manifest(manifest, max_batch=options.max_batch, max_masks=options.max_masks,
                                         max_seg=options.max_seg, empty_past=options.empty_past)
    profiles = make_profiles(manifest, limits)
    problems = check_profiles(manifest, profiles, limits)
    if problems:
        raise BackendError("the optimisation profiles do not cover the export: " + "; ".join(problems))
    patterns = tuple(options.fp32_patterns or default_fp32_patterns())
    names = list(options.graphs or manifest.graphs)
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise BackendError(f"unknown graph(s) {', '.join(unknown)}; the export has {', '.join(manifest.graphs)}")
    plans = []
    for name in names:
        spec = manifest.graphs[name]
        path = folder / spec.file
        model = onnx.load(str(path), load_external_data=False)
        qdq = _has_qdq(model)
        notes: list[str] = []
        if name in options.fp32_graphs:
            prec, flags, nodes = "fp32", (() if not options.tf32 else ("TF32",)), set()
            notes.append("kept fp32 (fp32_graphs)")
        elif precision in ("fp16", "bf16"):
            prec, flags, nodes = precision, (precision.upper(),), fp32_nodes(model, patterns)
        else:  # int8 / fp8: explicit quantization only
            if qdq:
                prec, flags, nodes = precision, (precision.upper(), "FP16"), fp32_nodes(model, patterns)
            elif name == "llm":
                raise BackendError(
                    f"precision {precision} needs a Q/DQ (QuantizeLinear/DequantizeLinear) llm graph, and "
                    f"{spec.file} has none. Quantize the fp32 export with NVIDIA TensorRT Model Optimizer "
                    f"(python -m modelopt.onnx.quantization --onnx_path {spec.file} --quantize_mode {precision} ...) "
                    "and build from that; the onnxruntime int8/int4 exports are not TensorRT graphs.")
            else:
                prec, flags, nodes = "fp16", ("FP16",), fp32_nodes(model, patterns)
                notes.append(f"no Q/DQ nodes: built fp16 instead of {precision}")
        if not options.tf32 and "TF32" not in flags:
            notes.append("TF32 off")
        if options.strongly_typed and prec in ("fp16", "bf16", "int8", "fp8"):
            notes.append("strongly typed network: precision flags ignored, types come from the graph")
        issues = check_graph(model) if options.check_ops else []
        if options.deform_attn == "plugin" and name == "mask_decoder":
            if not any(n.op_type == "MultiscaleDeformableAttnPlugin_TRT" for n in model.graph.node):
                raise BackendError(
                    "deform_attn='plugin' needs a mask_decoder graph with MultiscaleDeformableAttnPlugin_TRT nodes; "
                    f"{spec.file} expresses the deformable attention with GridSample (the exporter's only form). "
                    "Use deform_attn='gridsample' (TensorRT's GridSample layer), or re-export the mask decoder with the "
                    "plugin op (not implemented in segllm-edge yet; see docs/tensorrt.md).")
        kv = _kv_dtype(name, prec, options)
        if kv:
            notes.append(f"KV cache I/O {'bf16' if kv == 'BF16' else 'fp16'}")
        plans.append(GraphPlan(name, path, prec, tuple(flags), profiles[name], nodes, qdq, issues, notes, kv))
    return plans


# ------------------------------------------------------------------------------------------- building
def _timing_cache_path(out: Path, device) -> Path:
    gpu = re.sub(r"[^a-z0-9]+", "-", device.gpu_name.lower()).strip("-")
    return out / f"timing.{gpu}.{device.sm}.trt{device.trt_version}.cache"


def _layer_node(layer) -> str:
    """The ONNX node a TensorRT layer came from: TensorRT 10's parser writes '[ONNX Layer: <node> | ...]'
    into the layer metadata; the layer name (node name, uniquified) is the fallback."""
    meta = getattr(layer, "metadata", "") or ""
    m = re.search(r"\[ONNX Layer: ([^|\]]+)", meta)
    return m.group(1).strip() if m else layer.name


def strongly_typed(trt, options: BuildOptions) -> bool:
    """Strongly typed networks: asked for, or the only kind this TensorRT builds (11 and later)."""
    return options.strongly_typed or api_generation(trt.__version__) == STRONG


def _build_one(trt, logger, plan: GraphPlan, device, options: BuildOptions, timing_blob: bytes | None,
               out: Path | None = None):
    from ...contracts.engine_profiles import input_shapes
    from ...contracts.manifest import Manifest

    flags = 0
    strong = strongly_typed(trt, options)
    source = plan.onnx
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if not options.strongly_typed:  # TensorRT 11: the precision has to be in the graph's types
            from .typed_graph import typed_graph

            source = typed_graph(plan, out or plan.onnx.parent / DEFAULT_ENGINES_SUBDIR)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):  # resolves external data next to the file
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT's ONNX parser rejected {source.name}:\n  " + "\n  ".join(errs))
    if plan.kv_dtype and not strong:  # network inputs/outputs may be retyped in weakly typed networks
        kv_type = getattr(trt, {"HALF": "float16", "BF16": "bfloat16"}[plan.kv_dtype])
        io = [network.get_input(i) for i in range(network.num_inputs)] + \
             [network.get_output(i) for i in range(network.num_outputs)]
        for t in io:
            if t.name.startswith(("past_key_values.", "present.")):
                t.dtype = kv_type
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not strong:
        for f in plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, f))
    if "TF32" not in plan.flags and not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if plan.fp32_nodes and not strong:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if _layer_node(layer) not in plan.fp32_nodes:
                continue
            outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
            if not outs:
                continue
            layer.precision = trt.float32
            for j in outs:
                layer.set_output_type(j, trt.float32)
            pinned += 1
    spec = Manifest.load(plan.onnx.parent).graphs[plan.graph]
    dynamic = any(isinstance(d, str) for t in spec.inputs for d in t.shape)
    if dynamic:
        for prof in plan.profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in input_shapes(spec, prof).items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_blob or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine for {plan.graph} (see the TensorRT log above; "
                           f"try a larger --workspace-gb)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize()), time.perf_counter() - t0, pinned


def build_engines(export_dir, precision: str = "fp16", out_dir=None, workspace_gb: float = 8.0, force: bool = False,
                  options: BuildOptions | None = None, verbose: bool = False, log=print) -> dict[str, Path]:
    """Build (or reuse from the cache) one engine per manifest graph; returns graph → engine path.

    ``out_dir`` defaults to ``<export_dir>/engines``. An engine whose key (GPU, compute capability,
    TensorRT version, precision, ONNX sha256, profiles, options) matches is reused unless ``force``.
    Raises BackendError when TensorRT or a GPU is missing, or the graphs cannot be built.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    trt = require_tensorrt()  # before anything slow: the plain message is the point
    options = options or BuildOptions()
    options.workspace_gb = workspace_gb
    from ...contracts.engines import EngineKey, current_device, engine_path, file_sha256, file_stamp, write_sidecar
    from ...contracts.engine_profiles import profile_hash, profiles_to_json

    device = current_device()
    if precision == "bf16" and tuple(device.compute_capability) < (8, 0):
        raise BackendError(f"bf16 needs compute capability >= 8.0; this is {device.describe()}: use fp16")
    if precision == "fp8" and tuple(device.compute_capability) < (8, 9):
        raise BackendError(f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this is {device.describe()}: "
                           "use int8 (Q/DQ) or fp16")
    plans = plan_build(export_dir, precision, options)
    blocking = [(p.graph, i) for p in plans for i in p.issues if i.severity == "error"]
    if blocking:
        lines = "\n  ".join(f"{g}: {i}" for g, i in blocking)
        raise BackendError(f"the graphs use operators TensorRT cannot import:\n  {lines}")
    out = Path(out_dir) if out_dir else Path(export_dir) / DEFAULT_ENGINES_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    if any(p.graph == "llm" for p in plans) and options.empty_past == "bos_prefix":
        # before the (long) engine builds: it needs onnxruntime, and a missing one should fail in seconds
        import numpy as np

        bos = out / BOS_PREFIX_FILE
        llm_sha = file_sha256(next(p.onnx for p in plans if p.graph == "llm"))
        stale = not bos.is_file() or str(np.load(bos)["onnx_sha256"]) != llm_sha
        if force or stale:
            write_bos_prefix(export_dir, bos)
            log(f"{'llm':15s} BOS prefix written  {bos.name}")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    tc_path = _timing_cache_path(out, device)
    timing = tc_path.read_bytes() if tc_path.is_file() else None
    built: dict[str, Path] = {}
    for plan in plans:
        sha = file_sha256(plan.onnx)
        key = EngineKey.for_device(plan.graph, plan.precision, device, sha, profile_hash(plan.profiles),
                                   options.hash(plan.graph))
        path = engine_path(out, key)
        if path.is_file() and not force:
            log(f"{plan.graph:15s} cached  {path.name}")
            built[plan.graph] = path
            continue
        log(f"{plan.graph:15s} building ({plan.precision}{', ' + '; '.join(plan.notes) if plan.notes else ''}) …")
        blob, timing, secs, pinned = _build_one(trt, logger, plan, device, options, timing, out)
        tmp = path.with_suffix(".plan.tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        write_sidecar(path, key, onnx_file=plan.onnx.name, onnx_stamp=file_stamp(plan.onnx),
                      profiles=profiles_to_json({plan.graph: plan.profiles})[plan.graph],
                      flags=[] if strongly_typed(trt, options) else list(plan.flags), fp32_layers_pinned=pinned,
                      typing="strong" if strongly_typed(trt, options) else "weak", notes=plan.notes, kv_dtype=plan.kv_dtype,
                      build_seconds=round(secs, 1), engine_bytes=len(blob), built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        tc_path.write_bytes(timing)
        log(f"{plan.graph:15s} built in {secs:.0f}s  {path.name} ({len(blob) / 1e6:.1f} MB)")
        built[plan.graph] = path
    return built


def publish_for_triton(export_dir, built: dict, empty_past: str = "bos_prefix", log=print) -> dict[str, Path]:
    """Link the engines where ``segllm-edge triton-repo --target ngc`` looks for them,
    ``<export>/tensorrt/<graph>.plan`` (it then writes a ``tensorrt_plan`` model for that graph).

    The ``llm`` engine is left out with ``empty_past='bos_prefix'``: the Triton round loop (the ``segllm``
    BLS model) feeds the llm model an empty KV cache on a conversation's first round, which such an
    engine does not accept, so the llm stays an onnxruntime model there. It is also left out when its KV
    cache I/O was retyped (``kv_cache_dtype='auto'``): the generated config declares the manifest's fp32."""
    import os
    import shutil

    from ...contracts.engines import read_sidecar

    folder = Path(export_dir) / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    linked: dict[str, Path] = {}
    for graph, engine in built.items():
        if graph == "llm" and empty_past == "bos_prefix":
            log(f"{graph:15s} not linked for Triton (bos_prefix engine; the Triton round loop feeds an empty "
                "KV cache on the first round): served by onnxruntime")
            continue
        if read_sidecar(engine).get("kv_dtype"):
            log(f"{graph:15s} not linked for Triton (KV cache I/O is {read_sidecar(engine)['kv_dtype']}, the "
                "Triton config declares the manifest's float32; build with --kv-cache-dtype fp32)")
            continue
        link = folder / f"{graph}.plan"
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(os.path.relpath(Path(engine).resolve(), folder.resolve()), link)
        except OSError:  # no symlinks (some filesystems): copy
            shutil.copyfile(engine, link)
        log(f"{graph:15s} -> {link}")
        linked[graph] = link
    return linked
