"""The drift report of a directly exported reduced precision, at bounded memory.

The probe conversation runs on the new export first; its sessions are freed; then an fp32 reference export of
the same checkpoint is streamed into a temporary folder and the probe runs on it, so the fp32 reference and the
reduced export are never resident together. When the fp32 reference would not fit in the memory available
(a 7B's fp32 graphs are ~27 GB), the report says so ("not compared: …") instead of swapping or failing.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from ..contracts.manifest import Manifest
from .drift import compare_rounds, guard, run_probe
from .files import graph_sizes
from .streamed import release_memory

#: a probe runs only when the memory available is at least this many times what it needs
REFERENCE_HEADROOM = 1.25
#: resident bytes per byte on disk of an export on onnxruntime's CPU provider: it has no fp16 kernels for most ops
#: and casts the fp16 weights to fp32 (measured: the 1.6 GB fp16 llm graph of the 7B-width probe holds 3.3 GiB)
RUNTIME_EXPANSION = {"fp16": 2}
#: fp32 bytes per byte of a converted graph (an estimate of the reference's size before it is written)
FP32_PER_BYTE = {"fp16": 2, "bf16": 2, "int8": 4, "int4": 7}


def fits(nbytes: float) -> bool:
    avail = available_memory()
    return avail is None or nbytes * REFERENCE_HEADROOM <= avail


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def max_rss() -> int | None:
    """This process's peak resident set size so far, in bytes (None where resource is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def drift_against_fp32(folder: Path, manifest: Manifest, probe, skipped_why: str,
                       export_fp32: Callable[[Path], Manifest], allow_accuracy_drop: bool = False) -> dict:
    """Write ``drift_report.json`` for the reduced-precision export in ``folder``; enforce its guard.
    ``export_fp32(dir)`` writes the fp32 reference export of the same checkpoint into ``dir``."""
    from .quantize import REPORT_FILE, converted_graphs, enforce_guard

    precision = manifest.precision
    report = {"precision": precision, "graphs": converted_graphs(precision),
              "size_bytes": {precision: graph_sizes(folder, manifest)}}
    peaks = report["peak_rss_bytes"] = {"export": max_rss()}  # this process's running peak after each phase
    own = sum(report["size_bytes"][precision].values()) * RUNTIME_EXPANSION.get(precision, 1)
    if probe is not None and not fits(own):
        report["rounds"] = [{"round": i, "compared": False, "mismatch": False,
                             "reason": f"the {precision} export needs ~{own / 2**30:.1f} GiB to run here, more than the "
                                       f"{available_memory() / 2**30:.1f} GiB available"}
                            for i in range(1, len(probe.questions) + 1)]
        probe_ran = False
    else:
        probe_ran = probe is not None
    if probe is None:
        report["drift_skipped"] = skipped_why
    elif probe_ran:
        got = run_probe(probe, folder)
        peaks["probe_on_export"] = max_rss()
        release_memory()  # the export's sessions are gone: give their heap back before the reference
        unopened = [r.error for r in got if r.error and r.error.startswith("cannot open the export")]
        if got and len(unopened) == len(got):  # e.g. bf16 on a runtime without bf16 kernels: nothing to compare
            report["rounds"] = [{"round": i, "compared": False, "mismatch": False,
                                 "reason": f"the {precision} export cannot run here ({unopened[0]})"}
                                for i in range(1, len(got) + 1)]
            got = None
    est = sum(b * (FP32_PER_BYTE.get(precision, 1) if g in report["graphs"] else 1)
              for g, b in report["size_bytes"][precision].items())
    if probe_ran and got is not None and not fits(est):  # known before writing ~4 bytes per weight to disk
        report["rounds"] = [{"round": i, "compared": False, "mismatch": False,
                             "reason": f"the fp32 reference (~{est / 2**30:.1f} GiB of graphs) does not fit in the "
                                       f"{available_memory() / 2**30:.1f} GiB of memory available"}
                            for i in range(1, len(got) + 1)]
        got = None
    if probe_ran and got is not None:
        with tempfile.TemporaryDirectory(prefix=".fp32-reference-", dir=Path(folder).resolve().parent) as tmp:
            ref_dir = Path(tmp) / "fp32"
            ref_manifest = export_fp32(ref_dir)
            sizes = graph_sizes(ref_dir, ref_manifest)
            report["size_bytes"] = {"fp32": sizes, **report["size_bytes"]}
            avail = available_memory()
            if not fits(sum(sizes.values())):
                why = (f"the fp32 reference ({sum(sizes.values()) / 2**30:.1f} GiB of graphs) does not fit in the "
                       f"{avail / 2**30:.1f} GiB of memory available")
                report["rounds"] = [{"round": i, "compared": False, "mismatch": False, "reason": why}
                                    for i in range(1, len(got) + 1)]
            else:
                report["rounds"] = compare_rounds(run_probe(probe, ref_dir), got, precision)
                peaks["fp32_reference"] = max_rss()
    if probe is not None:
        report["guard"] = guard(report["rounds"])
    if "fp32" not in report["size_bytes"]:
        report["size_bytes"]["fp32"] = {}
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    enforce_guard(report, Path(folder), allow_accuracy_drop)
    return report
