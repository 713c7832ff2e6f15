"""CPU execution paths for an export folder, the accuracy guard for reduced precisions, and the default choice.

A *path* is a backend plus its options. :func:`available_cpu_paths` lists the ones this machine can run;
:func:`default_cpu_path` is what ``segllm_edge.load(export)`` uses on a CPU with no options: the fastest path
that is exact (fp32) or whose reduced precision passed the accuracy guard (mask IoU >= 0.99 vs fp32 in every
round) on this export and this CPU, as recorded in ``<export>/cpu_guard.json`` by :func:`accuracy_guard`.

Order (fastest first, measured by ``benchmarks/bench_cpu_paths.py``, see docs/cpu.md): OpenVINO with bf16 HIPIE,
OpenVINO with only the mask decoder's feed-forward MatMuls in INT8, the same in bf16, onnxruntime with the
INT8-FFN mask decoder (these four only with a passing guard), OpenVINO fp32, onnxruntime fp32.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..pipeline.masks import mask_iou

GUARD_FILE = "cpu_guard.json"
GUARD_MIN_IOU = 0.99


@dataclass(frozen=True)
class CpuPath:
    name: str                      # e.g. "openvino-bf16"
    backend: str                   # a load() backend name
    options: dict = field(default_factory=dict)
    exact: bool = True             # fp32 throughout (no accuracy guard needed)

    def load(self, export_dir, **kwargs):
        import segllm_edge

        return segllm_edge.load(export_dir, backend=self.backend, **{**self.options, **kwargs})


ORT_FP32 = CpuPath("onnxruntime-fp32", "onnxruntime")
OV_FP32 = CpuPath("openvino-fp32", "openvino", {"hipie_precision": "fp32"})
OV_BF16 = CpuPath("openvino-bf16", "openvino", {"hipie_precision": "bf16"}, exact=False)
OV_BF16_FFN = CpuPath("openvino-bf16-ffn", "openvino", {"hipie_precision": "bf16-ffn"}, exact=False)
OV_INT8_FFN = CpuPath("openvino-int8-ffn", "openvino", {"hipie_precision": "int8-ffn"}, exact=False)
ORT_INT8 = CpuPath("onnxruntime-int8", "onnxruntime", {"hipie_int8": True}, exact=False)
#: fastest first
ALL_PATHS = (OV_BF16, OV_INT8_FFN, OV_BF16_FFN, ORT_INT8, OV_FP32, ORT_FP32)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), for benchmark results and the guard's record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpu_paths(export_dir) -> list[CpuPath]:
    """The paths this machine can run on ``export_dir`` (OpenVINO installed? bf16 in the CPU? an INT8 mask
    decoder written?), fastest first."""
    from ..contracts.hipie_int8 import int8_path
    from ..contracts.manifest import Manifest
    from .openvino_backend import cpu_has_bf16, cpu_has_int8, openvino_available
    from ..contracts.ort import require_onnxruntime

    try:
        require_onnxruntime()
        ort = True
    except BackendError:
        ort = False
    ov = openvino_available()
    decoder = Path(export_dir) / Manifest.load(export_dir).graphs["mask_decoder"].file
    bf16 = ov and cpu_has_bf16()
    ok = {OV_BF16.name: bf16, OV_BF16_FFN.name: bf16, OV_INT8_FFN.name: ov and cpu_has_int8(),
          ORT_INT8.name: ort and int8_path(decoder).is_file(),
          OV_FP32.name: ov, ORT_FP32.name: ort}
    return [p for p in ALL_PATHS if ok[p.name]]


def read_guard(export_dir) -> dict:
    p = Path(export_dir) / GUARD_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def guard_passed(export_dir, path: CpuPath) -> bool:
    """Whether ``path`` passed the accuracy guard on this export, on a CPU of this model."""
    rec = read_guard(export_dir).get("paths", {}).get(path.name)
    return bool(rec and rec.get("passed") and rec.get("cpu") == cpu_name())


def default_cpu_path(export_dir) -> CpuPath:
    """The fastest available path that is exact or passed the guard here."""
    paths = available_cpu_paths(export_dir)
    for p in paths:
        if p.exact or guard_passed(export_dir, p):
            return p
    raise BackendError("no CPU backend is installed: install segllm-edge[cpu] (onnxruntime) or "
                       "segllm-edge[openvino]")


def conversation_masks(model, image, questions, strict: bool = True) -> list:
    """The final mask of each round. Not ``strict``: a round that cannot run because a round it refers to came
    out empty (RoundReferenceError) ends the conversation, it and the rounds after it are ``None``."""
    from ..errors import RoundReferenceError

    s = model.session(image)
    masks = []
    for q in questions:
        try:
            masks.append(s.ask(q).model_mask)
        except RoundReferenceError:
            if strict:
                raise
            break
    return masks + [None] * (len(questions) - len(masks))


def accuracy_guard(export_dir, paths=None, image=None, questions=None, min_iou: float = GUARD_MIN_IOU,
                   write: bool = True) -> dict:
    """Run the guard conversation with exact fp32 (onnxruntime) and with each reduced-precision path;
    record per-round mask IoU vs fp32 and pass/fail (every round >= ``min_iou``) in ``cpu_guard.json``."""
    from ..contracts.demo import DEMO_QUESTIONS, demo_image

    image = demo_image() if image is None else image
    questions = tuple(questions or DEMO_QUESTIONS)
    paths = [p for p in (paths or available_cpu_paths(export_dir)) if not p.exact]
    ref = conversation_masks(ORT_FP32.load(export_dir), image, questions)
    report = read_guard(export_dir) if write else {}
    report.setdefault("paths", {})
    report.update(min_iou=min_iou, questions=list(questions))
    for p in paths:
        got = conversation_masks(p.load(export_dir), image, questions, strict=False)
        ious = [0.0 if b is None else mask_iou(a, b) for a, b in zip(ref, got)]   # a round it could not run fails
        report["paths"][p.name] = {"mask_iou_per_round": ious, "worst": min(ious),
                                   "passed": min(ious) >= min_iou, "cpu": cpu_name()}
    if write:
        (Path(export_dir) / GUARD_FILE).write_text(json.dumps(report, indent=1))
    return report
