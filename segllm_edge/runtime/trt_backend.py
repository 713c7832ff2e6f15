"""The TensorRT backend: runs the engines ``segllm-edge build-engines`` built for an export folder.

Same Backend protocol as :class:`~segllm_edge.runtime.ort_backend.OrtBackend` (one method per
manifest graph), with the data kept on the GPU: every engine reads and writes torch CUDA tensors
(``set_tensor_address`` on their ``data_ptr``), so the stages chain without host round trips and torch's
caching allocator serves the I/O buffers.

Stream. Every engine runs on one CUDA stream the backend creates (``enqueueV3`` on the legacy default
stream makes TensorRT add a ``cudaStreamSynchronize`` around each call and warns about it); each protocol
method makes that stream wait for the caller's current stream, runs its torch ops and engines on it, and
makes the caller's stream wait for it before returning, so callers see their results in order on their own
stream.

KV cache (:class:`TrtKVCache`). The ``llm`` graph takes the past keys/values and returns
``present = concat(past, new)``. The cache holds two preallocated device pools (capacity in tokens,
grown by doubling, capped at the context); each round reads the past from one pool and TensorRT writes
the present straight into the other, then they swap. No copy is made by the backend per round (the
concat is inside the engine, as in the onnxruntime graph) and nothing is allocated per round; a copy
happens only when the capacity grows or a failed round is cropped.

Empty cache (``empty_past='bos_prefix'``, the builder's default; see
:mod:`segllm_edge.contracts.engine_profiles`). TensorRT's profiles have ``past >= 1``, so a new
conversation's cache starts with the K/V of the BOS token at position 0, read from
``llm_bos_prefix.npz`` next to the engines. On the first call the backend checks that the first
embedding row is the BOS embedding, writes its K/V into the cache, returns the stored BOS hidden state
as row 0 and runs the engine on the remaining rows. ``cache.length`` counts the BOS token like the
onnxruntime cache does, so the session's token accounting (context length, KV bytes) is identical.
Engines built with ``empty_past='empty_tensor'`` (profiles with ``past`` min 0) get the empty cache.

Calls larger than a profile's max are split: row-independent graphs (``masks``/``n``/``batch``) by
rows, the llm as a chunked prefill on the cache (exact).

``tensorrt`` is imported only when a backend is created; without it :meth:`TrtBackend.from_export`
raises :class:`~segllm_edge.errors.BackendError` with install instructions.

Not run against a real TensorRT in this project (none is installable there): the tests drive this
module with a stand-in ``tensorrt`` module that executes the ONNX graphs with onnxruntime on the CPU.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch

from ..contracts.engine_profiles import Profile, profiles_from_json, select_profile
from ..contracts.engines import (BOS_PREFIX_FILE, DEFAULT_ENGINES_SUBDIR, REBUILD_HINT, current_device, find_engine,
                                 require_tensorrt)
from ..contracts.manifest import Manifest, kv_names
from ..contracts.model_info import ModelInfo
from ..errors import BackendError, CheckpointError
from ..pipeline.tokenizer import SegLLMTokenizer

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
_BLOCK = 256  # KV cache capacity granularity (tokens)


def _dtype_name(dt) -> str:
    return getattr(dt, "name", None) or str(dt).rsplit(".", 1)[-1]


def _torch_dtype(dt) -> torch.dtype:
    name = _dtype_name(dt)
    if name not in _TORCH_DTYPES:
        raise BackendError(f"engine tensor type {name} has no torch equivalent here")
    return _TORCH_DTYPES[name]


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


# ------------------------------------------------------------------------------------------ KV cache
class TrtKVCache:
    """Per-layer K/V of one conversation in two preallocated device pools (see the module docstring).

    ``views()`` are the current past tensors, each dense ``(1, kv_heads, length, head_dim)`` (the
    layout the engine reads): tensor ``j`` lives at the start of region ``j`` of the current pool.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 max_tokens: int, block: int = _BLOCK):
        self.count = 2 * layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_tokens, self.block = int(max_tokens), int(block)
        self.capacity = 0
        self._len = 0
        self._pools: list[torch.Tensor | None] = [None, None]
        self._cur = 0
        self.grow_count = 0  # times the pools were reallocated (tests and diagnostics)

    @property
    def length(self) -> int:
        return self._len

    def _region(self, cap: int) -> int:
        return self.kv_heads * cap * self.head_dim

    def _views(self, pool: torch.Tensor, cap: int, length: int) -> list[torch.Tensor]:
        per, n = self._region(cap), self.kv_heads * length * self.head_dim
        return [pool[j * per: j * per + n].view(1, self.kv_heads, length, self.head_dim) for j in range(self.count)]

    def views(self) -> list[torch.Tensor]:
        """The cached K/V (past) tensors, in the llm graph's ``past_key_values.*`` order."""
        if self.capacity == 0:
            return [torch.empty((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
                    for _ in range(self.count)]
        return self._views(self._pools[self._cur], self.capacity, self._len)

    def next_views(self, total: int) -> list[torch.Tensor]:
        """Dense ``(1, kv_heads, total, head_dim)`` tensors in the spare pool, for the engine's present outputs."""
        self.reserve(total)
        return self._views(self._pools[1 - self._cur], self.capacity, total)

    def commit(self, total: int) -> None:
        """The engine wrote ``total`` tokens into the spare pool: it becomes the current one."""
        self._cur = 1 - self._cur
        self._len = total

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens (doubling, in blocks, capped at the context)."""
        if tokens <= self.capacity:
            return
        cap = max(_round_up(tokens, self.block), min(2 * self.capacity, _round_up(self.max_tokens, self.block)))
        size = self.count * self._region(cap)
        new_cur = torch.empty(size, dtype=self.dtype, device=self.device)
        if self._len:
            for dst, src in zip(self._views(new_cur, cap, self._len), self.views()):
                dst.copy_(src)
        self._pools = [None, None]  # free the old pools before allocating the second new one
        self._pools[self._cur] = new_cur
        self._pools[1 - self._cur] = torch.empty(size, dtype=self.dtype, device=self.device)
        self.capacity = cap
        self.grow_count += 1

    def write_prefix(self, arrays: list[torch.Tensor]) -> None:
        """Start an empty cache with ``arrays`` (the BOS token's K/V, each ``(1, kv_heads, n, head_dim)``)."""
        n = int(arrays[0].shape[2])
        self.reserve(n)
        for dst, src in zip(self._views(self._pools[self._cur], self.capacity, n), arrays):
            dst.copy_(src)
        self._len = n

    def crop(self, length: int) -> None:
        if length >= self._len:
            return
        if length <= 0:
            self._len = 0
            return
        # a shorter cache has a smaller head stride: re-lay it out densely in the spare pool
        for dst, src in zip(self._views(self._pools[1 - self._cur], self.capacity, length), self.views()):
            dst.copy_(src[:, :, :length])
        self.commit(length)

    def nbytes(self) -> int:
        """Bytes of the cached tokens (what the onnxruntime cache reports)."""
        return self.count * self.kv_heads * self._len * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def allocated_bytes(self) -> int:
        """Device bytes held by both pools."""
        return int(sum(p.numel() * p.element_size() for p in self._pools if p is not None))


# ------------------------------------------------------------------------------------ one engine
class _OutsideProfiles(BackendError):
    pass


class _Engine:
    """One deserialized engine with its execution context, I/O names, dtypes and profiles."""

    def __init__(self, trt, name: str, engine, spec, profiles: list[Profile], meta: dict, path: Path,
                 device: torch.device):
        self.trt, self.name, self.engine, self.spec = trt, name, engine, spec
        self.profiles, self.meta, self.path, self.device = profiles, meta, path, device
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {name} (out of device memory?)")
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            n = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else outputs).append(n)
        want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        extra = sorted(set(inputs) - set(want_in))
        missing_out = [n for n in want_out if n not in outputs]
        if extra or missing_out:
            raise BackendError(f"engine {path.name} does not match the export's {name} graph (inputs {inputs}, "
                               f"outputs {outputs}; the manifest has {want_in} → {want_out}); {REBUILD_HINT}")
        self.inputs = [n for n in want_in if n in inputs]   # TensorRT drops inputs the network does not use
        self.outputs = want_out
        self.dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in (*self.inputs, *self.outputs)}
        self.axes = {t.name: t.dynamic_axes for t in spec.inputs}
        n_prof = int(getattr(engine, "num_optimization_profiles", 1) or 1)
        dynamic = any(self.axes.values())
        if dynamic and n_prof != len(profiles):
            raise BackendError(f"engine {path.name} has {n_prof} optimisation profile(s), its metadata "
                               f"lists {len(profiles)}; {REBUILD_HINT}")
        self._profile = 0
        self._dummy = None  # address for zero-sized tensors (TensorRT wants a non-null pointer)
        self.stream = None  # the backend's own CUDA stream (set by TrtBackend); None: torch's current one

    # -- shapes and profiles
    def axis_values(self, feeds: dict) -> dict[str, int]:
        vals: dict[str, int] = {}
        for n, ax in self.axes.items():
            if n in feeds:
                for i, a in ax.items():
                    vals[a] = int(feeds[n].shape[i])
        return vals

    def axis_max(self, axis: str) -> int | None:
        highs = [p.axes[axis].max for p in self.profiles if axis in p.axes]
        return max(highs) if highs else None

    def _stream(self) -> int:
        if self.stream is not None:
            return int(self.stream.cuda_stream)
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _address(self, t: torch.Tensor) -> int:
        if t.numel() == 0:
            if self._dummy is None:
                self._dummy = torch.zeros(64, dtype=torch.uint8, device=self.device)
            return self._dummy.data_ptr()
        return t.data_ptr()

    def run(self, feeds: dict, out: dict | None = None) -> dict[str, torch.Tensor]:
        """Execute on the backend's stream (see the module's docstring); ``out`` supplies output buffers (e.g. KV
        cache views)."""
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self._run(feeds, out)
        return self._run(feeds, out)

    def _run(self, feeds: dict, out: dict | None) -> dict[str, torch.Tensor]:
        values = self.axis_values(feeds)
        idx = select_profile(self.profiles, values) if self.profiles else 0
        if idx is None:
            raise _OutsideProfiles(f"{self.name}: {values} is outside every optimisation profile")
        ctx, stream = self.context, self._stream()
        if idx != self._profile:
            if not ctx.set_optimization_profile_async(idx, stream):
                raise BackendError(f"TensorRT refused optimisation profile {idx} of {self.name}")
            self._profile = idx
        keep = []
        for n in self.inputs:
            t = feeds[n]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            t = t.to(device=self.device, dtype=self.dtypes[n]).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise BackendError(f"TensorRT rejected shape {tuple(t.shape)} for {self.name} input {n!r} "
                                   f"(profile {self.profiles[idx].name if self.profiles else 0})")
            ctx.set_tensor_address(n, self._address(t))
        results = {}
        for n in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BackendError(f"TensorRT could not infer the shape of {self.name} output {n!r} ({shape})")
            buf = (out or {}).get(n)
            if buf is None:
                buf = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
            elif tuple(buf.shape) != shape or buf.dtype != self.dtypes[n] or not buf.is_contiguous():
                raise RuntimeError(f"internal: output buffer for {n} is {tuple(buf.shape)} {buf.dtype}, "
                                   f"the engine writes {shape} {self.dtypes[n]}")
            ctx.set_tensor_address(n, self._address(buf))
            results[n] = buf
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"TensorRT failed to run {self.name} (see the TensorRT log)")
        return results

    def run_rows(self, feeds: dict, axis: str) -> dict[str, torch.Tensor]:
        """Run, split along dim 0 of the inputs whose first axis is ``axis`` when it exceeds the profiles."""
        rows = self.axis_values(feeds).get(axis)
        cap = self.axis_max(axis)
        if rows is None or cap is None or rows <= cap:
            return self.run(feeds)
        split = {n for n, ax in self.axes.items() if ax.get(0) == axis}
        parts = [self.run({n: (v[s:s + cap] if n in split else v) for n, v in feeds.items()})
                 for s in range(0, rows, cap)]
        return {n: torch.cat([p[n] for p in parts], dim=0) for n in self.outputs}

    def device_memory_bytes(self) -> int:
        for attr in ("device_memory_size_v2", "device_memory_size"):
            v = getattr(self.engine, attr, None)
            if isinstance(v, int):
                return v
        return 0


