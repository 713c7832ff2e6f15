"""onnxruntime sessions that hold ONE copy of the weights their graphs have in common.

The two CLIP graphs of an export (``vision_encoder``: patch tokens, ``mask_encoder``: CLS token + box
token) each store the whole CLIP tower and ``mm_projector`` (ONNX files cannot share initializers):
opened as two plain sessions, a process holds CLIP twice (1.2 GB each at CLIP-L size, fp32).
:func:`open_sessions_sharing_weights` reads where every initializer's bytes lie in the ``.onnx`` /
``.onnx.data`` files (names differ between the graphs: the exporter names folded constants
``val_N``), groups identical ones (same dtype, shape and bytes), memory-maps each group's bytes once
and hands that one buffer to every session that has it (``SessionOptions.add_initializer``, which
onnxruntime uses without copying on the CPU). Weight prepacking is turned off for these sessions:
a prepacked copy is per session and would double what sharing saves (cost: MLAS packs the
weights per call, measured in benchmarks/bench_triton_state.py).

Reading the initializers' locations needs no ``onnx`` package (a serving install has none): the
few ModelProto / GraphProto / TensorProto fields involved are read off the protobuf wire format.
"""
from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CheckpointError
from .ort_values import user_owned_view

# onnx.TensorProto.DataType → numpy (types numpy lacks, e.g. bfloat16, are never shared)
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5                     # ModelProto.graph, GraphProto.initializer
_T_DIMS, _T_DTYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14   # TensorProto fields
_MIN_SHARED_BYTES = 4096     # smaller constants are not worth a mapping
#: the graphs of an export that share weights: both hold the CLIP tower and mm_projector
CLIP_GRAPHS = ("vision_encoder", "mask_encoder")


