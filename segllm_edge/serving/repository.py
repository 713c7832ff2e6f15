"""Generate a Triton model repository from an export folder's manifest.

``generate_repository(export_dir, out_repo, target="python"|"ngc")`` writes:

* the export itself, once, in ``segllm/1/export/`` (manifest, graphs and their external weights,
  tokenizer, arrays), hard-linked from the export folder where the file system allows (else copied);

* one model per manifest graph except those the BLS runs itself (``BLS_GRAPHS``: llm, vision_encoder,
  mask_encoder), named after the graph, with the manifest's tensor names/dtypes (``str`` dimensions
  become ``-1``):

  - ``target="python"``: a python-backend model (:class:`~segllm_edge.serving.models.OrtGraphModel`)
    running onnxruntime on ``../segllm/1/export/<graph>.onnx`` (relative to its model folder);
  - ``target="ngc"``: an ``onnxruntime_onnx`` model with the graph hard-linked as ``1/model.onnx``
    (plus its ``.onnx.data``), or a ``tensorrt_plan`` model (``1/model.plan``) for a graph whose
    engine exists at ``<export>/tensorrt/<graph>.plan`` -- same model and tensor names either way;
    instance kind ``KIND_AUTO`` (loads on CPU-only and GPU servers);

* ``preprocess`` (python): encoded image bytes → CLIP pixels, HIPIE input, padded image, sizes;
* ``encode_image`` (ensemble, stateless): preprocess → mask_backbone (+ the CLIP pixels passed through);
* ``segllm`` (python BLS, one instance): the round loop, one conversation per server-drawn token; it runs
  the llm (KV caches in its own memory) and CLIP (held once for both CLIP graphs) itself, rounds of
  different conversations at once on its round threads (:mod:`.round_scheduler`; parameters
  ``segllm_max_concurrent_rounds``, ``segllm_max_queued_rounds``, ``segllm_max_pending_per_conversation``).

The python graph models check every request against the manifest's shapes with the symbolic
axes bounded (:func:`segllm_edge.limits.graph_axis_limits`) before onnxruntime runs.

No config names a path of this machine (:func:`~.model_config.portability_problems` checks it), and
every ``config.pbtxt`` is written through Triton's own schema (:mod:`.model_config`).

The manifest is the only source of graph names and I/O; nothing here lists a graph's tensors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from ..contracts.serving import (BLS_GRAPHS, ENCODE_IMAGE_PASSTHROUGH, BLS_INPUTS, BLS_MODEL, BLS_OUTPUTS, ENCODE_IMAGE as ENSEMBLE_MODEL, HIPIE_IMAGE,
                                 IMAGE_BYTES, PARAM_CLIP_SIZE, PARAM_EXPORT_DIR, PARAM_GRAPH_FILE, PARAM_IDLE_TIMEOUT,
                                 PARAM_AXES, PARAM_AXIS_LIMITS, PARAM_MAX_CONVERSATIONS, PARAM_MAX_SESSION_BYTES,
                                 PARAM_THREADS, PIXEL_VALUES, PREPROCESS_MODEL, PREPROCESS_PASSTHROUGH,
                                 GRAPH_ENGINE_ORT, PARAM_GRAPH_ENGINE)
from ..errors import CheckpointError, ConfigError
from ..limits import graph_axis_limits
from . import model_config as mc
from .pystub import TensorSpec, triton_dtype, triton_specs, write_python_model

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


def graph_model_config_dict(graph, graph_file, threads: int | None = None, max_context: int = 2048,
                            engine: str = GRAPH_ENGINE_ORT) -> dict:
    """The parsed-config dict an :class:`OrtGraphModel` gets (for in-process use)."""
    bounds = {k: {"string_value": v} for k, v in _bound_params(graph, max_context).items()}
    return {
        "name": graph.name,
        "input": [{"name": t.name, "data_type": triton_dtype(t.dtype), "dims": _dims(t.shape)} for t in graph.inputs],
        "output": [{"name": t.name, "data_type": triton_dtype(t.dtype), "dims": _dims(t.shape)} for t in graph.outputs],
        "parameters": {PARAM_GRAPH_FILE: {"string_value": str(graph_file)},
                       PARAM_THREADS: {"string_value": str(threads or 0)},
                       PARAM_GRAPH_ENGINE: {"string_value": engine}, **bounds},
    }


def _ensemble_config(manifest):
    bb = manifest.graphs["mask_backbone"]
    pre_out = {t.name: t for t in _preprocess_outputs(manifest)}
    outputs = [_spec(t) for t in bb.outputs] + [pre_out[n] for n in ENCODE_IMAGE_PASSTHROUGH]
    cfg = mc.new_config(ENSEMBLE_MODEL, platform="ensemble")
    mc.add_tensors(cfg, "input", triton_specs([IMAGE_BYTES]))
    mc.add_tensors(cfg, "output", triton_specs(outputs))

    def step(model, inputs: dict, outs):
        s = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        s.input_map.update(inputs)
        s.output_map.update({n: n for n in outs})

    step(PREPROCESS_MODEL, {"image": "image"}, pre_out)
    step("mask_backbone", {bb.inputs[0].name: HIPIE_IMAGE}, [t.name for t in bb.outputs])
    return cfg


def _graph_files(export: Path, graph) -> list[Path]:
    """A graph's file and its external weights (which keep their name: the graph refers to it)."""
    src = export / graph.file
    data = src.with_name(src.name + ".data")
    return [src, data] if data.is_file() else [src]


