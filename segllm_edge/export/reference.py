"""The drift report of a directly exported reduced precision, at bounded memory.

The probe conversation runs on the new export first, one graph resident at a time (the probe's loader:
``segllm_edge.drift_probe(lean=True)``, :mod:`segllm_edge.runtime.lean_sessions`); its sessions are freed; then an
fp32 reference export of the same checkpoint is streamed into a temporary folder (graphs that are fp32 in both are
hard-linked, not exported again) and the probe runs on it the same way. So the process holds one graph's session at
a time, never the whole export and never the reference and the reduced export together. When the largest graph
would not fit in the memory available (a 7B's fp32 llm graph alone is ~26 GB), or the reference would not fit on
the disk, the report says so ("not compared: …") instead of swapping or failing.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..contracts.manifest import Manifest
from ..process_memory import available_memory, max_rss, release_memory  # noqa: F401 - re-exported
from .drift import compare_rounds, guard, run_probe
from .files import graph_sizes

#: a probe runs only when the memory available is at least this many times what it needs
REFERENCE_HEADROOM = 1.25
#: peak bytes of opening and running one graph's lean session per byte of the graph on disk (onnxruntime, CPU),
#: measured on the 7B-width probe (benchmarks/results/export_memory_7b.md, issue-14c): an fp32 graph ~1.05x (its
#: external data memory-mapped, touched by the first run) plus activations; an fp16 graph ~1.75x (llm) to ~3.3x
#: (CLIP, weights inside the .onnx: the protobuf and the fp32 casts the CPU provider folds); converted graphs of the
#: other precisions were not measured alone, so they keep a wide margin
SESSION_PEAK_PER_BYTE = 1.5
#: the same on any other runtime (OpenVINO: the 7B-width fp32 reference peaked at 7.2 GiB there vs 4.2 on onnxruntime)
OTHER_RUNTIME_PEAK_PER_BYTE = 2.5
RUNTIME_EXPANSION = {"fp16": 2.5, "bf16": 2.5, "int8": 2.5, "int4": 2.5}
#: fp32 bytes per byte of a converted graph (an estimate of the reference's size before it is written)
FP32_PER_BYTE = {"fp16": 2, "bf16": 2, "int8": 4, "int4": 7}


def peak_per_byte(probe, side: str) -> float:
    """Peak bytes per byte of an fp32 graph for the ``side`` ("export" or "fp32") of ``probe``: the measured
    onnxruntime factor only where that side is known to run on onnxruntime."""
    runtime = (probe.backends or {}).get(side)
    return SESSION_PEAK_PER_BYTE if runtime == "onnxruntime" else OTHER_RUNTIME_PEAK_PER_BYTE


def fits(nbytes: float) -> bool:
    avail = available_memory()
    return avail is None or nbytes * REFERENCE_HEADROOM <= avail


def largest(sizes: dict[str, float]) -> tuple[str, float]:
    """The graph that needs the most, and what it needs (the probe holds one graph at a time)."""
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def _not_compared(n: int, why: str) -> list[dict]:
    return [{"round": i, "compared": False, "mismatch": False, "reason": why} for i in range(1, n + 1)]


def drift_against_fp32(folder: Path, manifest: Manifest, probe, skipped_why: str,
                       export_fp32: Callable[[Path], Manifest], allow_accuracy_drop: bool = False) -> dict:
    """Write ``drift_report.json`` for the reduced-precision export in ``folder``; enforce its guard.
    ``export_fp32(dir)`` writes the fp32 reference export of the same checkpoint into ``dir``."""
    from .quantize import REPORT_FILE, converted_graphs, enforce_guard

    precision = manifest.precision
    converted = converted_graphs(precision)
    report = {"precision": precision, "graphs": converted,
              "size_bytes": {precision: graph_sizes(folder, manifest)}}
    peaks = report["peak_rss_bytes"] = {"export": max_rss()}  # this process's running peak after each phase
    sizes = report["size_bytes"][precision]
    got = None
    if probe is None:
        report["drift_skipped"] = skipped_why
    else:
        n = len(probe.questions)
        name, own = largest({g: b * (RUNTIME_EXPANSION.get(precision, peak_per_byte(probe, "export")) if g in converted
                                     else peak_per_byte(probe, "export")) for g, b in sizes.items()})
        if not fits(own):
            report["rounds"] = _not_compared(n, f"the {precision} export's {name} graph needs ~{own / 2**30:.1f} GiB "
                                                f"to run here, more than the {available_memory() / 2**30:.1f} GiB "
                                                "available")
        else:
            release_memory()  # the exporter's heap, before the probe's sessions
            got = run_probe(probe, folder)
            peaks["probe_on_export"] = max_rss()
            release_memory()  # the export's sessions are gone: give their heap back before the reference
            unopened = [r.error for r in got if r.error and r.error.startswith("cannot open the export")]
            if got and len(unopened) == len(got):  # e.g. bf16 on a runtime without bf16 kernels
                report["rounds"] = _not_compared(n, f"the {precision} export cannot run here ({unopened[0]})")
                got = None
    if got is not None:  # known before writing ~4 bytes per weight to disk
        est = {g: b * (FP32_PER_BYTE.get(precision, 1) if g in converted else 1) for g, b in sizes.items()}
        name, need = largest({g: b * peak_per_byte(probe, "fp32") for g, b in est.items()})
        new_bytes = sum(est[g] for g in converted)  # the other graphs are hard-linked from the export
        free = shutil.disk_usage(Path(folder).resolve().parent).free
        if not fits(need):
            report["rounds"] = _not_compared(len(got), f"the fp32 reference's {name} graph (~{need / 2**30:.1f} GiB "
                                                       f"to run) does not fit in the {available_memory() / 2**30:.1f} "
                                                       "GiB of memory available")
            got = None
        elif new_bytes * REFERENCE_HEADROOM > free:
            report["rounds"] = _not_compared(len(got), f"the fp32 reference (~{new_bytes / 2**30:.1f} GiB of graphs) "
                                                       f"does not fit in the {free / 2**30:.1f} GiB free on the disk "
                                                       f"of {Path(folder).resolve().parent}")
            got = None
    if got is not None:
        with tempfile.TemporaryDirectory(prefix=".fp32-reference-", dir=Path(folder).resolve().parent) as tmp:
            ref_dir = Path(tmp) / "fp32"
            ref_manifest = export_fp32(ref_dir)
            peaks["fp32_reference_export"] = max_rss()
            ref_sizes = graph_sizes(ref_dir, ref_manifest)
            report["size_bytes"] = {"fp32": ref_sizes, **report["size_bytes"]}
            name, need = largest({g: b * peak_per_byte(probe, "fp32") for g, b in ref_sizes.items()})
            if not fits(need):
                report["rounds"] = _not_compared(len(got), f"the fp32 reference's {name} graph "
                                                           f"(~{need / 2**30:.1f} GiB to run) does not fit in the "
                                                           f"{available_memory() / 2**30:.1f} GiB of memory available")
            else:
                release_memory()
                report["rounds"] = compare_rounds(run_probe(probe.for_reference(), ref_dir), got, precision)
                peaks["fp32_reference"] = max_rss()
    if probe is not None:
        report["guard"] = guard(report["rounds"])
        if probe.backends:
            report["probe_backends"] = dict(probe.backends)
    if "fp32" not in report["size_bytes"]:
        report["size_bytes"]["fp32"] = {}
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    enforce_guard(report, Path(folder), allow_accuracy_drop)
    return report
