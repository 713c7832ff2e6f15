"""The drift report of a directly exported reduced precision, at bounded memory.

The probe conversation runs on the new export first, one graph resident at a time (the probe's loader:
``segllm_edge.drift_probe(lean=True)``, :mod:`segllm_edge.runtime.lean_sessions`); its sessions are freed; then an
fp32 reference export of the same checkpoint is streamed into a temporary folder (graphs that are fp32 in both are
hard-linked, not exported again) and the probe runs on it the same way. So the process holds one graph's session at
a time, never the whole export and never the reference and the reduced export together.

Each side is planned against the export's budget (:func:`export_budget`: 1.5 x its bytes on disk + 1 GiB, the figure
every export measurement is held to) before anything is loaded (:func:`plan_side`): where the whole llm graph's
session would not fit the budget left over this process's resident memory (or the memory available), the probe runs
the exported llm graph block of decoder layers by block (:mod:`segllm_edge.runtime.graph_blocks`: the same nodes and
weights, one block's session at a time), with as many layers per block as fit. A 7B's llm (12 GiB in fp16, 24 GiB
as the fp32 reference) then needs one block's session, not the whole graph's, and the probe runs on a 24 GB machine
where it used to be skipped. What is compared does not change: the whole conversation, end to end, on both sides
(mask IoU vs fp32, hidden-state error, same query, per round). When even the largest graph or block would not fit
in the memory available, or the reference would not fit on the disk, the report says so ("not compared: …")
instead of swapping or failing. The report records each side's plan (``probe_plan``), the budget
(``budget_bytes``), the running peak after each phase (``peak_rss_bytes``) and ``within_budget``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..contracts.manifest import Manifest
from ..process_memory import available_memory, kib_field, max_rss, release_memory  # noqa: F401 - re-exported
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


#: the export's memory budget: BUDGET_PER_DISK_BYTE x its bytes on disk + BUDGET_BASE_BYTES (the figure every
#: measurement of ``segllm-edge export`` is held to, benchmarks/results/export_memory_7b.md), drift report included
BUDGET_PER_DISK_BYTE = 1.5
BUDGET_BASE_BYTES = 1 << 30


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def export_budget(folder: Path) -> int:
    """The memory budget of the export in ``folder`` (what it holds on disk now, the drift report not written)."""
    return int(BUDGET_PER_DISK_BYTE * folder_bytes(folder) + BUDGET_BASE_BYTES)


def resident_bytes() -> int:
    """This process's resident set now (0 where it cannot be read)."""
    return kib_field("/proc/self/status", "VmRSS") or 0


def plan_side(sizes: dict[str, float], per_byte: dict[str, float], layer_bytes: list[int] | None,
              budget: int) -> dict:
    """How one side of the probe runs within ``budget``: every graph whole except the llm, which is split into
    blocks of decoder layers (``layer_bytes``: its weight bytes per layer; None where that side cannot split it)
    of as many layers as fit the budget left over this process's resident memory now, and where the memory
    available allows. ``need_bytes``: the largest graph's (or block's) estimated session peak, what the fit check
    compares; ``estimated_peak_bytes``: that on top of the resident memory now."""
    base = resident_bytes()
    avail = available_memory()
    cap = budget - base
    if avail is not None:
        cap = min(cap, avail / REFERENCE_HEADROOM)
    needs = {g: b * per_byte[g] for g, b in sizes.items()}
    plan = {"budget_bytes": int(budget), "resident_bytes": int(base), "llm_layers_per_block": None, "llm_blocks": 1}
    if layer_bytes and "llm" in needs and needs["llm"] > cap and len(layer_bytes) > 1:
        from ..contracts.llm_blocks import layers_per_block_for

        k = layers_per_block_for(layer_bytes, per_byte["llm"], cap)
        if k < len(layer_bytes):
            blocks = [sum(layer_bytes[i:i + k]) for i in range(0, len(layer_bytes), k)]
            needs["llm"] = max(blocks) * per_byte["llm"]
            plan.update(llm_layers_per_block=k, llm_blocks=len(blocks), llm_block_bytes=blocks)
    name, need = largest(needs)
    plan.update(largest=name, llm_need_bytes=int(needs.get("llm", 0)), need_bytes=int(need), estimated_peak_bytes=int(base + need),
                within_budget=bool(base + need <= budget))
    return plan