def place_export(export: Path, manifest, dst: Path) -> Path:
    """The export's files the manifest names (manifest, graphs + external weights, tokenizer, arrays) at ``dst``,
    hard-linked where the file system allows (no second copy on disk), copied otherwise."""
    from ..contracts.manifest import MANIFEST_NAME

    mc.place_file(export / MANIFEST_NAME, dst / MANIFEST_NAME)
    mc.place_tree(export / manifest.tokenizer_dir, dst / manifest.tokenizer_dir)
    for f in manifest.arrays.values():
        mc.place_file(export / f, dst / f)
    for g in manifest.graphs.values():
        for f in _graph_files(export, g):
            mc.place_file(f, dst / f.relative_to(export))
    return dst


def _ngc_graph_model(repo: Path, export: Path, shipped: Path, graph, instance_count: int) -> Path:
    """An onnxruntime_onnx (or tensorrt_plan, where ``<export>/tensorrt/<graph>.plan`` exists) model, its file(s)
    hard-linked from the repository's own copy of the export; KIND_AUTO: GPU instances where the server has
    GPUs, CPU instances where it has none."""
    folder = repo / graph.name
    plan = export / "tensorrt" / f"{graph.name}.plan"
    if plan.is_file():
        platform = "tensorrt_plan"
        mc.place_file(plan, folder / "1" / "model.plan")
    else:
        platform = "onnxruntime_onnx"
        src, *data = _graph_files(shipped, graph)
        mc.place_file(src, folder / "1" / "model.onnx")
        for d in data:
            mc.place_file(d, folder / "1" / d.name)
    cfg = mc.new_config(graph.name, platform=platform)
    mc.add_tensors(cfg, "input", triton_specs(_spec(t) for t in graph.inputs))
    mc.add_tensors(cfg, "output", triton_specs(_spec(t) for t in graph.outputs))
    mc.add_instances(cfg, instance_count, mc.KIND_AUTO)
    mc.write_config(folder, cfg)
    return folder


#: where the BLS model keeps the export inside the repository, relative to its model folder ...
BLS_EXPORT = "1/export"


def bls_export_param(model: str = BLS_MODEL) -> str:
    """... and the ``segllm_export_dir`` another model of the same repository gives to reach it (a BLS variant)."""
    return BLS_EXPORT if model == BLS_MODEL else f"../{BLS_MODEL}/{BLS_EXPORT}"


def write_bls_model(repo: str | os.PathLike, export_param: str | None = None, *, name: str = BLS_MODEL,
                    max_conversations: int = 8, idle_timeout_s: float = 600, instance_count: int = 1,
                    sys_path: Sequence[str] | None = None, extra_parameters: dict | None = None,
                    max_session_bytes: int | None = None) -> Path:
    """The ``segllm`` BLS model (also used to add a variant, e.g. one with a short idle timeout).

    ``export_param``: the export folder, relative to the model folder (default: the repository's own,
    :func:`bls_export_param`); an absolute path works but ties the repository to this machine.
    Always ONE instance (it holds the conversations; ``instance_count`` applies to the graph models)
    and no sequence batcher: conversations are the model's own (see :class:`~.bls.ConversationStore`). That
    instance still runs rounds of different conversations at once: its ``execute`` hands each request to a
    :class:`~.round_scheduler.RoundScheduler` and returns, each round answering through its request's
    response sender (bounds: :func:`~.round_scheduler.scheduler_parameters` in ``extra_parameters``)."""
    if idle_timeout_s <= 0:
        raise ValueError("idle_timeout_s must be > 0")
    params = {PARAM_EXPORT_DIR: export_param or bls_export_param(name),
              PARAM_MAX_CONVERSATIONS: str(int(max_conversations)),
              PARAM_IDLE_TIMEOUT: str(float(idle_timeout_s)), **(extra_parameters or {})}
    if max_session_bytes:
        params[PARAM_MAX_SESSION_BYTES] = str(int(max_session_bytes))
    return write_python_model(repo, name, f"{ENTRY}.bls:SegLLMBlsModel", BLS_INPUTS, BLS_OUTPUTS,
                              max_batch_size=0, instance_count=1, sys_path=sys_path, parameters=params)


