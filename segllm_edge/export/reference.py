"""The drift report of a directly exported reduced precision, at bounded memory.

The probe conversation runs on the new export first; its sessions are freed; then an fp32 reference export of
the same checkpoint is streamed into a temporary folder and the probe runs on it, so the fp32 reference and the
reduced export are never resident together. When the fp32 reference would not fit in the memory available
(a 7B's fp32 graphs are ~27 GB), the report says so ("not compared: …") instead of swapping or failing.
"""
from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

from ..contracts.manifest import Manifest
from .drift import compare_rounds, guard, run_probe
from .files import graph_sizes

#: the fp32 reference runs only when the memory available is at least this many times its bytes on disk
REFERENCE_HEADROOM = 1.25


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def drift_against_fp32(checkpoint: Path, folder: Path, manifest: Manifest, probe, skipped_why: str,
                       allow_accuracy_drop: bool = False, progress: bool = True) -> dict:
    """Write ``drift_report.json`` for the reduced-precision export in ``folder``; enforce its guard."""
    from .onnx_export import export_model
    from .quantize import REPORT_FILE, converted_graphs, enforce_guard

    precision = manifest.precision
    report = {"precision": precision, "graphs": converted_graphs(precision),
              "size_bytes": {precision: graph_sizes(folder, manifest)}}
    if probe is None:
        report["drift_skipped"] = skipped_why
    else:
        got = run_probe(probe, folder)
        gc.collect()
        unopened = [r.error for r in got if r.error and r.error.startswith("cannot open the export")]
        if got and len(unopened) == len(got):  # e.g. bf16 on a runtime without bf16 kernels: nothing to compare
            report["rounds"] = [{"round": i, "compared": False, "mismatch": False,
                                 "reason": f"the {precision} export cannot run here ({unopened[0]})"}
                                for i in range(1, len(got) + 1)]
            got = None
    if probe is not None and got is not None:
        with tempfile.TemporaryDirectory(prefix=".fp32-reference-", dir=Path(folder).resolve().parent) as tmp:
            ref_dir = Path(tmp) / "fp32"
            ref_manifest = export_model(checkpoint, ref_dir, "fp32", progress=progress, drift_report=False,
                                        fp32_graphs_from=folder)
            sizes = graph_sizes(ref_dir, ref_manifest)
            report["size_bytes"] = {"fp32": sizes, **report["size_bytes"]}
            need, avail = int(sum(sizes.values()) * REFERENCE_HEADROOM), available_memory()
            if avail is not None and need > avail:
                why = (f"the fp32 reference ({sum(sizes.values()) / 2**30:.1f} GiB of graphs) does not fit in the "
                       f"{avail / 2**30:.1f} GiB of memory available")
                report["rounds"] = [{"round": i, "compared": False, "mismatch": False, "reason": why}
                                    for i in range(1, len(got) + 1)]
            else:
                report["rounds"] = compare_rounds(run_probe(probe, ref_dir), got, precision)
    if probe is not None:
        report["guard"] = guard(report["rounds"])
    if "fp32" not in report["size_bytes"]:
        report["size_bytes"]["fp32"] = {}
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    enforce_guard(report, Path(folder), allow_accuracy_drop)
    return report
