"""A conversation's KV cache as onnxruntime OrtValues on the llm session's device, run through IOBinding.

On a GPU, a :class:`~segllm_edge.runtime.kv_cache.HostKVCache` would cross PCIe twice per round (the
whole past to the device, the whole present back). Here the llm's ``present.*`` outputs are bound to
the device (``IOBinding.bind_output(name, "cuda", id)``) and become the next round's ``past_key_values.*``
inputs as they are (``bind_ortvalue_input``): between rounds the cache stays in device memory; only the
round's embeddings go in and its hidden states come out. The same code runs on the CPU (device
``("cpu", 0)``), which is how it is tested here.

Rolling a failed round back (``crop``) is the only path that copies the cache through the host.
"""
from __future__ import annotations

import numpy as np

from .kv_cache import HostKVCache
from .ort_values import bind_cpu_input, to_numpy, to_ortvalue


def concat_kv_cache(info, dtype, device=None) -> "HostKVCache | OrtValueKVCache":
    """An empty concat-layout KV cache for the llm described by ``info`` (``num_layers``, ``num_kv_heads``,
    ``head_dim``): OrtValues on ``device`` (``(device_type, device_id)``, run through IOBinding) or, with no
    device, host numpy arrays. The one choice both the in-process backend and the Triton BLS make."""
    if device is not None:
        return OrtValueKVCache(info.num_layers, info.num_kv_heads, info.head_dim, dtype, device)
    return HostKVCache(info.num_layers, info.num_kv_heads, info.head_dim, dtype=dtype)


class OrtValueKVCache:
    """Per-layer key/value OrtValues on ``device`` (``(device_type, device_id)``)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype=np.float32, device=("cpu", 0)):
        self.device = (str(device[0]), int(device[1]))
        self.dtype = np.dtype(dtype)
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=self.dtype)
        self.values = [to_ortvalue(empty, self.device) for _ in range(2 * layers)]

    @property
    def length(self) -> int:
        return int(self.values[0].shape()[2])

    def crop(self, length: int) -> None:
        if length < self.length:
            self.values = [to_ortvalue(to_numpy(v)[:, :, :length], self.device) for v in self.values]

    def nbytes(self) -> int:
        return int(sum(int(np.prod(v.shape())) for v in self.values) * self.dtype.itemsize)


def run_llm_bound(session, embeds: np.ndarray, cache: OrtValueKVCache, embeds_name: str, past: list[str],
                  hidden_name: str, present: list[str]) -> np.ndarray:
    """One llm call with the cache bound in place: returns the hidden states (host), ``cache`` grows."""
    io = session.io_binding()
    bind_cpu_input(io, embeds_name, embeds)
    for name, v in zip(past, cache.values):
        io.bind_ortvalue_input(name, v)
    io.bind_output(hidden_name, "cpu")
    for name in present:
        io.bind_output(name, *cache.device)
    session.run_with_iobinding(io)
    out = io.get_outputs()
    cache.values = list(out[1:])
    return to_numpy(out[0])


__all__ = ["OrtValueKVCache", "run_llm_bound"]
