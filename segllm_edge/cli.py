"""``segllm-edge`` command line (also ``python -m segllm_edge``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .contracts.backends import BACKENDS
from .contracts.demo import DEMO_QUESTIONS, demo_image
from .errors import SegLLMError


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


def _writable_dir(out: Path | None, option: str = "--out") -> None:
    """Create ``out`` and check that a file can be written there, before any work (one-line error if not)."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".segllm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise click.ClickException(f"{option} {out} is not a writable folder: {exc.strerror or exc}") from None


def _at_least(value: int, minimum: int, option: str) -> None:
    if value < minimum:
        raise click.ClickException(f"{option} must be at least {minimum}, not {value}")


class _Step:
    """Prints '<what> … done in Xs' around a long step."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        click.echo(f"{self.what} …", nl=False, err=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        click.echo(f" {'done' if exc is None else 'failed'} in {time.perf_counter() - self.t0:.1f}s", err=True)
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segllm-edge")
def main() -> None:
    """segllm-edge: fast, faithful SegLLM inference (multi-round reasoning segmentation)."""


@main.command("make-tiny-checkpoint")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hidden", default=128, show_default=True, help="LLM hidden size")
@click.option("--layers", default=2, show_default=True, help="LLM layers")
@click.option("--heads", default=4, show_default=True, help="LLM attention heads")
@click.option("--intermediate", default=256, show_default=True, help="LLM FFN size")
@click.option("--clip-hidden", default=128, show_default=True, help="CLIP width (multiple of 64)")
@click.option("--clip-layers", default=3, show_default=True, help="CLIP layers")
@click.option("--shards", default=1, show_default=True, help="number of safetensors shards (>1 writes an index)")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="dtype of the safetensors (the released checkpoints are bf16)")
@click.option("--force", is_flag=True, help="overwrite a non-empty folder")
def make_tiny(out, hidden, layers, heads, intermediate, clip_hidden, clip_layers, shards, dtype, force):
    """Write a small random SegLLM checkpoint (released layout, full HIPIE-R50) to OUT."""
    _need_export_extra("make-tiny-checkpoint")
    from .tiny import TinySizes, make_tiny_checkpoint

    sizes = TinySizes(hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                      clip_hidden=clip_hidden, clip_layers=clip_layers, clip_intermediate=4 * clip_hidden)
    try:
        with _Step(f"writing tiny checkpoint to {out}"):
            make_tiny_checkpoint(out, sizes, shards=shards, force=force, dtype=dtype)
    except SegLLMError as exc:
        _fail(exc)
    click.echo(str(out))


def _bench_cpu_paths(export_dir, rounds, repeats, warmup, image, json_out, results_dir):
    from . import bench as B
    from .cpu_bench import bench_export, format_paths

    try:
        report = bench_export(export_dir, image or demo_image(), B.scripted_questions(rounds), repeats=repeats,
                              warmup=warmup, progress=click.echo)
    except SegLLMError as exc:
        _fail(exc)
    click.echo(f"CPU: {report['cpu']}")
    click.echo(format_paths(report, report["default_path"]))
    click.echo(f"saved {B.save_result(report, results_dir, 'cpu_paths')}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


def _need_export_extra(what: str) -> None:
    from .extras import require_export_extra

    try:
        require_export_extra(what)
    except SegLLMError as exc:
        _fail(exc)


def _folder(checkpoint: Path | None, export: Path | None) -> Path | None:
    if checkpoint is not None and export is not None:
        raise click.UsageError("give --checkpoint or --export, not both")
    return export if export is not None else checkpoint


def _load(checkpoint: Path, backend: str | None, dtype: str):
    from . import load

    with _Step(f"loading {checkpoint} ({backend or 'backend from the folder'}, {dtype})"):
        return load(checkpoint, backend=backend, dtype=dtype)


def _run_rounds(model, image, questions, reuse: bool, out: Path | None):
    from PIL import Image

    from .runtime.profiler import timings_table

    s = model.session(image, reuse=reuse)
    rows = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for i, q in enumerate(questions, 1):
        r = s.ask(q)
        rows.append(r.timings)
        ys, xs = r.mask.nonzero()
        where = f"mask {int(r.mask.sum())} px, box [{', '.join(f'{v:.0f}' for v in r.box)}]" if len(ys) else "empty mask"
        click.echo(f"round {i}: {q!r} → {where}  ({sum(r.timings.values()):.0f} ms)")
        if out is not None:
            Image.fromarray(r.overlay(s.rgb)).save(out / f"round{i}_overlay.png")
            Image.fromarray((r.mask * 255).astype("uint8")).save(out / f"round{i}_mask.png")
    if out is not None:
        _save_legend(s, out)
    click.echo(timings_table(rows, title=f"per-stage latency (ms), {'with reuse' if reuse else 'no reuse'}:"))
    return s, rows


def _save_legend(s, out: Path) -> None:
    """``all_rounds.png``: every round's mask, box and number on the image, with a legend of the questions."""
    from PIL import Image

    from .drawing import legend_image, mark_of

    if s.results:
        Image.fromarray(legend_image(s.rgb, [mark_of(r) for r in s.results])).save(out / "all_rounds.png")


