"""The engine folder layout (``<export>/engines`` by default, the BOS prefix file, the TensorRT import) and
the engine cache: a TensorRT engine is only valid on the GPU architecture and TensorRT version it was
built with, for the ONNX graph and precision it was built from. Each engine ``<name>.plan`` has a JSON
sidecar ``<name>.plan.json`` with that key; engines for different GPUs / TensorRT versions can share
one folder because the key is part of the file name.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BackendError

DEFAULT_ENGINES_SUBDIR = "engines"
BOS_PREFIX_FILE = "llm_bos_prefix.npz"
SIDECAR_FORMAT = 1
INSTALL_HINT = (
    "TensorRT is not installed (the Python module `tensorrt` cannot be imported). TensorRT is not on the "
    "package registries segllm-edge installs from; get it from NVIDIA: on Jetson it ships with JetPack "
    "(apt packages `nvidia-tensorrt` and `python3-libnvinfer`; use the system python3 or a venv made with "
    "--system-site-packages); on x86_64 servers use the NGC container `nvcr.io/nvidia/tensorrt:<yy.mm>-py3` "
    "(or `pip install tensorrt` with access to pypi.nvidia.com). See docs/tensorrt.md. The onnxruntime backend "
    "(`load(export, backend=\"onnxruntime\")`, or backend=\"cuda\" with onnxruntime-gpu) works without it."
)


def require_tensorrt():
    """``import tensorrt`` or a BackendError saying how to get it."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} (import error: {exc})") from None
    except OSError as exc:  # bindings present, libnvinfer missing (e.g. a bare tensorrt-cuXX-bindings wheel)
        raise BackendError(f"{INSTALL_HINT} (the bindings are installed but the TensorRT libraries are not: {exc})") from None
    return trt


REBUILD_HINT = "rebuild with `segllm-edge build-engines`"


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str                       # e.g. "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: tuple           # (major, minor)
    trt_version: str                    # tensorrt.__version__, e.g. "10.3.0"

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"{self.gpu_name} ({self.sm}) with TensorRT {short_version(self.trt_version)}"


def short_version(v: str) -> str:
    """'10.3.0.26' → '10.3' (what users recognise); the comparison uses the full string."""
    return ".".join(str(v).split(".")[:2])


