"""numpy ↔ onnxruntime OrtValues where onnxruntime's Python API does not go by itself.

* **bfloat16.** numpy has no bfloat16; the package holds bf16 tensors as ``ml_dtypes.bfloat16`` arrays, which
  onnxruntime's Python API refuses everywhere (``InferenceSession.run``, ``IOBinding.bind_cpu_input`` and
  ``OrtValue.ortvalue_from_numpy``: "Creation of OrtValues is currently only supported from non-string numpy
  arrays"; ``OrtValue.numpy()`` of a bf16 value: "No corresponding Numpy type for Tensor Type. bfloat16").
  :func:`to_ortvalue` hands the bytes over as a ``uint16`` view typed ``TensorProto.BFLOAT16``
  (``ortvalue_from_numpy_with_onnx_type`` on the CPU; on a device, an OrtValue of that element type filled by
  ``update_inplace``); :func:`to_numpy` reads a bf16 OrtValue back as ``ml_dtypes.bfloat16``; :func:`run`,
  :func:`bind_cpu_input` and :func:`element_type` are the session calls with that in place. Other dtypes take
  onnxruntime's own paths, unchanged.
* **Initializers given to SessionOptions.add_initializer** must lie in a buffer the OrtValue does not own
  (onnxruntime: "Buffer containing the initializer must be owned by the user"); ``ortvalue_from_numpy(arr,
  "cuda", 0)`` makes a device copy the OrtValue owns, which is refused. :func:`user_owned_view` gives an OrtValue
  over ``arr`` itself on the CPU, and on a device an OrtValue over a device copy through DLPack (the DLPack view
  does not own its buffer; the copy stays alive as long as the view).
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..contracts import ort as ortc
from ..errors import BackendError

#: onnx.TensorProto.BFLOAT16 (read without importing onnx: a serving install has none)
BFLOAT16 = 16


def is_bf16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def element_type(dtype):
    """What ``IOBinding.bind_input/bind_output`` take as element type: the numpy type, or the ONNX type number
    for bfloat16 (numpy has none)."""
    return BFLOAT16 if is_bf16(dtype) else np.dtype(dtype).type


def _on_cpu(device) -> bool:
    return device is None or str(device[0]).lower() == "cpu"


def to_ortvalue(arr, device=("cpu", 0)):
    """An OrtValue of ``arr`` on ``device`` (``(device_type, device_id)``). On the CPU it is backed by ``arr``'s
    own buffer (no copy; the OrtValue keeps the array alive), elsewhere a device copy."""
    ort = ortc.require_onnxruntime()
    arr = np.ascontiguousarray(arr)
    if not is_bf16(arr.dtype):
        return ort.OrtValue.ortvalue_from_numpy(arr, *(device or ("cpu", 0)))
    bits = arr.view(np.uint16)
    if _on_cpu(device):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, BFLOAT16)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), BFLOAT16, str(device[0]), int(device[1]))
    value.update_inplace(bits)
    return value


def to_numpy(value) -> np.ndarray:
    """An OrtValue as a numpy array (a bf16 value as ``ml_dtypes.bfloat16``, copied to the host)."""
    if value.element_type() != BFLOAT16:
        return value.numpy()
    from ..contracts.precisions import numpy_dtype

    ort = ortc.require_onnxruntime()
    shape = tuple(int(d) for d in value.shape())
    host = value
    if value.device_name().lower() != "cpu":
        host = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), BFLOAT16, "cpu", 0)
        host.update_inplace(value)                      # device → host, onnxruntime's own data transfer
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, numpy_dtype("bfloat16"))
    raw = (ctypes.c_uint16 * count).from_address(host.data_ptr())
    return np.frombuffer(raw, np.uint16).copy().view(numpy_dtype("bfloat16")).reshape(shape)


def bind_cpu_input(io, name: str, arr) -> None:
    """``io.bind_cpu_input(name, arr)``, bf16 arrays included (bound as a BFLOAT16 OrtValue over their bytes,
    kept alive with the binding)."""
    arr = np.ascontiguousarray(arr)
    if not is_bf16(arr.dtype):
        io.bind_cpu_input(name, arr)
        return
    value = to_ortvalue(arr)
    io.bind_ortvalue_input(name, value)
    keep = getattr(io, "_segllm_keep", None)
    if keep is None:
        keep = io._segllm_keep = {}
    keep[name] = value


def _declares_bf16(session, output_names) -> bool:
    get = getattr(session, "get_outputs", None)
    if get is None:
        return False
    outs = get()
    wanted = None if output_names is None else set(output_names)
    return any(getattr(o, "type", None) == "tensor(bfloat16)" for o in outs if wanted is None or o.name in wanted)


def run(session, output_names, feeds, run_options=None) -> list[np.ndarray]:
    """``session.run(output_names, feeds[, run_options])``; when a feed or a requested output is bfloat16, the
    run goes through OrtValues (``run_with_ort_values``) and bf16 outputs come back as ``ml_dtypes.bfloat16``.
    ``session`` may be anything with ``run`` (the OpenVINO sessions, the lean wrappers)."""
    bf16 = any(is_bf16(getattr(v, "dtype", np.float32)) for v in feeds.values())
    if not (bf16 or _declares_bf16(session, output_names)) or not hasattr(session, "run_with_ort_values"):
        return session.run(output_names, feeds) if run_options is None else \
            session.run(output_names, feeds, run_options)
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    values = {k: to_ortvalue(v) for k, v in feeds.items()}
    outs = session.run_with_ort_values(names, values, run_options)
    return [to_numpy(o) for o in outs]


def user_owned_view(arr: np.ndarray, device=("cpu", 0)):
    """An OrtValue of ``arr`` on ``device`` that ``SessionOptions.add_initializer`` accepts: one whose tensor does
    not own its buffer. The caller keeps ``arr`` alive (on the CPU the value is a view of it) as long as the
    sessions. On a device: a device copy (owned by an OrtValue, which onnxruntime would refuse), re-wrapped
    through DLPack (``OrtValue.from_dlpack`` wraps the pointer without owning it, and the DLPack capsule holds
    the copy alive for as long as the view lives)."""
    ort = ortc.require_onnxruntime()
    arr = np.ascontiguousarray(arr)
    if _on_cpu(device):
        if is_bf16(arr.dtype):
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), BFLOAT16)
        return ort.OrtValue.ortvalue_from_numpy(arr)
    from_dlpack = getattr(ort.OrtValue, "from_dlpack", None)
    owned = to_ortvalue(arr, device)
    to_dlpack = getattr(getattr(owned, "_ortvalue", None), "to_dlpack", None)
    if from_dlpack is None or to_dlpack is None:
        raise BackendError(f"onnxruntime {ort.__version__} has no DLPack support (OrtValue.from_dlpack/to_dlpack): "
                           "it cannot share initializers on a device; upgrade onnxruntime-gpu, or open the graphs "
                           "without shared weights")
    view = from_dlpack(to_dlpack())
    view._segllm_owner = owned                   # belt and braces: the capsule already holds it
    return view


__all__ = ["BFLOAT16", "bind_cpu_input", "element_type", "is_bf16", "run", "to_numpy", "to_ortvalue",
           "user_owned_view"]
