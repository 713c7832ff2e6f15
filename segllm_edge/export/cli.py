"""``segllm-edge export``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..contracts.precisions import EXPORT_PRECISIONS
from ..errors import SegLLMError


@click.command("export")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="SegLLM checkpoint folder")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="export folder")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(EXPORT_PRECISIONS))
@click.option("--force", is_flag=True, help="overwrite a non-empty export folder")
@click.option("--no-drift-report", is_flag=True, help="skip the accuracy check of reduced precisions")
def export_command(checkpoint, out, precision, force, no_drift_report):
    """Export CHECKPOINT to ONNX graphs (+ manifest, tokenizer) that `load(OUT, backend="onnxruntime")` runs."""
    from ..extras import require_export_extra

    try:
        require_export_extra("segllm-edge export")
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    from .onnx_export import export_model, graph_sizes
    from .quantize import format_drift

    try:
        manifest = export_model(checkpoint, out, precision=precision, force=force, drift_report=not no_drift_report)
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    for name, size in graph_sizes(out, manifest).items():
        click.echo(f"{name:15s} {size / 1e6:9.1f} MB  {manifest.graphs[name].file}")
    drift = out / "drift_report.json"
    if drift.exists():
        click.echo(format_drift(json.loads(drift.read_text())))
    click.echo(f"export written to {out} (precision {manifest.precision})")
