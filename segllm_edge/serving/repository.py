"""Generate a Triton model repository from an export folder's manifest.

``generate_repository(export_dir, out_repo, target="python"|"ngc")`` writes:

* one model per manifest graph except those the BLS runs itself (``BLS_GRAPHS``: llm, vision_encoder,
  mask_encoder), named after the graph, with the manifest's tensor names/dtypes (``str`` dimensions
  become ``-1``):

  - ``target="python"``: a python-backend model (:class:`~segllm_edge.serving.models.OrtGraphModel`)
    running onnxruntime on the graph file *in the export folder* (absolute path parameter);
  - ``target="ngc"``: an ``onnxruntime_onnx`` model with the graph copied to ``1/model.onnx``
    (plus its ``.onnx.data``), or a ``tensorrt_plan`` model (``1/model.plan``) for a graph whose
    engine exists at ``<export>/tensorrt/<graph>.plan`` -- same model and tensor names either way;

* ``preprocess`` (python): encoded image bytes → CLIP pixels, HIPIE input, padded image, sizes;
* ``encode_image`` (ensemble, stateless): preprocess → mask_backbone (+ the CLIP pixels passed through);
* ``segllm`` (python BLS, one instance): the round loop, one conversation per server-drawn token; it runs
  the llm (KV caches in its own memory) and CLIP (held once for both CLIP graphs) itself.

The python graph models check every request against the manifest's shapes with the symbolic
axes bounded (:func:`segllm_edge.limits.graph_axis_limits`) before onnxruntime runs.

The manifest is the only source of graph names and I/O; nothing here lists a graph's tensors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from ..contracts.serving import (BLS_GRAPHS, BLS_INPUTS, BLS_MODEL, BLS_OUTPUTS, ENCODE_IMAGE as ENSEMBLE_MODEL, HIPIE_IMAGE,
                                 IMAGE_BYTES, PARAM_CLIP_SIZE, PARAM_EXPORT_DIR, PARAM_GRAPH_FILE, PARAM_IDLE_TIMEOUT,
                                 PARAM_AXES, PARAM_AXIS_LIMITS, PARAM_MAX_CONVERSATIONS, PARAM_MAX_SESSION_BYTES,
                                 PARAM_THREADS, PIXEL_VALUES, PREPROCESS_MODEL, PREPROCESS_PASSTHROUGH,
                                 ENCODE_IMAGE_PASSTHROUGH)
from ..errors import CheckpointError
from ..limits import graph_axis_limits
from .pystub import PARAM_PYTHON, TensorSpec, triton_dtype, write_python_model

TARGETS = ("python", "ngc")
ENTRY = "segllm_edge.serving"



def _dims(shape) -> list[int]:
    return [-1 if isinstance(d, str) else int(d) for d in shape]


def _spec(t) -> TensorSpec:
    return TensorSpec(t.name, t.dtype, _dims(t.shape))


def _preprocess_outputs(manifest) -> list[TensorSpec]:
    vis_in = manifest.graphs["vision_encoder"].inputs[0]
    bb_in = manifest.graphs["mask_backbone"].inputs[0]
    padded, hw = PREPROCESS_PASSTHROUGH
    return [TensorSpec(PIXEL_VALUES, vis_in.dtype, [1, *_dims(vis_in.shape[1:])]),
            TensorSpec(HIPIE_IMAGE, bb_in.dtype, _dims(bb_in.shape)),
            TensorSpec(padded, "uint8", [1024, 1024, 3]),
            TensorSpec(hw, "int32", [2])]


def _bound_params(graph, max_context: int) -> dict[str, str]:
    import json

    axes = {t.name: list(t.shape) for t in graph.inputs}
    return {PARAM_AXES: json.dumps(axes), PARAM_AXIS_LIMITS: json.dumps(graph_axis_limits(max_context))}


def graph_model_config_dict(graph, graph_file, threads: int | None = None, max_context: int = 2048) -> dict:
    """The parsed-config dict an :class:`OrtGraphModel` gets (for in-process use)."""
    bounds = {k: {"string_value": v} for k, v in _bound_params(graph, max_context).items()}
    return {
        "name": graph.name,
        "input": [{"name": t.name, "data_type": triton_dtype(t.dtype), "dims": _dims(t.shape)} for t in graph.inputs],
        "output": [{"name": t.name, "data_type": triton_dtype(t.dtype), "dims": _dims(t.shape)} for t in graph.outputs],
        "parameters": {PARAM_GRAPH_FILE: {"string_value": str(graph_file)},
                       PARAM_THREADS: {"string_value": str(threads or 0)}, **bounds},
    }


def _io_block(kind: str, specs: Sequence[TensorSpec]) -> str:
    return f"{kind} [\n  " + ",\n  ".join(t.pbtxt() for t in specs) + "\n]"


def _ensemble_config(manifest) -> str:
    bb = manifest.graphs["mask_backbone"]
    pre_out = {t.name: t for t in _preprocess_outputs(manifest)}
    outputs = [_spec(t) for t in bb.outputs] + [pre_out[n] for n in ENCODE_IMAGE_PASSTHROUGH]

    def omap(names):
        return " ".join(f'output_map {{ key: "{n}" value: "{n}" }}' for n in names)

    steps = [
        f'{{ model_name: "{PREPROCESS_MODEL}" model_version: -1 input_map {{ key: "image" value: "image" }} '
        f'{omap(pre_out)} }}',
        f'{{ model_name: "mask_backbone" model_version: -1 '
        f'input_map {{ key: "{bb.inputs[0].name}" value: "{HIPIE_IMAGE}" }} {omap(t.name for t in bb.outputs)} }}',
    ]
    return "\n".join([
        f'name: "{ENSEMBLE_MODEL}"', 'platform: "ensemble"', "max_batch_size: 0",
        _io_block("input", [TensorSpec(*IMAGE_BYTES)]), _io_block("output", outputs),
        "ensemble_scheduling {\n  step [\n    " + ",\n    ".join(steps) + "\n  ]\n}",
    ]) + "\n"


def _ngc_graph_model(repo: Path, export: Path, graph, instance_count: int, link: bool) -> Path:
    folder = repo / graph.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    plan = export / "tensorrt" / f"{graph.name}.plan"
    if plan.is_file():
        platform, dst = "tensorrt_plan", folder / "1" / "model.plan"
        files = [(plan, dst)]
    else:
        platform, dst = "onnxruntime_onnx", folder / "1" / "model.onnx"
        src = export / graph.file
        files = [(src, dst)]
        data = src.with_name(src.name + ".data")
        if data.is_file():   # external weights keep their file name (the graph refers to it)
            files.append((data, folder / "1" / data.name))
    for s, d in files:
        if link:
            os.symlink(s.resolve(), d)
        else:
            shutil.copyfile(s, d)
    cfg = "\n".join([
        f'name: "{graph.name}"', f'platform: "{platform}"', "max_batch_size: 0",
        _io_block("input", [_spec(t) for t in graph.inputs]), _io_block("output", [_spec(t) for t in graph.outputs]),
        f"instance_group [ {{ kind: KIND_GPU count: {int(instance_count)} }} ]",
    ]) + "\n"
    (folder / "config.pbtxt").write_text(cfg)
    return folder


def write_bls_model(repo: str | os.PathLike, export_param: str, *, name: str = BLS_MODEL, max_conversations: int = 8,
                    idle_timeout_s: float = 600, instance_count: int = 1, sys_path: Sequence[str] | None = None,
                    extra_parameters: dict | None = None, max_session_bytes: int | None = None) -> Path:
    """The ``segllm`` BLS model (also used to add a variant, e.g. one with a short idle timeout).

    Always ONE instance (it holds the conversations; ``instance_count`` applies to the graph models)
    and no sequence batcher: conversations are the model's own (see :class:`~.bls.ConversationStore`)."""
    if idle_timeout_s <= 0:
        raise ValueError("idle_timeout_s must be > 0")
    params = {PARAM_EXPORT_DIR: export_param, PARAM_MAX_CONVERSATIONS: str(int(max_conversations)),
              PARAM_IDLE_TIMEOUT: str(float(idle_timeout_s)), **(extra_parameters or {})}
    if max_session_bytes:
        params[PARAM_MAX_SESSION_BYTES] = str(int(max_session_bytes))
    return write_python_model(repo, name, f"{ENTRY}.bls:SegLLMBlsModel", BLS_INPUTS, BLS_OUTPUTS,
                              max_batch_size=0, instance_count=1, sys_path=sys_path, parameters=params)


