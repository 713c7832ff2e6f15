"""Export a SegLLM checkpoint folder to the ONNX graphs of the manifest (torch.onnx, dynamo path)."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .graphs import GRAPH_MODULES, dynamic_shapes, example_inputs
from ..contracts.manifest import KV_CONCAT, Manifest, build_manifest
from .attention_layout import rewrite_graph_file
from .hipie_fast import DEFAULT_VARIANT, FAST_GRAPHS, HIPIE_GRAPH_VARIANTS, fast_hipie
from .streamed import DEFAULT_OPSET as OPSET, QUIET_LOGGERS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in a .onnx.data file


#: files an export writes besides those its manifest lists
EXPORT_EXTRA_FILES = ("manifest.json", "config.json", "drift_report.json")


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def export_files(out: Path) -> list[Path]:
    """What an earlier export wrote into ``out`` (from its manifest): graphs with their ``.onnx.data``,
    arrays, the tokenizer folder, config.json, drift_report.json, the manifest itself."""
    manifest = Manifest.load(out)
    files = []
    for g in manifest.graphs.values():
        files += [out / g.file, out / (g.file + ".data")]
    files += [out / f for f in manifest.arrays.values()]
    files += [out / manifest.tokenizer_dir] + [out / f for f in EXPORT_EXTRA_FILES]
    files += sorted(out.glob(".llm-blocks-*"))   # a drift probe's llm blocks, left by a process that was killed
    return [f for f in files if f.exists() or f.is_symlink()]


def prepare_out_dir(out: Path, checkpoint: Path, force: bool, remove: bool = True) -> None:
    """Make ``out`` ready for an export of ``checkpoint``, never destroying anything an export did not write.

    Refuses (CheckpointError) when ``out`` is, or contains, the checkpoint; when it is not empty and
    ``force`` is not given; and, with ``force``, when it holds files but is not an earlier export.
    ``force`` removes only the files listed by the earlier export's manifest (others stay).
    """
    o, c = out.resolve(), checkpoint.resolve()
    if o == c or _is_within(c, o):
        raise CheckpointError(f"the export folder {out} {'is' if o == c else 'contains'} the checkpoint "
                              f"{checkpoint}; choose another --out (nothing was deleted)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"export folder {out} is not empty; pass --force to overwrite it")
        if not (out / "manifest.json").is_file():
            raise CheckpointError(f"export folder {out} is not empty and is not an earlier export (no manifest.json); "
                                  "--force replaces only an earlier export's files: empty it or choose another --out")
        for f in export_files(out) if remove else []:
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
    if remove:
        out.mkdir(parents=True, exist_ok=True)


def export_graph(model, info, name: str, spec, path: Path, verbose: bool = False) -> dict:
    """Export one graph with torch.onnx (dynamo) and check it with onnx.checker; returns notes."""
    import onnx

    module = GRAPH_MODULES[name](model).eval()
    args = example_inputs(name, info)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    fast = name in FAST_GRAPHS  # export-time module variants (same maths, faster ops; the reference is untouched)
    variant = fast_hipie(module, DEFAULT_VARIANT) if fast else contextlib.nullcontext()
    with quiet, variant, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for logger in QUIET_LOGGERS:
            logging.getLogger(logger).setLevel(logging.ERROR)
        # optimize=True: onnxscript's optimizer (constant folding, dead-code removal, shape-op simplification)
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, optimize=True,
                                 dynamic_shapes=dynamic_shapes(name, spec, args),
                                 input_names=[t.name for t in spec.inputs],
                                 output_names=[t.name for t in spec.outputs], verbose=False)
        prog.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path))
    notes = {"exporter": f"torch.onnx dynamo (torch {torch.__version__})", "opset": OPSET,
             "external_data": n_bytes > EXTERNAL_DATA_BYTES, "weights_bytes": int(n_bytes)}
    if name == "llm":   # Q @ K^T reads the key cache in place (no copy of it per layer and round)
        notes["key_transposes_fused"] = rewrite_graph_file(path)
    if fast:
        notes["variant"] = HIPIE_GRAPH_VARIANTS[DEFAULT_VARIANT]
    return notes


def export_model(checkpoint_dir, out_dir, precision: str = "fp32", force: bool = False, progress: bool = True,
                 drift_report: bool = True, drift_probe=None, allow_accuracy_drop: bool = False,
                 fp32_graphs_from: Path | None = None, kv_layout: str = KV_CONCAT) -> Manifest:
    """Write every graph, the manifest, the tokenizer and the token embedding table into ``out_dir``.

    The CLIP, LLM and seg-head graphs are exported directly at ``precision`` with their weights streamed from the
    checkpoint one tensor at a time (:mod:`.streamed`: the model is never resident, in fp32 or otherwise); the
    HIPIE graphs are fp32. A reduced precision's drift report (:mod:`.reference`) runs ``drift_probe`` (a
    :class:`.drift.DriftProbe`; ``segllm_edge.drift_probe()`` is the demo conversation) on the export, then on an
    fp32 reference export streamed to a temporary folder (never both resident; the probe's loader holds one graph
    at a time); a failing accuracy guard raises
    AccuracyGuardError unless ``allow_accuracy_drop``. ``fp32_graphs_from``: an export of the same checkpoint; its
    graphs that are fp32 there and here (HIPIE always; CLIP and the seg head for int8/int4) are hard-linked instead of
    exported again. ``kv_layout="inplace"``: the llm is then rewritten to the in-place KV layout
    (:func:`.kv_inplace.convert_export`; before the drift report, which then runs it)."""
    from ..contracts.manifest import KV_INPLACE, KV_LAYOUTS
    from ..modeling.loader import load_checkpoint
    from ..contracts.precisions import EXPORT_PRECISIONS as PRECISIONS
    from .streamed import KV_DTYPES, PRECISION_DTYPES, STREAMED_GRAPHS

    if precision not in PRECISIONS:
        raise CheckpointError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if kv_layout not in KV_LAYOUTS:
        raise CheckpointError(f"unknown kv_layout {kv_layout!r}; choose one of {', '.join(KV_LAYOUTS)}")
    if kv_layout == KV_INPLACE and precision == "bf16":   # refused before minutes of export work
        raise ConfigError("the in-place KV layout has no bf16 kernel on the CPU (onnxruntime's GroupQueryAttention "
                          "CPU kernel is fp32/fp16, and the drift report runs there): export bf16 in the concat "
                          "layout, or fp16 in place")
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    prepare_out_dir(out, ckpt, force, remove=False)   # the cheap refusals, before loading anything
    loaded = load_checkpoint(ckpt, dtype=PRECISION_DTYPES[precision], lazy=True)  # headers only (+ HIPIE)
    prepare_out_dir(out, ckpt, force)
    model, info = loaded.model, loaded.info
    manifest = build_manifest(info, precision="fp32")
    if precision in KV_DTYPES:
        from .quantize import _retype_kv

        _retype_kv(manifest, KV_DTYPES[precision])
    from tqdm import tqdm

    reusable = fp32_in_both(fp32_graphs_from, precision) if fp32_graphs_from is not None else set()
    notes = {}
    for name, spec in tqdm(manifest.graphs.items(), desc="exporting graphs", unit="graph", disable=not progress):
        if name in reusable:
            notes[name] = link_graph(Path(fp32_graphs_from), out, spec.file)
        elif name in STREAMED_GRAPHS:
            notes[name] = export_streamed_graph(loaded, name, spec, out / spec.file, precision)
        else:
            notes[name] = export_graph(model, info, name, spec, out / spec.file)
    np.save(out / manifest.arrays["embed_tokens"],
            loaded.weights.get("llm.model.embed_tokens.weight", torch.float32).numpy())
    tok = out / manifest.tokenizer_dir
    tok.mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        if (ckpt / f).exists():
            shutil.copyfile(ckpt / f, tok / f)
    shutil.copyfile(ckpt / "config.json", out / "config.json")
    manifest.precision = precision
    manifest.extra["graphs"] = notes
    manifest.extra["source_checkpoint"] = str(ckpt.resolve())
    if precision != "fp32":
        from .quantize import converted_graphs

        manifest.extra["quantized_graphs"] = converted_graphs(precision)
        manifest.extra["kv_cache_dtype"] = manifest.graphs["llm"].inputs[1].dtype
    manifest.save(out)
    if kv_layout == KV_INPLACE:
        from .kv_inplace import convert_export

        convert_export(out)
        manifest = Manifest.load(out)
    del model, loaded
    import gc

    gc.collect()
    if precision != "fp32":
        from .reference import drift_against_fp32

        def fp32_reference(folder: Path) -> Manifest:
            return export_model(ckpt, folder, "fp32", progress=progress, drift_report=False, fp32_graphs_from=out)

        drift_against_fp32(out, manifest, drift_probe if drift_report else None,
                           "switched off" if not drift_report else "no drift probe was given", fp32_reference,
                           allow_accuracy_drop=allow_accuracy_drop)
    return manifest


def fp32_in_both(other: Path, precision: str) -> set[str]:
    """The graphs that are fp32 both in the export ``other`` and in an export at ``precision``."""
    from .quantize import converted_graphs

    def fp32(p: str) -> set[str]:
        return set(GRAPH_MODULES) - (set(converted_graphs(p)) if p != "fp32" else set())

    return fp32(Manifest.load(other).precision) & fp32(precision)


def link_graph(src: Path, out: Path, file: str) -> dict:
    """Hard-link (copy across file systems) an fp32 graph, with its external data, from another export."""
    import os

    for f in (file, file + ".data"):
        if (src / f).exists():
            try:
                os.link(src / f, out / f)
            except OSError:
                shutil.copyfile(src / f, out / f)
    return dict(Manifest.load(src).extra.get("graphs", {}).get(Path(file).stem, {}), linked_from=str(src))


def export_streamed_graph(loaded, name: str, spec, path: Path, precision: str) -> dict:
    """One CLIP/LLM/seg-head graph at ``precision``, weights streamed from the checkpoint; returns notes."""
    import onnx

    from .streamed import OPSETS, release_memory, save_streamed, trace_streamed, weight_bytes
    from .weight_quant import quantize_weight_matmuls

    prog = trace_streamed(loaded.model, loaded.info, name, spec, loaded.weights, precision)
    quantized = 0
    if name == "llm" and precision in ("int8", "int4"):
        quantized = quantize_weight_matmuls(prog.model.graph, precision)
    n_bytes = weight_bytes(prog.model)
    external = n_bytes > EXTERNAL_DATA_BYTES
    save_streamed(prog.model, path, external)
    del prog
    release_memory()
    onnx.checker.check_model(str(path))
    notes = {"exporter": f"torch.onnx dynamo (torch {torch.__version__}), weights streamed",
             "opset": OPSETS.get(precision, OPSET),
             "external_data": external, "weights_bytes": int(n_bytes), "precision": precision}
    if name == "llm":
        notes["key_transposes_fused"] = rewrite_graph_file(path)
    if quantized:
        notes["quantized_matmuls"] = quantized
    return notes
