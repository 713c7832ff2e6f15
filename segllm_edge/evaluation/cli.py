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


@click.command("convert-mrseg")
@click.argument("conversations", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--instances", "instances", multiple=True, required=True, metavar="DATASET=PATH",
              help="COCO-format instances file of a dataset the MASK-DECODE targets name, e.g. "
                   "refcoco=annotations_folder/refcoco/instances.json (repeatable)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the multi-round JSON `segllm-edge eval --data` reads")
def convert_mrseg_command(conversations, instances, out):
    """Convert the SegLLM research code's MRSeg CONVERSATIONS file (LLaVA-style turns with [MASK-DECODE:...]
    targets) to the multi-round format of `segllm-edge eval`; bad conversations are reported by name and skipped."""
    from .mrseg import convert_mrseg

    files = {}
    for spec in instances:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: expected DATASET=PATH", param_hint="--instances")
        files[name] = Path(path)
    try:
        items, problems = convert_mrseg(conversations, files, out)
    except SegLLMError as exc:
        raise click.ClickException(str(exc))
    for name, reason in problems:
        click.echo(f"bad conversation: {reason}", err=True)
    click.echo(f"{len(items)} conversation(s), {sum(len(i['rounds']) for i in items)} round(s) written to {out}"
               + (f"; {len(problems)} skipped" if problems else ""))
