"""Triton model configs written and read through Triton's own schema (``tritonclient``'s ``model_config_pb2``).

Every ``config.pbtxt`` the generator writes is a ``ModelConfig`` message printed by
``google.protobuf.text_format``: a field Triton does not know, a wrong enum or a wrong type fails here, at
generation time, not when the server loads the model.  :func:`read_config` parses one back (tests, tools,
:func:`~segllm_edge.serving.repository.describe_repository`).

:func:`portability_problems` lists what would tie a repository to the machine that wrote it: an absolute path
in a config parameter or a default model file, a symlink, or a file outside the repository.

Generator side only: the stub never imports this module (NVIDIA's container need not have ``tritonclient``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import BackendError

#: instance kinds: python models run on the CPU anywhere; graph models on whatever the server has
KIND_CPU, KIND_AUTO = "KIND_CPU", "KIND_AUTO"


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:   # pragma: no cover - [serve] installs it
        raise BackendError("writing a Triton repository needs tritonclient (pip install 'segllm-edge[serve]'): "
                           f"{exc}") from None
    return model_config_pb2


def new_config(name: str, *, backend: str = "", platform: str = "", max_batch_size: int = 0):
    """An empty ``ModelConfig`` for model ``name``."""
    cfg = _pb().ModelConfig(name=name, max_batch_size=int(max_batch_size))
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    return cfg


def add_tensors(cfg, kind: str, specs: Iterable) -> None:
    """Append ``input``/``output`` entries from specs with ``name``, ``dtype`` (a Triton type name,
    ``"TYPE_FP32"``: :func:`segllm_edge.serving.pystub.triton_specs` converts), ``dims`` and, for inputs,
    ``optional`` / ``allow_ragged_batch``."""
    pb = _pb()
    for t in specs:
        dtype = pb.DataType.Value(t.dtype)
        if kind == "input":
            cfg.input.add(name=t.name, data_type=dtype, dims=[int(d) for d in t.dims], optional=bool(t.optional),
                          allow_ragged_batch=bool(t.allow_ragged_batch))
        elif kind == "output":
            cfg.output.add(name=t.name, data_type=dtype, dims=[int(d) for d in t.dims])
        else:
            raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")


def add_instances(cfg, count: int, kind: str = KIND_CPU) -> None:
    pb = _pb()
    cfg.instance_group.add(count=int(count), kind=pb.ModelInstanceGroup.Kind.Value(kind))


def set_parameters(cfg, params: Mapping[str, str]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)


def merge_text(cfg, text: str) -> None:
    """Merge a pbtxt fragment (e.g. a ``sequence_batching`` block) into ``cfg``, checked against the schema."""
    from google.protobuf import text_format

    if text and text.strip():
        text_format.Merge(text, cfg)


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def write_config(folder: str | os.PathLike, cfg) -> Path:
    """``<folder>/config.pbtxt`` from ``cfg``; parsed back once, so what is on disk is what Triton will read."""
    path = Path(folder) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_text(cfg)
    if parse_config(text) != cfg:    # pragma: no cover - a round trip through text_format is exact
        raise BackendError(f"config of {cfg.name!r} does not survive a text_format round trip")
    path.write_text(text)
    return path


def parse_config(text: str):
    from google.protobuf import text_format

    cfg = _pb().ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def read_config(path: str | os.PathLike):
    """A ``config.pbtxt`` (or a model folder) parsed with Triton's schema (``text_format.ParseError`` if invalid)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.pbtxt"
    return parse_config(p.read_text())


def _looks_absolute(value: str) -> bool:
    if "://" in value:                      # a URL (e.g. the Redis store's), not a path of this machine
        return False
    return any(part.startswith(("/", "~")) or (len(part) > 2 and part[1] == ":" and part[2] in "\\/")
               for part in value.split(os.pathsep) if part)


def portability_problems(repo: str | os.PathLike) -> list[str]:
    """What ties the repository at ``repo`` to this machine (empty: it can be moved, copied or mounted anywhere).

    Checks every ``config.pbtxt`` (parsed with Triton's schema) for absolute paths in parameters and in
    ``default_model_filename``, and every file for being a symlink (a hard link is fine: it is a file)."""
    root = Path(repo)
    problems: list[str] = []
    for cfg_path in sorted(root.glob("*/config.pbtxt")):
        cfg = read_config(cfg_path)
        for key, value in cfg.parameters.items():
            if _looks_absolute(value.string_value):
                problems.append(f"{cfg.name}: parameter {key} = {value.string_value!r} is an absolute path")
        if cfg.default_model_filename and _looks_absolute(cfg.default_model_filename):
            problems.append(f"{cfg.name}: default_model_filename {cfg.default_model_filename!r} is absolute")
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            p = Path(dirpath) / n
            if p.is_symlink():
                problems.append(f"{p.relative_to(root)} is a symlink to {os.readlink(p)}")
    return problems


def place_file(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Put ``src`` at ``dst`` as a hard link (same file system: no second copy on disk), else a copy.
    Returns ``"link"`` or ``"copy"``."""
    import shutil

    src, dst = Path(src).resolve(), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
        return "link"
    except OSError:       # another file system, or links not allowed: copy
        shutil.copyfile(src, dst)
        return "copy"


def place_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """:func:`place_file` for every file under ``src`` (a folder), keeping the layout."""
    src, dst = Path(src), Path(dst)
    for dirpath, _, filenames in os.walk(src):
        for n in filenames:
            f = Path(dirpath) / n
            place_file(f, dst / f.relative_to(src))


__all__ = ["new_config", "add_tensors", "add_instances", "set_parameters", "merge_text", "write_config",
           "read_config", "parse_config", "config_text", "portability_problems", "place_file",
           "place_tree", "KIND_CPU", "KIND_AUTO"]