def write_graph_model(repo, graph, max_context: int, *, name: str | None = None, instance_count: int = 1,
                      sys_path: Sequence[str] | None = None, threads: int | None = None,
                      graph_engine: str = GRAPH_ENGINE_ORT) -> Path:
    """The python-backend model of one manifest graph (``--target python``), named ``name`` (default: the
    graph's), reading the export in the repository's ``segllm`` model (so a variant -- e.g. the same graph on
    another engine -- needs no second copy of the graph)."""
    graph_file = Path("..") / BLS_MODEL / BLS_EXPORT / graph.file     # relative to the graph's model folder
    return write_python_model(repo, name or graph.name, f"{ENTRY}.models:OrtGraphModel",
                              [_spec(t) for t in graph.inputs], [_spec(t) for t in graph.outputs],
                              instance_count=instance_count, sys_path=sys_path,
                              parameters={PARAM_GRAPH_FILE: graph_file.as_posix(),
                                          PARAM_THREADS: str(threads or 0), PARAM_GRAPH_ENGINE: graph_engine,
                                          **_bound_params(graph, max_context)})


def generate_repository(export_dir, out_repo, target: str = "python", max_conversations: int = 8,
                        idle_timeout_s: float = 600, instance_count: int = 1, force: bool = False, *,
                        sys_path: Sequence[str] | None = None, threads: int | None = None,
                        bls_parameters: dict | None = None, graph_engine: str = GRAPH_ENGINE_ORT) -> Path:
    """Write a Triton model repository for the export at ``export_dir`` into ``out_repo``; returns it.

    The repository is self-contained and names no path of this machine: the export's files go into
    ``segllm/1/export/`` once (hard links where the file system allows, else copies), the graph models refer
    to them relative to their own folder (``--target python``) or hard-link them as ``1/model.onnx``
    (``--target ngc``), and the python models run in the stub's own Python (the server's, or the
    container's with ``pip install segllm-edge``). Every ``config.pbtxt`` is written through Triton's
    schema (:mod:`.model_config`). Move, copy or mount it anywhere.

    ``sys_path``: opt-in site-packages for the python models (absolute paths: not portable).
    ``threads``: onnxruntime intra-op threads per graph model (default: all cores).
    ``graph_engine``: what the python-backend graph models run their graph on (:data:`GRAPH_ENGINES`):
    onnxruntime (the default: the answers of ``load(export, backend="onnxruntime")`` bit for bit) or openvino
    (OpenVINO's CPU plugin in fp32: the HIPIE graphs ~1.4x faster on a CPU; ``--target python`` only).
    ``bls_parameters``: more parameters of the ``segllm`` model (e.g. its state store:
    :func:`.state_store.store_parameters`).
    """
    from ..contracts.manifest import Manifest

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if max_conversations < 1:
        raise ValueError("max_conversations must be >= 1")
    from .models import check_graph_engine

    check_graph_engine(graph_engine, here=False)     # the repository may be served on another machine
    if graph_engine != GRAPH_ENGINE_ORT and target != "python":
        raise ConfigError(f"graph engine {graph_engine!r} is for --target python; the {target!r} target's graph "
                          "models run on Triton's own backends")
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
    shipped = place_export(export, manifest, repo / BLS_MODEL / BLS_EXPORT)

    for g in manifest.graphs.values():
        if g.name in BLS_GRAPHS:      # run inside the BLS (serving/bls_graphs.py): no model of their own
            continue
        if target == "python":
            write_graph_model(repo, g, int(manifest.model["max_context"]), instance_count=instance_count,
                              sys_path=sys_path, threads=threads, graph_engine=graph_engine)
        else:
            _ngc_graph_model(repo, export, shipped, g, instance_count)

    write_python_model(repo, PREPROCESS_MODEL, f"{ENTRY}.models:PreprocessModel", [IMAGE_BYTES],
                       _preprocess_outputs(manifest), instance_count=instance_count, sys_path=sys_path,
                       parameters={PARAM_CLIP_SIZE: str(manifest.model["clip_image_size"])})
    (repo / ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    mc.write_config(repo / ENSEMBLE_MODEL, _ensemble_config(manifest))
    write_bls_model(repo, max_conversations=max_conversations, idle_timeout_s=idle_timeout_s,
                    instance_count=instance_count, sys_path=sys_path,
                    extra_parameters={PARAM_THREADS: str(threads or 0), **(bls_parameters or {})})
    return repo


def describe_repository(repo: str | os.PathLike) -> dict:
    """``{model: platform/backend}`` of a generated repository (for CLIs and tests), read with Triton's schema."""
    out = {}
    for cfg_path in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = mc.read_config(cfg_path)
        out[cfg_path.parent.name] = cfg.platform or cfg.backend or "?"
    return out


__all__ = ["generate_repository", "write_bls_model", "write_graph_model", "describe_repository", "place_export", "bls_export_param",
           "TARGETS", "graph_model_config_dict"]