@main.command()
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="checkpoint or export folder (default: build a tiny checkpoint under --workdir; "
                   "onnxruntime/tensorrt export it there first)")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="an export folder to run (no torch needed)")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("segllm-demo"),
              show_default=True, help="where the tiny checkpoint and the overlays go")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="default: from the folder (torch for a checkpoint, onnxruntime for an export); cuda either")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the per-round timings as JSON")
def demo(checkpoint, export_dir, workdir, backend, dtype, json_out):
    """Run a 3-round conversation on a bundled image and print per-round latency."""
    from .runtime.profiler import timings_json

    checkpoint = _folder(checkpoint, export_dir)
    if checkpoint is None or not (checkpoint / "manifest.json").exists():
        _need_export_extra("the demo without --export (it builds and exports a tiny checkpoint)")
    try:
        own = checkpoint is None                  # the demo's own tiny checkpoint: built once, exported once
        if own:
            from .tiny import make_tiny_checkpoint

            checkpoint = workdir / "tiny-checkpoint"
            if not (checkpoint / "config.json").exists():
                with _Step(f"building a tiny checkpoint in {checkpoint}"):
                    make_tiny_checkpoint(checkpoint, force=True)
        if backend in ("onnxruntime", "tensorrt") and not (checkpoint / "manifest.json").exists():
            from .export.onnx_export import export_model

            # these backends run an export. The manifest does not name its source checkpoint, so an export
            # left in the workdir is reused only for the demo's own checkpoint; a given one is exported afresh.
            export = workdir / "export"
            if not (own and (export / "manifest.json").exists()):
                export_model(checkpoint, export, force=True, drift_report=False)
            checkpoint = export
        model = _load(checkpoint, backend, dtype)
        click.echo(f"{model}\nimage: {demo_image().name}")
        _, rows = _run_rounds(model, demo_image(), DEMO_QUESTIONS, reuse=True, out=workdir / "overlays")
    except SegLLMError as exc:
        _fail(exc)
    click.echo(f"overlays written to {workdir / 'overlays'} (all_rounds.png: every round with a legend)")
    if json_out:
        json_out.write_text(timings_json(rows))


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="checkpoint or export folder")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="an export folder (same as --checkpoint EXPORT)")
@click.option("--image", required=True, type=click.Path(path_type=Path))
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="default: from the folder (torch for a checkpoint, onnxruntime for an export); cuda either")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="write overlays here")
@click.option("--no-reuse", is_flag=True, help="recompute everything every round (the research code's way)")
@click.argument("questions", nargs=-1)
def chat(checkpoint, export_dir, image, backend, dtype, out, no_reuse, questions):
    """Segment IMAGE over several rounds: chat ... "q1" "q2 [REF:1]"; interactive when no questions are given."""
    checkpoint = _folder(checkpoint, export_dir)
    if checkpoint is None:
        raise click.UsageError("give --checkpoint or --export")
    _writable_dir(out)
    try:
        model = _load(checkpoint, backend, dtype)
        if questions:
            _run_rounds(model, image, questions, reuse=not no_reuse, out=out)
            return
        s = model.session(image, reuse=not no_reuse)
    except SegLLMError as exc:
        _fail(exc)
    click.echo("Ask a question per line; add [REF:k] to refer to round k's mask. Empty line or Ctrl-D ends.")
    while True:
        try:
            q = input(f"round {len(s.rounds) + 1}> ").strip()
        except EOFError:
            break
        if not q:
            break
        try:
            r = s.ask(q)
        except SegLLMError as exc:
            click.echo(f"error: {exc}", err=True)
            continue
        click.echo(f"mask {int(r.mask.sum())} px, box {[round(float(v), 1) for v in r.box]}, "
                   + ", ".join(f"{k} {v:.0f}ms" for k, v in r.timings.items()))
        if out is not None:
            from PIL import Image

            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(r.overlay(s.rgb)).save(out / f"round{r.round}_overlay.png")
            _save_legend(s, out)