@dataclass(frozen=True)
class InitializerBytes:
    """Where one initializer's bytes lie: ``file`` at ``offset``, ``nbytes`` long (raw, little-endian)."""
    name: str
    dtype: np.dtype
    shape: tuple
    file: Path
    offset: int
    nbytes: int

    def array(self) -> np.ndarray:
        """The bytes as a read-only array, memory-mapped (copied into an aligned buffer when the file's
        offset is not aligned for the dtype)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        a = np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return a if self.offset % 64 == 0 else np.array(a)


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or start, end) of each field of one protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            yield field, wire, v, i
        elif wire == 1:
            yield field, wire, i, i + 8
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field, wire, i, i + n
            i += n
        elif wire == 5:
            yield field, wire, i, i + 4
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor(buf, start: int, end: int, model_file: Path) -> InitializerBytes | None:
    dims, dtype, name, raw, external, location = [], None, "", None, {}, 0
    for field, wire, a, b in _fields(buf, start, end):
        if field == _T_DIMS:
            if wire == 0:
                dims.append(a)
            else:                                   # packed
                j = a
                while j < b:
                    d, j = _varint(buf, j)
                    dims.append(d)
        elif field == _T_DTYPE:
            dtype = a
        elif field == _T_NAME:
            name = bytes(buf[a:b]).decode("utf-8")
        elif field == _T_RAW:
            raw = (a, b)
        elif field == _T_EXTERNAL:
            kv = {f: bytes(buf[x:y]).decode("utf-8") for f, _, x, y in _fields(buf, a, b)}
            external[kv.get(1, "")] = kv.get(2, "")
        elif field == _T_LOCATION:
            location = a
    np_dtype = _ONNX_DTYPES.get(dtype)
    if np_dtype is None or not name:
        return None
    dt = np.dtype(np_dtype)
    count = int(np.prod(dims)) if dims else 1
    if location == 1:                               # TensorProto.EXTERNAL
        file = model_file.parent / external.get("location", "")
        offset, nbytes = int(external.get("offset", 0)), int(external.get("length", count * dt.itemsize))
    elif raw is not None:
        file, offset, nbytes = model_file, raw[0], raw[1] - raw[0]
    else:
        return None                                 # typed fields (float_data, ...): small, not shared
    if nbytes != count * dt.itemsize:
        return None
    return InitializerBytes(name, dt, tuple(int(d) for d in dims), file, offset, nbytes)


def initializer_bytes(model_file: str | Path) -> list[InitializerBytes]:
    """The main graph's initializers of ``model_file`` with where their bytes lie (raw data in the file
    itself or in its external data file). Initializers stored in typed fields are left out."""
    path = Path(model_file)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out = []
            for field, wire, a, b in _fields(buf, 0, len(buf)):
                if field == _MODEL_GRAPH and wire == 2:
                    for gf, gw, x, y in _fields(buf, a, b):
                        if gf == _GRAPH_INITIALIZER and gw == 2:
                            t = _tensor(buf, x, y, path)
                            if t is not None:
                                out.append(t)
            return out
    except (OSError, ValueError, IndexError) as exc:
        raise CheckpointError(f"cannot read the initializers of {path}: {exc}") from None


def _digest(t: InitializerBytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(t.file, "rb") as fh:
        fh.seek(t.offset)
        left = t.nbytes
        while left:
            chunk = fh.read(min(left, 1 << 24))
            if not chunk:
                raise CheckpointError(f"{t.file} ends inside initializer {t.name!r}")
            h.update(chunk)
            left -= len(chunk)
    return h.digest()


@dataclass
class SharedWeights:
    """What :func:`open_sessions_sharing_weights` shares: keep it alive as long as the sessions."""
    values: list            # the OrtValues handed to the sessions (views: of the memory maps, or on a device of
                            # one device copy each; see runtime/ort_values.user_owned_view)
    arrays: list            # the arrays under them
    shared_bytes: int       # bytes held once instead of once per session
    groups: int             # distinct shared initializers
    per_graph: dict         # graph → number of its initializers that are shared


def shared_initializers(files: Mapping[str, str | Path], min_bytes: int = _MIN_SHARED_BYTES) -> list[dict]:
    """Groups of identical initializers found in more than one of ``files`` (``{graph: onnx file}``):
    each ``{graph: InitializerBytes}``. Candidates are matched on dtype and shape first, then on a hash
    of their bytes."""
    by_shape: dict[tuple, dict[str, list[InitializerBytes]]] = {}
    for graph, f in files.items():
        for t in initializer_bytes(f):
            if t.nbytes >= min_bytes:
                by_shape.setdefault((t.dtype.str, t.shape), {}).setdefault(graph, []).append(t)
    groups = []
    for per_graph in by_shape.values():
        if len(per_graph) < 2:
            continue
        by_digest: dict[bytes, dict[str, InitializerBytes]] = {}
        for graph, ts in per_graph.items():
            for t in ts:
                by_digest.setdefault(_digest(t), {}).setdefault(graph, t)
        groups.extend(g for g in by_digest.values() if len(g) > 1)
    return groups


def open_sessions_sharing_weights(files: Mapping[str, str | Path], options_factory, providers,
                                  min_bytes: int = _MIN_SHARED_BYTES):
    """``({graph: InferenceSession}, SharedWeights)`` for ``files`` (``{graph: onnx file}``), identical
    initializers held once (see the module doc). ``options_factory()`` makes each session's SessionOptions."""
    from ..contracts import ort as ortc

    ortc.require_onnxruntime()
    groups = shared_initializers(files, min_bytes)
    opts = {}
    for graph in files:
        o = options_factory()
        o.add_session_config_entry(ortc.DISABLE_PREPACKING, "1")
        opts[graph] = o
    first_provider = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    device = ("cuda", int(dict(providers[0][1]).get("device_id", 0)) if isinstance(providers[0], tuple) else 0) \
        if first_provider == "CUDAExecutionProvider" else ("cpu", 0)   # one device copy, not one per session
    values, arrays, shared, per_graph = [], [], 0, {g: 0 for g in files}
    for group in groups:
        first = next(iter(group.values()))
        arr = first.array()
        value = user_owned_view(arr, device)     # add_initializer refuses an OrtValue that owns its buffer
        arrays.append(arr)
        values.append(value)
        shared += first.nbytes * (len(group) - 1)
        for graph, t in group.items():
            opts[graph].add_initializer(t.name, value)
            per_graph[graph] += 1
    sessions = {g: ortc.open_session(f, opts[g], providers, g) for g, f in files.items()}
    return sessions, SharedWeights(values, arrays, shared, len(groups), per_graph)


__all__ = ["CLIP_GRAPHS", "InitializerBytes", "initializer_bytes", "shared_initializers", "open_sessions_sharing_weights",
           "SharedWeights"]
