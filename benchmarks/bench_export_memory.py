"""Peak RSS of `segllm-edge export` per precision, against the budget 1.5 x the export's bytes on disk + 1 GiB.

Each export runs as its own process under ``/usr/bin/time -v`` (its "Maximum resident set size"), under the
shared memory lock when ``--lock`` is given (one big run at a time on a shared machine), and is removed after.
By default it is the plain command a user runs (drift report included; rc 1 = its accuracy guard failed); the
table adds the guard's verdict, how many probe rounds were compared, and the running peak after each phase
(``drift_report.json``'s ``peak_rss_bytes``).

    python benchmarks/bench_export_memory.py --checkpoint /work/big/ck7b_full --layers 4 \
        --precisions fp32 fp16 int8 int4 --lock /work/notes/bigmem.lock --out benchmarks/results/export_memory_7b.md

``--layers`` is the checkpoint's LLM depth; the table also gives the LLM graph's bytes per layer and the
budget scaled to 32 layers (the 7B), the peak scaled by the measured per-layer resident term.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

GIB = 2 ** 30
#: drift_report.json's peak_rss_bytes keys: the process's running peak after each phase
PHASES = ("export", "probe_on_export", "fp32_reference_export", "fp32_reference")


def run_one(exe: str, checkpoint: Path, out: Path, precision: str, lock: str | None, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", exe, "export", "--checkpoint", str(checkpoint), "--out", str(out),
           "--precision", precision, *extra]
    if lock:
        cmd = ["flock", lock, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    llm = sum(f.stat().st_size for f in out.glob("llm.onnx*")) if out.exists() else 0
    drift = (out / "drift_report.json")
    report = json.loads(drift.read_text()) if drift.exists() else {}
    guard, phases = report.get("guard", {}).get("passed"), report.get("peak_rss_bytes", {})
    rounds = report.get("rounds", [])
    compared = f"{sum(r['compared'] for r in rounds)}/{len(rounds)}" if rounds else "-"
    shutil.rmtree(out, ignore_errors=True)
    return {"precision": precision, "rc": p.returncode, "peak_rss": rss, "disk": disk, "llm_bytes": llm,
            "wall": wall, "guard": guard, "compared": compared, "phases": phases, "command": " ".join(cmd)}


def table(rows: list[dict], layers: int, target_layers: int = 32) -> str:
    lines = [f"| precision | rc | peak RSS GiB | export on disk GiB | budget (1.5x disk + 1) GiB | within | "
             f"LLM MiB/layer | {target_layers}-layer disk GiB | {target_layers}-layer budget GiB | wall | guard passed "
             "(rounds compared) | "
             "running peak after export / probe on export / fp32 reference export / probe on it, GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = 1.5 * r["disk"] + GIB
        per_layer = r["llm_bytes"] / layers
        disk_t = r["disk"] + per_layer * (target_layers - layers)
        lines.append(f"| {r['precision']} | {r['rc']} | {r['peak_rss'] / GIB:.2f} | {r['disk'] / GIB:.2f} | "
                     f"{budget / GIB:.2f} | {'yes' if r['peak_rss'] <= budget else 'NO'} | {per_layer / 2**20:.0f} | "
                     f"{disk_t / GIB:.2f} | {(1.5 * disk_t + GIB) / GIB:.2f} | {r['wall']} | "
                     f"{r['guard']} ({r['compared']}) | "
                     + " / ".join(f"{r['phases'][k] / GIB:.2f}" if r["phases"].get(k) else "-"
                                  for k in PHASES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--layers", type=int, required=True, help="the checkpoint's LLM layers")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--exe", default=str(Path(sys.executable).with_name("segllm-edge")))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/segllm-export-memory"))
    ap.add_argument("--lock", default=None, help="flock this file around each export (shared machines)")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    ap.add_argument("--no-drift-report", action="store_true")
    ap.add_argument("--allow-accuracy-drop", action="store_true",
                    help="pass it on (by default the plain command runs: rc 1 means its accuracy guard failed)")
    a = ap.parse_args(argv)
    extra = (["--allow-accuracy-drop"] if a.allow_accuracy_drop else []) + \
        (["--no-drift-report"] if a.no_drift_report else [])
    rows = []
    for p in a.precisions:
        rows.append(run_one(a.exe, a.checkpoint, a.workdir / p, p, a.lock, extra))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, a.layers)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n`{' '.join(sys.argv)}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
