"""``segllm-edge build-engines``: TensorRT engines for an export folder (registered by segllm_edge.cli)."""
from __future__ import annotations

from pathlib import Path

import click

from ...errors import SegLLMError


@click.command("build-engines")
@click.option("--export", "export_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="export folder written by `segllm-edge export` (fp32 export recommended)")
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp8", "int8"]),
              help="fp8/int8 need Q/DQ graphs (TensorRT Model Optimizer)")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="engine folder [default: EXPORT/engines]")
@click.option("--force", is_flag=True, help="rebuild engines even when a matching one is cached")
@click.option("--workspace-gb", default=8.0, show_default=True, help="TensorRT builder workspace limit")
@click.option("--graph", "graphs", multiple=True, help="build only this graph (repeatable)")
@click.option("--max-masks", type=int, default=None, help="profile max of referenced masks per call [16]")
@click.option("--max-seg", type=int, default=None, help="profile max of <seg> rows per call [16]")
@click.option("--keep-fp32", "keep_fp32", multiple=True,
              help="extra node pattern kept fp32: op:<OpType>, name:<glob> or scope:<module glob> (repeatable)")
@click.option("--hipie-fp16", is_flag=True, help="let the HIPIE graphs run reduced precision too (parity not checked)")
@click.option("--deform-attn", default="gridsample", show_default=True, type=click.Choice(["gridsample", "plugin"]))
@click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32"]),
              help="llm KV cache inputs/outputs: auto = the engine precision (half the memory of fp32)")
@click.option("--check-only", is_flag=True,
              help="only check the graphs and profiles: TensorRT's own ONNX parser support check when tensorrt is "
                   "importable, the static op table otherwise (needs no GPU)")
@click.option("--triton", "for_triton", is_flag=True,
              help="also link the engines as EXPORT/tensorrt/<graph>.plan for `segllm-edge triton-repo --target ngc` "
                   "(not the llm: see docs/tensorrt.md)")
@click.option("--print-trtexec", is_flag=True,
              help="print the equivalent trtexec command line per graph instead of building (needs no GPU)")
@click.option("--verbose", is_flag=True, help="TensorRT verbose log")
def build_engines_command(export_dir, precision, out_dir, force, workspace_gb, graphs, max_masks, max_seg, keep_fp32,
                          hipie_fp16, deform_attn, kv_cache_dtype, check_only, for_triton, print_trtexec, verbose):
    """Build TensorRT engines for the graphs of EXPORT on this machine's GPU (cached by GPU, TensorRT version,
    precision and ONNX hash)."""
    from .builder import (DEFAULT_FP32_GRAPHS, BuildOptions, build_engines, default_fp32_patterns, plan_build,
                          publish_for_triton)

    opts = BuildOptions(workspace_gb=workspace_gb, graphs=tuple(graphs) or None, max_masks=max_masks,
                        max_seg=max_seg, deform_attn=deform_attn, kv_cache_dtype=kv_cache_dtype,
                        fp32_graphs=() if hipie_fp16 else DEFAULT_FP32_GRAPHS,
                        fp32_patterns=default_fp32_patterns() + tuple(keep_fp32))
    try:
        if print_trtexec:
            from .trtexec import print_commands

            for line in print_commands(export_dir, precision, opts, out_dir):
                click.echo(line)
            return
        if check_only:
            plans = plan_build(export_dir, precision, opts)
            bad = 0
            for p in plans:
                errs = [i for i in p.issues if i.severity == "error"]
                bad += len(errs)
                status = "ok" if not errs else f"{len(errs)} error(s)"
                prof = "; ".join(f"{pr.name}: " + ", ".join(f"{a} {r.min}/{r.opt}/{r.max}" for a, r in pr.axes.items())
                                 for pr in p.profiles) or "static shapes"
                click.echo(f"{p.graph:15s} {p.precision:5s} {status:12s} fp32 nodes {len(p.fp32_nodes):4d}  {prof}")
                for i in p.issues:
                    click.echo(f"    {i}")
            from .support import parser_support

            parsed = parser_support(plans)  # None: tensorrt is not importable here
            for graph, problems in (parsed or {}).items():
                bad += len(problems)
                for problem in problems:
                    click.echo(f"{graph:15s} TensorRT parser: {problem}")
            if bad:
                raise click.ClickException(f"{bad} operator issue(s) TensorRT cannot import")
            click.echo("graphs and profiles check out" + (" (TensorRT's ONNX parser supports every graph)" if parsed
                       is not None else " (static op table; TensorRT is not installed here, so no parser check)"))
            return
        built = build_engines(export_dir, precision, out_dir=out_dir, workspace_gb=workspace_gb, force=force,
                              options=opts, verbose=verbose, log=click.echo)
        if for_triton:
            publish_for_triton(export_dir, built, opts.empty_past, log=click.echo)
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{len(built)} engine(s) in {Path(next(iter(built.values()))).parent if built else out_dir}")