@main.command()
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="checkpoint folder (torch backend); default: a tiny golden-size checkpoint under segllm-demo/")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="export folder (onnxruntime backend)")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="default: torch for --checkpoint; for --export every available CPU path side by side; cuda: the GPU (onnxruntime CUDA "
                   "provider for an export, torch on CUDA for a checkpoint); tensorrt: engines from build-engines")
@click.option("--dtype", default="auto", show_default=True, help="torch backend dtype (an export runs as exported)")
@click.option("--rounds", default=8, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None, help="default: bundled image")
@click.option("--modes", default="reuse,no_reuse", show_default=True, help="comma list of reuse,no_reuse")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="where the result JSON is also saved (with machine, backend, precision, size)")
def bench(checkpoint, export_dir, backend, dtype, rounds, repeats, warmup, image, modes, json_out, plot_out, results_dir):
    """N-round conversations with warm-up and repeats: per-round, per-stage latency, caching vs reuse=False."""
    from tqdm import tqdm

    from . import bench as B

    if checkpoint and export_dir:
        raise click.UsageError("give --checkpoint or --export, not both")
    _at_least(rounds, 1, "--rounds")
    _at_least(repeats, 1, "--repeats")
    _at_least(warmup, 0, "--warmup")
    for f, opt in ((json_out, "--json"), (plot_out, "--plot")):
        if f is not None:
            _writable_dir(f.parent, opt)
    if export_dir and backend is None:  # every CPU path of the export side by side
        return _bench_cpu_paths(export_dir, rounds, repeats, warmup, image, json_out, results_dir)
    try:
        if export_dir:
            path, backend = export_dir, backend or "onnxruntime"
        else:
            path, backend = checkpoint, backend or "torch"
            if path is None:
                path = Path("segllm-demo") / "tiny-checkpoint"
                if not (path / "config.json").exists():
                    _need_export_extra("bench without --export (it builds a tiny checkpoint)")
                    from .tiny import make_tiny_checkpoint

                    with _Step(f"building a tiny checkpoint in {path}"):
                        make_tiny_checkpoint(path, force=True)
        model = _load(path, backend, dtype)
        mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
        bad = set(mode_list) - {"reuse", "no_reuse"}
        if bad or not mode_list:
            raise click.UsageError(f"unknown mode(s) {sorted(bad)}; use reuse,no_reuse")
        bar = tqdm(total=(warmup + repeats) * len(mode_list), desc="conversations", unit="conv")
        report = B.run_benchmark(model, image or demo_image(), rounds=rounds, repeats=repeats, warmup=warmup,
                                 modes=mode_list, progress=lambda i, n, m: (bar.set_postfix(mode=m), bar.update(1)))
        bar.close()
    except SegLLMError as exc:
        _fail(exc)
    i = model.info
    precision = getattr(model.backend, "precision", dtype)
    report.update(machine=B.machine_info(), backend=backend, precision=precision, model_path=str(path),
                  model_size={"hidden": i.hidden_size, "layers": i.num_layers, "clip_hidden": i.clip_hidden,
                              "hipie": "R50 (full)"},
                  title=f"{backend} {precision}, LLM {i.hidden_size}x{i.num_layers}")
    click.echo(B.format_report(report))
    saved = B.save_result(report, results_dir, f"{backend}_{precision}_h{i.hidden_size}x{i.num_layers}")
    click.echo(f"saved {saved}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if plot_out:
        try:
            B.plot_report(report, plot_out)
        except SegLLMError as exc:
            _fail(exc)
        click.echo(f"plot written to {plot_out}")


def _register() -> None:
    from .evaluation.cli import convert_mrseg_command, eval_command
    from .export.cli import convert_kv_inplace_command, export_command
    from .export.tensorrt.cli import build_engines_command
    from .serving.cli import serve_command, triton_repo_command
    from .web.cli import web_command

    for cmd in (export_command, build_engines_command, triton_repo_command, serve_command, web_command,
                eval_command, convert_mrseg_command, convert_kv_inplace_command):
        main.add_command(cmd)


_register()


if __name__ == "__main__":  # pragma: no cover
    main()
