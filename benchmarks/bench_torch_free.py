"""The numpy runtime vs main's (torch-importing) onnxruntime path, and a full install vs ``.[cpu,serve]``:
import time, RSS after loading an export, per-round latency, RSS of a process that imports the Triton BLS
model's code. Each configuration runs in its own process, alternating, in one run; prints medians and ratios.

    mkdir /tmp/segllm-main && git archive main segllm_edge | tar -x -C /tmp/segllm-main   # the baseline
    python benchmarks/bench_torch_free.py --export EXPORT --baseline-src /tmp/segllm-main \
        [--lean-python LEAN_VENV/bin/python] [--repeats 3] [--conversations 3]

Configurations: ``main`` (this interpreter, PYTHONPATH=--baseline-src), ``numpy`` (this interpreter, this
checkout), ``numpy-lean`` (--lean-python: a venv with only ``.[cpu,serve]`` installed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import segllm_edge
from segllm_edge import load
t_import = time.perf_counter() - t0
export, image, n_conv = sys.argv[1], sys.argv[2], int(sys.argv[3])
QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
             "Segment the object above instance 2.[REF:2]")
t0 = time.perf_counter()
model = load(export, backend="onnxruntime")
t_load = time.perf_counter() - t0
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rounds = []
for c in range(n_conv + 1):                       # the first conversation is the warm-up
    s = model.session(image)
    ms = []
    for q in QUESTIONS:
        t0 = time.perf_counter()
        s.ask(q)
        ms.append((time.perf_counter() - t0) * 1e3)
    if c:
        rounds.append(ms)
print(json.dumps({"import_s": t_import, "load_s": t_load, "rss_after_load": rss_load,
                  "rss_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "round_ms": rounds,
                  "torch_loaded": "torch" in sys.modules}))
"""

STUB = r"""
import json, resource, sys
import numpy, onnxruntime
import segllm_edge.serving.bls, segllm_edge.serving.models  # what the BLS / preprocess stubs import
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "torch_loaded": "torch" in sys.modules}))
"""


def _run(python: str, pythonpath: str | None, code: str, args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, cwd="/tmp")
    if out.returncode:
        raise SystemExit(f"{python} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--baseline-src", type=Path, required=True, help="a checkout of the baseline (main)")
    ap.add_argument("--lean-python", default=None, help="python of a venv with only .[cpu,serve]")
    ap.add_argument("--image", type=Path, default=ROOT / "segllm_edge" / "assets" / "demo_shapes.png")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    configs = {"main": (sys.executable, str(a.baseline_src)), "numpy": (sys.executable, str(ROOT))}
    if a.lean_python:
        configs["numpy-lean"] = (a.lean_python, None)
    res = {k: [] for k in configs}
    stub = {k: [] for k in configs}
    names = list(configs)
    for rep in range(a.repeats):
        order = names if rep % 2 == 0 else names[::-1]      # alternate the order between repeats
        for k in order:
            py, path = configs[k]
            res[k].append(_run(py, path, CHILD, [str(a.export), str(a.image), str(a.conversations)]))
            stub[k].append(_run(py, path, STUB, []))
            print(f"repeat {rep + 1} {k}: done", file=sys.stderr)
    summary = {}
    for k in names:
        rounds = [r for run in res[k] for conv in run["round_ms"] for r in conv]
        per_round = [statistics.median([conv[i] for run in res[k] for conv in run["round_ms"]]) for i in range(3)]
        summary[k] = {
            "import_s": statistics.median(r["import_s"] for r in res[k]),
            "load_s": statistics.median(r["load_s"] for r in res[k]),
            "rss_after_load_MiB": statistics.median(r["rss_after_load"] for r in res[k]) / 2**20,
            "round_ms_median": statistics.median(rounds),
            "round_ms_by_round": per_round,
            "bls_import_rss_MiB": statistics.median(s["rss"] for s in stub[k]) / 2**20,
            "torch_loaded": res[k][0]["torch_loaded"], "stub_torch_loaded": stub[k][0]["torch_loaded"],
        }
    base = summary["main"]
    for k in names:
        s = summary[k]
        s["round_ratio_vs_main"] = round(s["round_ms_median"] / base["round_ms_median"], 3)
        s["rss_ratio_vs_main"] = round(s["rss_after_load_MiB"] / base["rss_after_load_MiB"], 3)
    print(f"{'config':12s} {'import s':>9s} {'load s':>7s} {'RSS MiB':>8s} {'round ms':>9s} {'r1/r2/r3 ms':>20s} "
          f"{'BLS RSS':>8s} {'round/main':>10s} torch")
    for k in names:
        s = summary[k]
        rr = "/".join(f"{v:.0f}" for v in s["round_ms_by_round"])
        print(f"{k:12s} {s['import_s']:9.2f} {s['load_s']:7.2f} {s['rss_after_load_MiB']:8.0f} "
              f"{s['round_ms_median']:9.1f} {rr:>20s} {s['bls_import_rss_MiB']:8.0f} {s['round_ratio_vs_main']:10.3f} "
              f"{s['torch_loaded']}")
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "runs": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