def llm_layer_bytes(folder: Path, probe, side: str, scale: float = 1.0) -> list[int] | None:
    """The llm's weight bytes per decoder layer where ``side`` of ``probe`` can run it block by block, else None."""
    from ..contracts.llm_blocks import can_split, llm_layer_weight_bytes

    runtime = (probe.backends or {}).get(side, "onnxruntime")
    manifest = Manifest.load(folder)
    if not probe.splits_llm or not can_split(manifest.kv_layout, runtime):
        return None

    return [int(b * scale) for b in llm_layer_weight_bytes(Path(folder) / manifest.graphs["llm"].file)]


def _what(plan: dict) -> str:
    if plan["largest"] == "llm" and plan["llm_layers_per_block"]:
        return f"llm graph, in blocks of {plan['llm_layers_per_block']} layers,"
    return f"{plan['largest']} graph"


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
    budget = report["budget_bytes"] = export_budget(folder)
    plans = {}
    got = None
    if probe is None:
        report["drift_skipped"] = skipped_why
    else:
        n = len(probe.questions)
        release_memory()  # the exporter's heap, before the probe's sessions
        per = {g: (RUNTIME_EXPANSION.get(precision, peak_per_byte(probe, "export")) if g in converted
                   else peak_per_byte(probe, "export")) for g in sizes}
        plan = plans["export"] = plan_side(sizes, per, llm_layer_bytes(folder, probe, "export"), budget)
        if not fits(plan["need_bytes"]):
            report["rounds"] = _not_compared(n, f"the {precision} export's {_what(plan)} needs "
                                                f"~{plan['need_bytes'] / 2**30:.1f} GiB to run here, more than the "
                                                f"{available_memory() / 2**30:.1f} GiB available")
        else:
            got = run_probe(probe, folder, plan["llm_layers_per_block"])
            peaks["probe_on_export"] = max_rss()
            release_memory()  # the export's sessions are gone: give their heap back before the reference
            unopened = [r.error for r in got if r.error and r.error.startswith("cannot open the export")]
            if got and len(unopened) == len(got):  # e.g. bf16 on a runtime without bf16 kernels
                report["rounds"] = _not_compared(n, f"the {precision} export cannot run here ({unopened[0]})")
                got = None
    if got is not None:  # known before writing ~4 bytes per weight to disk
        scale = FP32_PER_BYTE.get(precision, 1)
        est = {g: b * (scale if g in converted else 1) for g, b in sizes.items()}
        per = {g: peak_per_byte(probe, "fp32") for g in est}
        layers = llm_layer_bytes(folder, probe, "fp32", scale if "llm" in converted else 1)
        plan = plan_side(est, per, layers, budget)
        new_bytes = sum(est[g] for g in converted)  # the other graphs are hard-linked from the export
        free = shutil.disk_usage(Path(folder).resolve().parent).free
        if not fits(plan["need_bytes"]):
            report["rounds"] = _not_compared(len(got), f"the fp32 reference's {_what(plan)} (~"
                                                       f"{plan['need_bytes'] / 2**30:.1f} GiB to run) does not fit in "
                                                       f"the {available_memory() / 2**30:.1f} GiB of memory available")
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
            release_memory()
            per = {g: peak_per_byte(probe, "fp32") for g in ref_sizes}
            plan = plans["fp32"] = plan_side(ref_sizes, per, llm_layer_bytes(ref_dir, probe, "fp32"), budget)
            if not fits(plan["need_bytes"]):
                report["rounds"] = _not_compared(len(got), f"the fp32 reference's {_what(plan)} "
                                                           f"(~{plan['need_bytes'] / 2**30:.1f} GiB to run) does not "
                                                           f"fit in the {available_memory() / 2**30:.1f} GiB of "
                                                           "memory available")
            else:
                report["rounds"] = compare_rounds(run_probe(probe.for_reference(), ref_dir,
                                                            plan["llm_layers_per_block"]), got, precision)
                peaks["fp32_reference"] = max_rss()
    if plans:
        report["probe_plan"] = plans
    report["within_budget"] = all(p is None or p <= budget for p in peaks.values())
    if probe is not None:
        report["guard"] = guard(report["rounds"])
        if probe.backends:
            report["probe_backends"] = dict(probe.backends)
    if "fp32" not in report["size_bytes"]:
        report["size_bytes"]["fp32"] = {}
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    enforce_guard(report, Path(folder), allow_accuracy_drop)
    return report