# ------------------------------------------------------------------------------------------ backend
def _on_own_stream(method):
    """Run a protocol method on the backend's stream, ordered after the caller's stream and before it."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        own = self.stream
        if own is None or self.device.type != "cuda":
            return method(self, *args, **kwargs)
        caller = torch.cuda.current_stream(self.device)
        own.wait_stream(caller)              # inputs the caller produced on its stream
        with torch.cuda.stream(own):
            out = method(self, *args, **kwargs)
        caller.wait_stream(own)              # the caller reads the results on its stream
        return out
    return wrapper


class TrtBackend:
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, tokenizer: SegLLMTokenizer, engines: dict[str, _Engine],
                 embed: np.ndarray, bos: dict | None, device: torch.device, engines_dir: Path, runtime=None):
        self.folder = folder
        self.manifest = manifest
        self.info = ModelInfo(**manifest.model)
        self.tokenizer = tokenizer
        self.engines = engines
        self.embed = embed
        self.device = torch.device(device)
        self.engines_dir = engines_dir
        self._runtime = runtime  # engines must not outlive their runtime
        self.stream = None
        if self.device.type == "cuda":
            self.use_stream(torch.cuda.Stream(self.device))
        self.precision = engines["llm"].meta["precision"] if "llm" in engines else manifest.precision
        self._past, self._present = kv_names(self.info.num_layers)
        llm = engines["llm"]
        self._kv_dtype = llm.dtypes[self._past[0]]
        self._embed_dtype = llm.dtypes["inputs_embeds"]
        self.empty_past_ok = any(p.axes["past"].min == 0 for p in llm.profiles if "past" in p.axes)
        self.bos = None
        if bos is not None:
            dev = self.device
            self.bos = {"embedding": torch.as_tensor(bos["bos_embedding"]).to(dev, torch.float32),
                        "hidden": torch.as_tensor(bos["hidden_states"]).to(dev, torch.float32),
                        "kv": [torch.as_tensor(bos[n]).to(dev, self._kv_dtype).contiguous() for n in self._present]}
        elif not self.empty_past_ok:
            raise BackendError(f"the llm engine needs a non-empty KV cache (profiles have past >= 1) but "
                               f"{BOS_PREFIX_FILE} is missing in {engines_dir}; {REBUILD_HINT}")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_export(cls, path, engines_dir=None, device: str = "cuda", precision: str | None = None,
                    allow_other_gpu: bool = False) -> "TrtBackend":
        """Load the engines for the export at ``path`` (default ``<path>/engines``) on ``device``.

        ``precision``: which engines when several were built (fp16, bf16, ...); the HIPIE graphs' fp32
        engines are always accepted. Raises BackendError when TensorRT, a GPU or a usable engine is
        missing (an engine built for another GPU, TensorRT version or ONNX graph is refused with the
        reason and a rebuild hint)."""
        trt = require_tensorrt()
        dev = torch.device(device)
        if dev.type != "cuda":
            raise BackendError(f"the TensorRT backend runs on CUDA devices only, not {device!r}")
        devinfo = current_device(dev.index or 0)
        dev = torch.device("cuda", dev.index or 0)
        with torch.cuda.device(dev):  # TensorRT deserializes onto the current CUDA device
            return cls._from_engines(trt, path, engines_dir, devinfo, dev, precision=precision,
                                     allow_other_gpu=allow_other_gpu)

    @classmethod
    def _from_engines(cls, trt, path, engines_dir, devinfo, device: torch.device, precision: str | None = None,
                      allow_other_gpu: bool = False) -> "TrtBackend":
        folder = Path(path)
        manifest = Manifest.load(folder)
        manifest.check_files(folder)
        if "llm" not in manifest.graphs:
            raise CheckpointError(f"export {folder} has no llm graph; re-export with `segllm-edge export`")
        edir = Path(engines_dir) if engines_dir else folder / DEFAULT_ENGINES_SUBDIR
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")  # plugin engines (deformable attention plugin) need them
        runtime = trt.Runtime(logger)
        engines: dict[str, _Engine] = {}
        # the llm first: without an explicit precision, the other graphs follow the llm engine's
        for name in sorted(manifest.graphs, key=lambda g: g != "llm"):
            spec = manifest.graphs[name]
            plan, meta = cls._find(edir, name, devinfo, precision, folder / spec.file, allow_other_gpu)
            if precision is None and name == "llm":
                precision = meta["precision"]
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not deserialize {plan} (corrupt, or built by another "
                                   f"TensorRT); {REBUILD_HINT}")
            profiles = profiles_from_json({name: meta.get("profiles") or []})[name]
            engines[name] = _Engine(trt, name, engine, spec, profiles, meta, plan, device)
        try:
            embed = np.load(folder / manifest.arrays["embed_tokens"], mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"cannot read {manifest.arrays['embed_tokens']} in {folder}: {exc}") from None
        tokenizer = SegLLMTokenizer.from_folder(folder / manifest.tokenizer_dir)
        bos = cls._load_bos(edir, engines["llm"], manifest)
        return cls(folder, manifest, tokenizer, engines, embed, bos, device, edir, runtime)

    @staticmethod
    def _find(edir: Path, name: str, devinfo, precision, onnx_path: Path, allow_other_gpu: bool):
        # a graph kept fp32 (HIPIE) or built fp16 for want of Q/DQ nodes has its own precision in the key
        accepted = [precision] if precision else [None]
        if precision:
            accepted += ["fp32"] + (["fp16"] if precision in ("int8", "fp8") else [])
        first_error = None
        for p in accepted:
            try:
                plan, meta, comp = find_engine(edir, name, devinfo, precision=p, onnx_path=onnx_path,
                                               allow_other_gpu=allow_other_gpu)
            except BackendError as exc:
                first_error = first_error or exc
                continue
            for w in comp.warnings:
                warnings.warn(w, stacklevel=3)
            return plan, meta
        raise first_error

    @staticmethod
    def _load_bos(edir: Path, llm: _Engine, manifest: Manifest) -> dict | None:
        path = edir / BOS_PREFIX_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            bos = {k: z[k] for k in z.files}
        if str(bos.get("onnx_sha256", "")) != llm.meta["onnx_sha256"]:
            raise BackendError(f"{path} was computed from another llm graph than engine {llm.path.name}; "
                               f"{REBUILD_HINT} --force")
        m = manifest.model
        want = (1, int(m["num_kv_heads"]), 1, int(m["head_dim"]))
        past, present = kv_names(int(m["num_layers"]))
        bad = [n for n in present if n not in bos or tuple(bos[n].shape) != want]
        if bad or tuple(bos["bos_embedding"].shape) != (int(m["hidden_size"]),):
            raise BackendError(f"{path} does not fit this model (e.g. {bad[:1]}); {REBUILD_HINT} --force")
        return bos

    # ------------------------------------------------------------------ helpers
    def _dev(self, t, dtype=None) -> torch.Tensor:
        """A session's numpy input (or a tensor) on this backend's device."""
        return torch.as_tensor(t).to(self.device, dtype=dtype or torch.float32)

    def use_stream(self, stream) -> None:
        """Run every engine on ``stream`` (a ``torch.cuda.Stream``; the backend makes its own by default)."""
        self.stream = stream
        for engine in self.engines.values():
            engine.stream = stream

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------- protocol
    def embed_tokens(self, ids) -> torch.Tensor:
        rows = np.asarray(self.embed[np.asarray(ids, dtype=np.int64)], dtype=np.float32)
        return torch.from_numpy(rows).to(self.device)

    @_on_own_stream
    def encode_image(self, pixels):
        g = self.engines["vision_encoder"]
        return g.run_rows({"pixel_values": self._dev(pixels)}, "batch")["image_tokens"].float()

    @_on_own_stream
    def encode_masks(self, crops, boxes):
        g = self.engines["mask_encoder"]
        return g.run_rows({"crops": self._dev(crops), "boxes": self._dev(boxes)}, "masks")["mask_tokens"].float()

    def new_cache(self) -> TrtKVCache:
        return TrtKVCache(self.info.num_layers, self.info.num_kv_heads, self.info.head_dim, self._kv_dtype,
                          self.device, self.info.max_context)

    def _check_bos(self, row: torch.Tensor) -> None:
        ref = self.bos["embedding"]
        if not torch.allclose(row.float(), ref, rtol=1e-3, atol=1e-5):
            raise BackendError(
                "the TensorRT llm engine was built with empty_past='bos_prefix': a conversation must start with "
                f"the BOS token (id {self.tokenizer.bos_id}), and this input's first row is not its embedding. "
                "Rebuild with BuildOptions(empty_past='empty_tensor') to feed other prefixes.")

    def _llm_chunk(self, past: int, remaining: int) -> int:
        llm = self.engines["llm"]
        fits = [p.axes["seq"].max for p in llm.profiles if "past" in p.axes and p.axes["past"].contains(past)]
        if not fits:
            raise BackendError(f"no optimisation profile of the llm engine accepts a KV cache of {past} tokens; "
                               f"{REBUILD_HINT} (the profiles come from the manifest's max_context)")
        return min(remaining, max(fits))

    def _llm_step(self, x: torch.Tensor, cache: TrtKVCache) -> torch.Tensor:
        past_len = cache.length
        total = past_len + int(x.shape[1])
        present = cache.next_views(total)     # may grow (and re-lay) the pools: take the past views after it
        feeds = {"inputs_embeds": x, **dict(zip(self._past, cache.views()))}
        out = self.engines["llm"].run(feeds, out=dict(zip(self._present, present)))
        cache.commit(total)
        return out["hidden_states"]

    @_on_own_stream
    def llm(self, embeds, cache: TrtKVCache | None):
        x = torch.as_tensor(embeds).to(self.device, self._embed_dtype).contiguous()
        if x.dim() != 3 or x.shape[0] != 1:
            raise BackendError(f"the TensorRT llm runs one conversation at a time (batch 1), got {tuple(x.shape)}")
        if cache is None:  # a stateless call (reuse=False): a throw-away cache
            cache = self.new_cache()
        cache.reserve(cache.length + int(x.shape[1]))  # one allocation for the whole call
        parts: list[torch.Tensor] = []
        if cache.length == 0 and not self.empty_past_ok:
            self._check_bos(x[0, 0])
            cache.write_prefix(self.bos["kv"])
            parts.append(self.bos["hidden"])
            x = x[:, 1:]
        pos, n = 0, int(x.shape[1])
        while pos < n:
            step = self._llm_chunk(cache.length, n - pos)
            try:
                parts.append(self._llm_step(x[:, pos:pos + step], cache).float())
            except _OutsideProfiles as exc:
                raise BackendError(f"{exc}; {REBUILD_HINT}") from None
            pos += step
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @_on_own_stream
    def seg_head(self, hidden):
        return self.engines["seg_head"].run_rows({"hidden": self._dev(hidden)}, "n")["conditioning"]

    @_on_own_stream
    def mask_backbone(self, image):
        g = self.engines["mask_backbone"]
        out = g.run({g.spec.inputs[0].name: self._dev(image)})
        return [out[t.name] for t in g.spec.outputs]

    @_on_own_stream
    def mask_decode(self, features, cond):
        g = self.engines["mask_decoder"]
        feeds = {f"features.{i}": f for i, f in enumerate(features)}
        feeds["conditioning"] = cond
        return g.run_rows(feeds, "n")

    def memory_bytes(self):
        """torch's allocations on the device (I/O buffers, KV caches, features) plus the engines'
        activation memory and plan sizes (about their weights): an estimate, TensorRT allocates those."""
        if self.device.type != "cuda":
            return None
        engines = sum(g.device_memory_bytes() + g.path.stat().st_size for g in self.engines.values())
        return int(torch.cuda.memory_allocated(self.device)) + int(engines)
