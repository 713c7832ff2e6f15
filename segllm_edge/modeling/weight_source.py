"""Checkpoint tensors read one at a time, on demand (the weights of a lazily loaded model).

A 7B checkpoint does not fit in an edge machine's memory twice (and not at all in fp32): the exporter and the
layer-streaming reference read each tensor from its safetensors file when it is needed and drop it after.
:class:`WeightSource` knows, for every module key of :class:`~segllm_edge.modeling.segllm.SegLLMModel` whose
parameter was left on the meta device, which file and key hold it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor's file, key, shape and dtype, read from the safetensors header (no data)."""
    file: Path
    key: str
    shape: tuple
    dtype: torch.dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def read_tensor_infos(files) -> dict[str, TensorInfo]:
    """The tensors of (sharded) safetensors files without their data; CheckpointError for a bad file."""
    from safetensors import SafetensorError, safe_open

    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if k in infos:
                        raise CheckpointError(f"{f} repeats key {k} already read from another shard")
                    s = h.get_slice(k)
                    infos[k] = TensorInfo(Path(f), k, tuple(s.get_shape()), _dtype(s.get_dtype()))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read weights file {f}: {exc} (corrupt or truncated?)") from None
    return infos


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return _DTYPES[name]


@dataclass
class WeightSource:
    """module key → the checkpoint tensor holding it; :meth:`get` reads one tensor (a copy, in ``dtype``).

    Each read opens the file and closes it again: safetensors maps the file, and the pages a mapping has touched
    count in the process's resident set until it is unmapped (a 7B checkpoint read through one long-lived mapping
    would end up resident in full)."""
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __contains__(self, module_key: str) -> bool:
        return module_key in self.infos

    def get(self, module_key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        info = self.infos[module_key]
        with safe_open(str(info.file), framework="pt") as h:
            t = h.get_tensor(info.key).clone()  # a copy of its own: nothing keeps the mapping alive
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
