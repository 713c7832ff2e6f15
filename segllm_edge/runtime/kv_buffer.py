"""A conversation's KV cache written in place: buffers with room for more tokens, for an llm graph in the
``"inplace"`` KV layout (:mod:`segllm_edge.export.kv_inplace`).

Per layer, key and value are one buffer each, ``(1, kv_heads, capacity, head_dim)``, of which the first
``length`` tokens are valid. A round binds every ``past_key_values.*`` input *and* its ``present.*`` output
to the same buffer (onnxruntime IOBinding) with ``past_length = length``: the graph's attention writes the
round's keys/values after the past and reads the past where it lies -- no copy of the past, no new tensor
per round (the ``"concat"`` layout made a new ``present.*`` of the whole conversation every round, and the
allocator a new block for each longer one).

* Capacity grows before a round that would not fit: to at least 1.5x (in blocks of :data:`BLOCK` tokens),
  but not past the model's context unless the round needs it; the valid part is copied once then
  (amortised: a ~1,800-token conversation is copied 3-4 times in all).
* Rollback (``crop``) only lowers ``length``: the tokens after it are overwritten by the next round.
* Host buffers are anonymous memory maps of their own (:func:`host_buffer`), so the buffers a growth replaces
  go back to the system at once. From the C heap, glibc kept them (buffers of up to 32 MiB fall under its
  dynamic mmap threshold once a block that size was freed): measured over Triton, the BLS's PSS rose by the
  old buffers (~65 MiB) at a ~500-token conversation's growth and stayed up.
* ``nbytes`` is what the buffers hold (capacity), the memory the session budget and the memory figures count;
  ``valid_bytes`` the part in use.
* On a GPU (``device=("cuda", id)``) the buffers are device OrtValues bound with ``bind_ortvalue_input/output``;
  growth is then the only path that copies the cache through the host. Only fp16/bf16 caches go there
  (onnxruntime's CUDA GroupQueryAttention has no fp32 kernel: an fp32 graph's attention runs on the CPU
  provider, and :func:`inplace_cache` keeps its buffers in host memory). Not yet run on a GPU. ``("cpu", 0)`` runs the same code.
"""
from __future__ import annotations

import mmap

import numpy as np

from ..contracts.manifest import PAST_LENGTH
from ..errors import BackendError
from .ort_values import bind_cpu_input, element_type, to_numpy, to_ortvalue

#: capacity grows in multiples of this many tokens
BLOCK = 256
GROWTH = 1.5


def _round_up(n: int, block: int = BLOCK) -> int:
    return -(-int(n) // block) * block


def host_buffer(shape, dtype) -> np.ndarray:
    """A zero-filled host array in a private anonymous memory map of its own: unmapped (returned to the system)
    when the last reference to it goes, whatever the C allocator's thresholds; page-aligned; pages are only
    resident once written. Private (not shared with a forked child), and advised for transparent huge pages
    as numpy advises its own large arrays."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    flags = getattr(mmap, "MAP_PRIVATE", None)
    region = mmap.mmap(-1, max(1, count * dtype.itemsize), **({} if flags is None else {"flags": flags}))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:   # a kernel without transparent huge pages
            pass
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)


class BufferKVCache:
    """Per-layer key/value buffers of ``capacity`` tokens, ``length`` of them valid. ``device``: None (numpy
    buffers in host memory) or ``(device_type, device_id)`` (onnxruntime OrtValues there)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype=np.float32, max_tokens: int | None = None,
                 device=None):
        self.layers, self.kv_heads, self.head_dim = int(layers), int(kv_heads), int(head_dim)
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.device = None if device is None else (str(device[0]), int(device[1]))
        self.length = 0
        self.capacity = 0
        self.buffers: list = []          # numpy arrays (host) or OrtValues (device)
        self.grown = 0                   # how many times the buffers were reallocated

    # ------------------------------------------------------------------ state
    def crop(self, length: int) -> None:
        self.length = max(0, min(int(length), self.length))

    def nbytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize

    def valid_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.length * self.head_dim * self.dtype.itemsize

    def views(self) -> list[np.ndarray]:
        """The valid part of every buffer, ``(1, kv_heads, length, head_dim)`` (host views; device copies)."""
        if self.device is None:
            return [b[:, :, :self.length] for b in self.buffers]
        return [to_numpy(v)[:, :, :self.length] for v in self.buffers]

    @property
    def arrays(self) -> list[np.ndarray]:    # the name HostKVCache has (tests, the TensorRT comparisons)
        return self.views()

    def data_pointers(self) -> list[int]:
        """Where each buffer lies (the same across rounds until the capacity grows)."""
        if self.device is None:
            return [int(b.ctypes.data) for b in self.buffers]
        return [int(v.data_ptr()) for v in self.buffers]

    # ----------------------------------------------------------------- growth
    def reserve(self, total: int) -> None:
        """Room for ``total`` tokens (the valid part kept)."""
        if total <= self.capacity:
            return
        grow = _round_up(max(total, self.capacity * GROWTH))
        if self.max_tokens is not None and total <= self.max_tokens:
            grow = min(grow, max(self.max_tokens, total))
        shape = (1, self.kv_heads, grow, self.head_dim)
        n = self.length
        if self.device is None:
            new = []
            for old in self.buffers or [None] * (2 * self.layers):
                b = host_buffer(shape, self.dtype)
                if old is not None and n:
                    b[:, :, :n] = old[:, :, :n]
                new.append(b)
        else:
            new = []
            for old in self.buffers or [None] * (2 * self.layers):
                host = np.zeros(shape, dtype=self.dtype)
                if old is not None and n:
                    host[:, :, :n] = to_numpy(old)[:, :, :n]
                new.append(to_ortvalue(host, self.device))
        self.buffers, self.capacity = new, grow
        self.grown += 1

    # ------------------------------------------------------------------ a run
    def bind(self, io, past: list[str], present: list[str]) -> None:
        """Bind every past input and its present output to the same buffer."""
        for name_in, name_out, b in zip(past, present, self.buffers):
            if self.device is None:
                shape, ptr, et = list(b.shape), int(b.ctypes.data), element_type(self.dtype)
                io.bind_input(name_in, "cpu", 0, et, shape, ptr)
                io.bind_output(name_out, "cpu", 0, et, shape, ptr)
            else:
                io.bind_ortvalue_input(name_in, b)
                io.bind_ortvalue_output(name_out, b)


