"""The KV cache of a conversation kept in host memory as numpy arrays (onnxruntime backend, Triton BLS model)."""
from __future__ import annotations

import numpy as np


class HostKVCache:
    """Per-layer key/value arrays as the llm graph returned them (kept by reference, no copy per round)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype=np.float32):
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
        self.arrays: list[np.ndarray] = [empty] * (2 * layers)

    @property
    def length(self) -> int:
        return int(self.arrays[0].shape[2])

    def crop(self, length: int) -> None:
        if length < self.length:
            self.arrays = [np.ascontiguousarray(a[:, :, :length]) for a in self.arrays]

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))
