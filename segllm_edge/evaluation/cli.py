"""``segllm-edge eval``: per-round gIoU / cIoU / P@0.5 of one or more models (precisions) on a dataset."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SegLLMError


@click.command("eval")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="multi-round conversations (.json list) or a RefCOCO-style COCO file with 'refs'")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(file_okay=False, path_type=Path),
              help="checkpoint or export folder (repeatable: one column per model, e.g. fp32 and int4 exports)")
@click.option("--backend", default=None, help="torch for checkpoints, onnxruntime for exports [inferred]")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder the image paths are relative to [the data file's folder]")
@click.option("--template", default="{sentence}", show_default=True, help="question for a RefCOCO sentence")
@click.option("--limit", type=int, default=None, help="evaluate only the first N items")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("segllm-eval"), show_default=True,
              help="results folder (one subfolder per model; a rerun resumes)")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="per-round plot (PNG) [OUT/metrics.png]")
def eval_command(data, models, backend, image_root, template, limit, out, plot_out):
    """Evaluate MODEL(s) on DATA: per round gIoU (mIoU), cIoU (oIoU) and P@0.5, as the SegLLM research code
    computes them; prints a table comparing the models, writes OUT/metrics.json and a plot."""
    import segllm_edge

    from .datasets import load_dataset
    from .runner import compare_table, plot, run_eval

    try:
        items, problems = load_dataset(data, image_root=image_root, template=template)
        items = items[:limit] if limit else items
        for name, reason in problems:
            click.echo(f"bad annotation: {name}: {reason}", err=True)
        results = {}
        for path in models:
            label = _label(path)
            kind = backend or ("onnxruntime" if (path / "manifest.json").is_file() else "torch")
            model = segllm_edge.load(path, backend=kind)
            results[label] = run_eval(model, items, out / label, problems, desc=label)
            for p in results[label]["problems"]:
                if p["id"] not in {n for n, _ in problems}:
                    click.echo(f"bad annotation: {p['id']}: {p['error']}", err=True)
            del model
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    click.echo(compare_table(results))
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    png = plot(results, plot_out or out / "metrics.png")
    click.echo(f"metrics: {out / 'metrics.json'}, plot: {png}")


def _label(path: Path) -> str:
    """The results subfolder and table column of a model: its folder name, plus the export's precision."""
    man = path / "manifest.json"
    if man.is_file():
        try:
            prec = json.loads(man.read_text()).get("precision", "")
        except json.JSONDecodeError:
            prec = ""
        if prec and prec not in path.name:
            return f"{path.name}-{prec}"
    return path.name