def current_device(device_index: int = 0) -> DeviceInfo:
    """The GPU and TensorRT of this machine (imports torch.cuda and tensorrt)."""
    import torch

    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise BackendError("no CUDA device is visible: TensorRT engines need an NVIDIA GPU "
                           "(check the driver, CUDA_VISIBLE_DEVICES, or the container's --gpus flag)")
    return DeviceInfo(torch.cuda.get_device_name(device_index), tuple(torch.cuda.get_device_capability(device_index)),
                      str(trt.__version__))


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of an ONNX file together with its external-data file (``<file>.data``) if present."""
    h = hashlib.sha256()
    p = Path(path)
    for f in (p, p.with_name(p.name + ".data")):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> dict:
    """Cheap fingerprint (sizes + mtimes) used at load time before falling back to the full hash."""
    p = Path(path)
    out = {}
    for f in (p, p.with_name(p.name + ".data")):
        if f.is_file():
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


@dataclass(frozen=True)
class EngineKey:
    graph: str
    precision: str
    gpu_name: str
    compute_capability: tuple
    trt_version: str
    onnx_sha256: str
    profile_hash: str = ""
    options_hash: str = ""              # fp32 patterns, deformable-attention mode, strong typing, ...

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def slug(self) -> str:
        tag = hashlib.sha256(f"{self.onnx_sha256}|{self.profile_hash}|{self.options_hash}".encode()).hexdigest()[:10]
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{self.graph}.{self.precision}.{gpu}.{self.sm}.trt{self.trt_version}.{tag}"

    @classmethod
    def for_device(cls, graph: str, precision: str, device: DeviceInfo, onnx_sha256: str, profile_hash: str = "",
                   options_hash: str = "") -> "EngineKey":
        return cls(graph, precision, device.gpu_name, tuple(device.compute_capability), device.trt_version,
                   onnx_sha256, profile_hash, options_hash)


def engine_path(engines_dir: str | Path, key: EngineKey) -> Path:
    return Path(engines_dir) / f"{key.slug()}.plan"


def sidecar_path(engine: str | Path) -> Path:
    p = Path(engine)
    return p.with_name(p.name + ".json")


def write_sidecar(engine: str | Path, key: EngineKey, **extra) -> Path:
    meta = {"format": SIDECAR_FORMAT, **asdict(key), "compute_capability": list(key.compute_capability),
            "engine_file": Path(engine).name, **extra}
    p = sidecar_path(engine)
    p.write_text(json.dumps(meta, indent=1))
    return p


def read_sidecar(engine: str | Path) -> dict:
    p = sidecar_path(engine)
    if not p.is_file():
        raise BackendError(f"engine {Path(engine).name} has no metadata file {p.name}: it was not built by "
                           f"segllm-edge (or the sidecar was lost); {REBUILD_HINT}")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BackendError(f"engine metadata {p} is corrupt ({exc}); {REBUILD_HINT}") from None
    missing = [k for k in ("graph", "precision", "gpu_name", "compute_capability", "trt_version", "onnx_sha256")
               if k not in meta]
    if missing:
        raise BackendError(f"engine metadata {p} lacks {', '.join(missing)}; {REBUILD_HINT}")
    return meta


@dataclass
class Compatibility:
    ok: bool                            # the engine can be deserialized and used here
    rebuild: bool                       # building again would fix it (always true when not ok)
    reasons: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    message: str = ""


def _describe_meta(meta: dict) -> str:
    cc = meta["compute_capability"]
    return f"{meta['gpu_name']} (sm_{cc[0]}{cc[1]}) with TensorRT {short_version(meta['trt_version'])}"


def check_compatible(engine_meta: dict, device: DeviceInfo | None = None, onnx_sha256: str | None = None,
                     precision: str | None = None, allow_other_gpu: bool = False) -> Compatibility:
    """Can this engine run on ``device`` (default: this machine) for this ONNX graph and precision?

    Refused: another compute capability (the plan's kernels are for another architecture), another
    TensorRT version (plans are not portable across versions), another ONNX graph or precision (stale),
    and by default another GPU model: TensorRT documents plans as specific to the GPU model they were
    built on (it deserializes one from another model of the same compute capability with a warning
    that it "is not recommended and is likely to affect performance or even cause errors").
    ``allow_other_gpu=True`` accepts the same compute capability on another model, with a warning.
    """
    device = device or current_device()
    reasons, warnings = [], []
    cc = tuple(engine_meta["compute_capability"])
    if cc != tuple(device.compute_capability) or str(engine_meta["trt_version"]) != str(device.trt_version):
        reasons.append(f"engine built for {_describe_meta(engine_meta)}, this is {device.describe()}")
        if short_version(engine_meta["trt_version"]) == short_version(device.trt_version) and \
                engine_meta["trt_version"] != device.trt_version:
            reasons[-1] += f" (TensorRT {engine_meta['trt_version']} vs {device.trt_version})"
    elif engine_meta["gpu_name"] != device.gpu_name:
        if allow_other_gpu:
            warnings.append(f"engine built on {engine_meta['gpu_name']}, running on {device.gpu_name} (same "
                            f"{device.sm}); it was tuned for the other GPU — {REBUILD_HINT} for best speed")
        else:
            reasons.append(f"engine built on {engine_meta['gpu_name']}, this is {device.gpu_name} (same {device.sm}, "
                           "but TensorRT plans are specific to the GPU model; allow_other_gpu=True accepts it)")
    if onnx_sha256 is not None and engine_meta["onnx_sha256"] != onnx_sha256:
        reasons.append(f"engine {engine_meta.get('graph', '?')} was built from another ONNX graph "
                       "(the export changed since)")
    if precision is not None and engine_meta["precision"] != precision:
        reasons.append(f"engine precision is {engine_meta['precision']}, {precision} was asked for")
    ok = not reasons
    msg = "" if ok else "; ".join(reasons) + f" — {REBUILD_HINT}"
    return Compatibility(ok=ok, rebuild=not ok, reasons=reasons, warnings=warnings, message=msg)


def find_engine(engines_dir: str | Path, graph: str, device: DeviceInfo, precision: str | None = None,
                onnx_path: str | Path | None = None, allow_other_gpu: bool = False) -> tuple[Path, dict, Compatibility]:
    """The engine of ``graph`` in ``engines_dir`` usable on ``device``; BackendError naming why none is.

    The ONNX graph is compared by a cheap size/mtime stamp first and by its sha256 only when the stamp
    differs (hashing a 14 GB LLM on every start would be slow; it is hashed at most once per call)."""
    folder = Path(engines_dir)
    candidates = sorted(folder.glob(f"{graph}.*.plan")) if folder.is_dir() else []
    if not candidates:
        raise BackendError(f"no TensorRT engine for graph {graph!r} in {folder}; build them with "
                           f"`segllm-edge build-engines --export <export dir>`")
    refusals: list[str] = []
    stamp = file_stamp(onnx_path) if onnx_path is not None else None
    sha: str | None = None
    for plan in candidates:
        try:
            meta = read_sidecar(plan)
        except BackendError as exc:
            refusals.append(str(exc))
            continue
        if meta.get("graph") != graph:
            continue
        want_sha = None
        if onnx_path is not None and meta.get("onnx_stamp") != stamp:
            if sha is None:
                sha = file_sha256(onnx_path)
            want_sha = sha
        comp = check_compatible(meta, device, onnx_sha256=want_sha, precision=precision,
                                allow_other_gpu=allow_other_gpu)
        if comp.ok:
            return plan, meta, comp
        refusals.append(f"{plan.name}: {comp.message}")
    detail = "; ".join(dict.fromkeys(refusals)) or REBUILD_HINT
    raise BackendError(f"no usable engine for graph {graph!r} in {folder} (refused: {detail})")