def session_kv_device(session):
    """Where a session's KV buffers belong: None (host numpy) on the CPU, ``("cuda", id)`` for a session whose
    first provider is CUDA (the cache then stays in device memory between rounds)."""
    get = getattr(session, "get_providers", None)
    if get is None or not get() or get()[0] != "CUDAExecutionProvider":
        return None
    opts = session.get_provider_options().get("CUDAExecutionProvider", {})
    return ("cuda", int(opts.get("device_id", 0)))


#: the first onnxruntime whose GroupQueryAttention takes several new tokens on top of a past in a shared buffer
#: ("continuous decoding", onnxruntime PR 21523, release 1.20); older ones reject a multi-token round
MIN_ONNXRUNTIME = (1, 20)


def check_onnxruntime_version(version: str) -> None:
    """A :class:`BackendError` if onnxruntime ``version`` cannot run an ``"inplace"``-layout llm graph."""
    try:
        have = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return   # a development build: let it try
    if have < MIN_ONNXRUNTIME:
        raise BackendError(f"the in-place KV layout needs onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME))} "
                           f"(GroupQueryAttention over a past), this is {version}: upgrade onnxruntime or use an "
                           "export in the concat layout")


def inplace_cache(info, dtype, device=None) -> BufferKVCache:
    """The cache of an ``"inplace"``-layout export described by ``info`` (a ModelInfo).

    ``device`` is where the session runs; the buffers go where its GroupQueryAttention kernel runs: onnxruntime's
    CUDA kernel takes fp16/bf16 only, an fp32 graph's attention runs on the CPU provider, so its buffers stay in
    host memory (device buffers would cross PCIe whole, twice per round)."""
    from ..contracts.ort import require_onnxruntime

    check_onnxruntime_version(require_onnxruntime().__version__)
    if device is not None and str(device[0]) == "cuda" and np.dtype(dtype) == np.float32:
        device = None
    return BufferKVCache(info.num_layers, info.num_kv_heads, info.head_dim, dtype, max_tokens=info.max_context,
                         device=device)


def run_llm_inplace(session, embeds: np.ndarray, cache: BufferKVCache, embeds_name: str, past: list[str],
                    hidden_name: str, present: list[str], run_options=None) -> np.ndarray:
    """One llm call of an ``"inplace"``-layout graph: the round's tokens are written into ``cache`` after its
    valid part; returns the hidden states (host)."""
    if not hasattr(session, "io_binding"):
        raise BackendError("the llm of an export with the in-place KV layout runs on onnxruntime only (IOBinding, "
                           f"com.microsoft.GroupQueryAttention), not on {type(session).__name__}; use "
                           "backend='onnxruntime', or an export in the concat layout")
    embeds = np.ascontiguousarray(embeds)
    new = int(embeds.shape[1])
    cache.reserve(cache.length + new)
    io = session.io_binding()
    bind_cpu_input(io, embeds_name, embeds)
    io.bind_cpu_input(PAST_LENGTH, np.array([cache.length], dtype=np.int64))
    io.bind_output(hidden_name, "cpu")         # first: get_outputs() lists them in the order they were bound
    cache.bind(io, past, present)
    if run_options is None:
        session.run_with_iobinding(io)
    else:
        session.run_with_iobinding(io, run_options)
    cache.length += new              # only once the run succeeded
    # a copy (one row block per new token): a view would keep the session's arena alive after the lean drift
    # probe closes the session (runtime/lean_sessions.OwnedOutputs)
    return np.array(to_numpy(io.get_outputs()[0]), copy=True)


__all__ = ["BLOCK", "BufferKVCache", "MIN_ONNXRUNTIME", "check_onnxruntime_version", "host_buffer", "inplace_cache", "run_llm_inplace", "session_kv_device"]
