"""The ``trtexec`` command line equivalent to a build plan (``segllm-edge build-engines --print-trtexec``).

For users who build with NVIDIA's own tool (or need to reproduce a build for a bug report). The command
builds the same network as :func:`.builder.build_engines` for one graph: its profiles (one
``--minShapes/--optShapes/--maxShapes`` triple per profile), precision (``--fp16``/``--bf16``/... with
``--precisionConstraints=obey --layerPrecisions`` for the fp32 islands on TensorRT 10; ``--stronglyTyped``
on the typed graph on TensorRT 11), the KV cache I/O types, the workspace, TF32 and the timing cache.
Layer names given to ``--layerPrecisions`` are the ONNX node names (TensorRT's parser names layers after
them; a node that became several layers may need a ``*`` wildcard).
"""
from __future__ import annotations

import shlex
from pathlib import Path

_IO_FORMAT = {None: "fp32", "HALF": "fp16", "BF16": "bf16"}


def _shape(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def trtexec_command(plan, spec, options, strong: bool, engine: Path, onnx_path: Path | None = None,
                    timing_cache: Path | None = None) -> list[str]:
    """argv of ``trtexec`` for one GraphPlan (``spec``: its manifest GraphSpec; ``onnx_path``: the file the
    network is parsed from, the typed copy for strongly typed builds)."""
    from ...contracts.engine_profiles import input_shapes

    cmd = ["trtexec", f"--onnx={onnx_path or plan.onnx}", f"--saveEngine={engine}"]
    if strong:
        cmd.append("--stronglyTyped")
    else:
        cmd += [f"--{f.lower()}" for f in plan.flags if f != "TF32"]
    if "TF32" not in plan.flags and not options.tf32:
        cmd.append("--noTF32")
    dynamic = any(isinstance(d, str) for t in spec.inputs for d in t.shape)
    if dynamic:
        for prof in plan.profiles:
            shapes = input_shapes(spec, prof)
            for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
                cmd.append(f"{flag}=" + ",".join(f"{n}:{_shape(s[i])}" for n, s in shapes.items()))
    if plan.fp32_nodes and not strong:
        cmd += ["--precisionConstraints=obey",
                "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in sorted(plan.fp32_nodes)),
                "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in sorted(plan.fp32_nodes))]
    if plan.kv_dtype and not strong:
        def fmt(t):
            return f"{_IO_FORMAT[plan.kv_dtype if t.name.startswith(('past_key_values.', 'present.')) else None]}:chw"
        cmd += ["--inputIOFormats=" + ",".join(fmt(t) for t in spec.inputs),
                "--outputIOFormats=" + ",".join(fmt(t) for t in spec.outputs)]
    cmd.append(f"--memPoolSize=workspace:{int(options.workspace_gb * 1024)}M")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def format_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def print_commands(export_dir, precision: str, options, out_dir=None) -> list[str]:
    """One trtexec command per planned graph (TensorRT 11's strongly typed form when the installed tensorrt is
    11 or later, or ``options.strongly_typed``; TensorRT 10's flags otherwise, also when none is installed)."""
    from ...contracts.manifest import Manifest
    from .builder import DEFAULT_ENGINES_SUBDIR, plan_build
    from ...contracts.engines import STRONG, api_generation

    try:
        import tensorrt as trt

        version = str(trt.__version__)
    except (ImportError, OSError):
        version = None
    strong = options.strongly_typed or (version is not None and api_generation(version) == STRONG)
    folder = Path(export_dir)
    out = Path(out_dir) if out_dir else folder / DEFAULT_ENGINES_SUBDIR
    manifest = Manifest.load(folder)
    lines = [f"# TensorRT {version or '10 (none installed here)'}: "
             f"{'strongly typed' if strong else 'weakly typed (precision flags)'} builds"]
    for plan in plan_build(folder, precision, options):
        src = plan.onnx
        if strong and not options.strongly_typed and plan.precision != "fp32" and not plan.has_qdq:
            src = out / "typed" / f"{plan.graph}.fp16.onnx"
            lines.append(f"# {plan.graph}: parse the typed copy written by `segllm-edge build-engines` ({src})")
        argv = trtexec_command(plan, manifest.graphs[plan.graph], options, strong,
                               engine=out / f"{plan.graph}.{plan.precision}.plan", onnx_path=src,
                               timing_cache=out / "timing.cache")
        lines.append(format_command(argv))
    return lines