def generate_repository(export_dir, out_repo, target: str = "python", max_conversations: int = 8,
                        idle_timeout_s: float = 600, instance_count: int = 1, force: bool = False, *,
                        sys_path: Sequence[str] | None = None, threads: int | None = None,
                        link_graphs: bool = False) -> Path:
    """Write a Triton model repository for the export at ``export_dir`` into ``out_repo``; returns it.

    ``sys_path``: site-packages for the python models (default: this environment's; ``[]`` when the
    package is installed in the server's Python, e.g. an NGC image with ``pip install segllm-edge``).
    ``threads``: onnxruntime intra-op threads per graph model (default: all cores).
    ``link_graphs`` (ngc): symlink the graphs instead of copying them.
    """
    from ..contracts.manifest import MANIFEST_NAME, Manifest

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if max_conversations < 1:
        raise ValueError("max_conversations must be >= 1")
    export = Path(export_dir).resolve()
    manifest = Manifest.load(export)
    manifest.check_files(export)
    for needed in ("vision_encoder", "mask_backbone", "llm", "seg_head", "mask_decoder", "mask_encoder"):
        if needed not in manifest.graphs:
            raise CheckpointError(f"export {export} has no {needed!r} graph; re-export with `segllm-edge export`")
    repo = Path(out_repo)
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        if not force:
            raise FileExistsError(f"{repo} exists and is not empty; pass force=True (--force) to overwrite it")
        shutil.rmtree(repo) if repo.is_dir() else repo.unlink()
    repo.mkdir(parents=True, exist_ok=True)
    common: dict[str, str] = {}
    if target == "ngc":
        if sys_path is None:
            sys_path = []
        common[PARAM_PYTHON] = ""   # the container's Python runs its own site-packages: no version pin

    for g in manifest.graphs.values():
        if g.name in BLS_GRAPHS:
            continue
        if target == "python":
            write_python_model(repo, g.name, f"{ENTRY}.models:OrtGraphModel",
                               [_spec(t) for t in g.inputs], [_spec(t) for t in g.outputs],
                               instance_count=instance_count, sys_path=sys_path,
                               parameters={PARAM_GRAPH_FILE: str(export / g.file),
                                           PARAM_THREADS: str(threads or 0),
                                           **_bound_params(g, int(manifest.model["max_context"]))})
        else:
            _ngc_graph_model(repo, export, g, instance_count, link_graphs)

    write_python_model(repo, PREPROCESS_MODEL, f"{ENTRY}.models:PreprocessModel", [IMAGE_BYTES],
                       _preprocess_outputs(manifest), instance_count=instance_count, sys_path=sys_path,
                       parameters={PARAM_CLIP_SIZE: str(manifest.model["clip_image_size"]), **common})
    (repo / ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (repo / ENSEMBLE_MODEL / "config.pbtxt").write_text(_ensemble_config(manifest))

    if target == "python":
        export_param = str(export)
    else:   # the BLS needs the manifest, tokenizer and embedding table: ship them inside the model folder
        dst = repo / BLS_MODEL / "1" / "export"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(export / MANIFEST_NAME, dst / MANIFEST_NAME)
        shutil.copytree(export / manifest.tokenizer_dir, dst / manifest.tokenizer_dir)
        for f in manifest.arrays.values():
            shutil.copyfile(export / f, dst / f)
        for name in BLS_GRAPHS:   # the graphs the BLS runs itself
            src = export / manifest.graphs[name].file
            for s in (src, src.with_name(src.name + ".data")):
                if s.is_file():
                    os.symlink(s.resolve(), dst / s.name) if link_graphs else shutil.copyfile(s, dst / s.name)
        export_param = "1/export"
    write_bls_model(repo, export_param, max_conversations=max_conversations, idle_timeout_s=idle_timeout_s,
                    instance_count=instance_count, sys_path=sys_path,
                    extra_parameters={**common, PARAM_THREADS: str(threads or 0)})
    return repo


def describe_repository(repo: str | os.PathLike) -> dict:
    """``{model: platform/backend}`` of a generated repository (for CLIs and tests)."""
    out = {}
    for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
        text = cfg.read_text()
        kind = next((line.split('"')[1] for line in text.splitlines()
                     if line.startswith(("platform:", "backend:"))), "?")
        out[cfg.parent.name] = kind
    return out


__all__ = ["generate_repository", "write_bls_model", "describe_repository", "TARGETS", "graph_model_config_dict"]
