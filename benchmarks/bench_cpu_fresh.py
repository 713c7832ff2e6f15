"""CPU speed the way a user measures it: a fresh process per run, ``segllm_edge.load(export)`` with its defaults,
the golden conversation's rounds 1-3, rounds 2+3 timed; the export of commit edac365 (run by the edac365 code,
whose default is onnxruntime fp32) against an export of this code (its default CPU path), alternating.

    python benchmarks/bench_cpu_fresh.py --old-code EDAC365_TREE --old-export OLD --export NEW [--reps 2]

EDAC365_TREE is the source tree of commit edac365 (``git archive edac365 | tar -x -C /tmp/edac365``); OLD is
its export of the golden-size checkpoint (see bench_cpu_paths.py's docstring), NEW this code's export of the
same checkpoint. OLD loads as edac365's users loaded an export (``backend="onnxruntime"``: its ``load`` had
no default for exports), NEW with no options. Each run is its own ``python`` process (PYTHONPATH=EDAC365_TREE for OLD): import, load, open a
session on the golden image, ask the three golden questions; the process reports the wall time of each
``ask``, the stage timings, the load time and the final masks' IoU vs the research code's golden masks.
``--conversations 2`` asks the conversation a second time in the same process (its figures show what the
first conversation's rounds paid for first calls). Runs alternate OLD, NEW, OLD, NEW ... (``--reps`` pairs), so
drifting machine load hits both alike; prints the per-run table, the medians and the ratio of rounds 2+3, with
``uptime`` before and after. Reports, does not assert; JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# this folder's side-by-side benchmark: its module level imports numpy only, so the edac365 child can use it too
from bench_cpu_paths import GOLDEN, QUESTIONS, ROOT, golden_masks


def child(export: str, conversations: int, expect_root: str | None, load_kwargs: dict) -> dict:
    """One user's process: what it prints is the run's record (JSON)."""
    t0 = time.perf_counter()
    import numpy as np
    import segllm_edge

    if expect_root and not str(Path(segllm_edge.__file__).resolve()).startswith(str(Path(expect_root).resolve())):
        raise SystemExit(f"segllm_edge imported from {segllm_edge.__file__}, not {expect_root}")
    t_import = time.perf_counter()
    model = segllm_edge.load(export, **load_kwargs)
    t_load = time.perf_counter()
    golden = golden_masks()
    convs = []
    for _ in range(conversations):
        s = model.session(str(GOLDEN / "shapes_a.png"))
        rounds = []
        for q, ref in zip(QUESTIONS, golden):
            t = time.perf_counter()
            r = s.ask(q)
            ms = (time.perf_counter() - t) * 1e3
            m = np.asarray(r.model_mask, dtype=bool)  # the 1024 frame the golden masks are in
            # by hand: the edac365 tree has no segllm_edge.pipeline.masks.mask_iou
            union = np.logical_or(m, ref).sum()
            iou = float(np.logical_and(m, ref).sum() / union) if union else 1.0
            rounds.append({"ms": ms, "iou": iou, "timings": {k: float(v) for k, v in (r.timings or {}).items()}})
        convs.append(rounds)
    return {"import_ms": (t_import - t0) * 1e3, "load_ms": (t_load - t_import) * 1e3, "repr": repr(model),
            "conversations": convs}


def run_one(label: str, export: Path, code: Path | None, conversations: int, load_kwargs: dict) -> dict:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(export), "--conversations",
           str(conversations), "--load-kwargs", json.dumps(load_kwargs)]
    if code is not None:
        cmd += ["--expect-root", str(code)]
    t = time.perf_counter()
    # from a neutral folder: `python` from the repo root would import this checkout's segllm_edge first
    out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{label} run failed ({out.returncode}):\n{out.stderr[-4000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["process_ms"] = (time.perf_counter() - t) * 1e3
    rec["label"] = label
    return rec


def r23(rec: dict, conv: int = 0) -> float:
    return sum(r["ms"] for r in rec["conversations"][conv][1:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--expect-root", help=argparse.SUPPRESS)
    ap.add_argument("--load-kwargs", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--old-code", type=Path, help="source tree of commit edac365")
    ap.add_argument("--old-export", type=Path, help="export written by commit edac365")
    ap.add_argument("--export", type=Path, help="export written by this code")
    ap.add_argument("--reps", type=int, default=2, help="OLD/NEW pairs, alternating")
    ap.add_argument("--conversations", type=int, default=1, help="conversations per process (the first is timed)")
    ap.add_argument("--old-kwargs", default='{"backend": "onnxruntime"}',
                    help="JSON load() options for OLD (edac365's load() needs the backend named: onnxruntime fp32)")
    ap.add_argument("--new-kwargs", default="{}", help="JSON load() options for NEW (default: none, the user's way)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.conversations, args.expect_root, json.loads(args.load_kwargs))))
        return 0
    for flag in ("old_code", "old_export", "export"):
        if getattr(args, flag) is None:
            ap.error(f"--{flag.replace('_', '-')} is required")
    sys.path.insert(0, str(ROOT))
    from benchmarks._machine import host, uptime
    from segllm_edge.bench import save_result

    before = uptime()
    print(f"uptime before: {before}", flush=True)
    runs = []
    for i in range(args.reps):
        for label, export, code, kw in (("edac365", args.old_export, args.old_code, json.loads(args.old_kwargs)),
                                        ("this", args.export, None, json.loads(args.new_kwargs))):
            rec = run_one(label, export, code, args.conversations, kw)
            rounds = rec["conversations"][0]
            extra = "" if args.conversations < 2 else f"  (2nd conversation r2+r3 {r23(rec, 1):.0f} ms)"
            print(f"rep {i + 1} {label:8s} load {rec['load_ms']:6.0f} ms  rounds "
                  + " / ".join(f"{r['ms']:.0f}" for r in rounds) + f" ms  r2+r3 {r23(rec):.0f} ms  IoU "
                  + ", ".join(f"{r['iou']:.5f}" for r in rounds) + extra, flush=True)
            runs.append(rec)
    after = uptime()
    med = {lab: statistics.median(r23(r) for r in runs if r["label"] == lab) for lab in ("edac365", "this")}
    pairs = [r23(a) / r23(b) for a, b in zip(runs[0::2], runs[1::2])]
    print(f"\n{runs[1]['repr']}")
    print(f"rounds 2+3, median: edac365 {med['edac365']:.0f} ms, this {med['this']:.0f} ms: "
          f"{med['edac365'] / med['this']:.2f}x (per pair: {', '.join(f'{p:.2f}' for p in pairs)})")
    print(f"uptime after: {after}")
    report = {"host": host(), "uptime_before": before, "uptime_after": after, "old_export": str(args.old_export),
              "export": str(args.export), "old_kwargs": json.loads(args.old_kwargs),
              "new_kwargs": json.loads(args.new_kwargs), "runs": runs,
              "median_r23_ms": med, "ratio": med["edac365"] / med["this"], "pair_ratios": pairs}
    print(f"saved {save_result(report, args.results_dir, 'cpu_fresh' + (f'_{args.tag}' if args.tag else ''))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
