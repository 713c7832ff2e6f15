"""``segllm-edge export``."""
from __future__ import annotations

from pathlib import Path

import click

from ..contracts.manifest import KV_CONCAT, KV_LAYOUTS
from ..contracts.precisions import EXPORT_PRECISIONS
from ..errors import SegLLMError


@click.command("export")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="SegLLM checkpoint folder")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="export folder")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(EXPORT_PRECISIONS))
@click.option("--force", is_flag=True, help="overwrite a non-empty export folder")
@click.option("--no-drift-report", is_flag=True, help="skip the accuracy check of reduced precisions")
@click.option("--allow-accuracy-drop", is_flag=True,
              help="exit 0 even when the reduced-precision export fails its accuracy guard")
@click.option("--kv-layout", default=KV_CONCAT, show_default=True, type=click.Choice(KV_LAYOUTS),
              help="inplace: the llm writes each round's keys/values into preallocated buffers (no copy of the past "
                   "per round; onnxruntime backends only), see triton_models/README.md")
def export_command(checkpoint, out, precision, force, no_drift_report, allow_accuracy_drop, kv_layout):
    """Export CHECKPOINT to ONNX graphs (+ manifest, tokenizer) that `load(OUT, backend="onnxruntime")` runs.

    A reduced precision is checked against fp32 on the demo conversation (drift_report.json); when it fails
    that accuracy guard the export is still written but the command exits 1, unless --allow-accuracy-drop."""
    import json

    from ..extras import require_export_extra

    try:
        require_export_extra("segllm-edge export")
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    import segllm_edge

    from .drift import format_drift
    from .files import graph_sizes
    from .onnx_export import export_model
    from .quantize import REPORT_FILE

    try:
        manifest = export_model(checkpoint, out, precision=precision, force=force, drift_report=not no_drift_report,
                                drift_probe=_probe(segllm_edge, precision), allow_accuracy_drop=allow_accuracy_drop,
                                kv_layout=kv_layout)
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    for name, size in graph_sizes(out, manifest).items():
        click.echo(f"{name:15s} {size / 1e6:9.1f} MB  {manifest.graphs[name].file}")
    drift = out / REPORT_FILE
    if drift.exists():
        click.echo(format_drift(json.loads(drift.read_text())))
    click.echo(f"export written to {out} (precision {manifest.precision})")


@click.command("convert-kv-inplace")
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write the converted export here (other files hard-linked); default: convert EXPORT in place")
def convert_kv_inplace_command(export, out):
    """Rewrite EXPORT's llm to the in-place KV layout (its weights untouched): each round's keys/values are written
    into buffers the runtime grows, nothing copies the past (onnxruntime backends and the Triton BLS only)."""
    from .kv_inplace import convert_export

    try:
        done = convert_export(export, out)
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{done}: llm in the in-place KV layout")


def _probe(segllm_edge, precision: str):
    """The drift probe: on OpenVINO for bf16 (onnxruntime's CPU provider has no bf16 kernels) when it is installed,
    its fp32 reference on onnxruntime when that is installed (on the 7B-width probe the bf16 export peaked at 7.2 GiB
    with its reference on OpenVINO, 4.2 GiB on onnxruntime); without OpenVINO the bf16 drift report says the export
    could not run here."""
    import importlib.util

    if precision == "bf16" and importlib.util.find_spec("openvino") is not None:
        ref = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "openvino"
        return segllm_edge.drift_probe(backend="openvino", reference_backend=ref)
    return segllm_edge.drift_probe()
