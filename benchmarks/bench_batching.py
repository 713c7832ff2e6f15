"""What batching across conversations would buy on this machine: one call of batch B vs B calls of batch 1.

    python benchmarks/bench_batching.py --export EXPORT_DIR [--batch 4] [--reps 3] [--threads N]

For the graphs a round spends its time in, on onnxruntime's CPU provider as the server runs them:

* ``llm``: B conversations' prefill of T new tokens on P past tokens each (T in {1, 16, 64}, P in {0, 256}):
  one call with batch B (what a batched prefill of equal-length conversations costs; ragged lengths need
  padding + an attention mask the export does not take) against B calls with batch 1;
* ``mask_decoder``: its conditioning axis ``n`` (the [SEG] queries of one round) with B rows against B calls of
  one row. Each row runs the whole text-conditioned encoder + decoder (the fusion block sits before encoder
  layer 0), so this is the compute a decoder batched over B conversations would do -- over one image's
  features (the export's features have batch 1);
* ``seg_head``: B rows against B calls of one.

Each figure is the median of ``--reps`` alternating (batched, one-by-one) pairs; the ratio is one-by-one time
over batched time (> 1: batching gains). ``uptime`` and the cores are recorded. JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _feeds(spec, sizes: dict, rng) -> dict:
    out = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        out[t.name] = rng.standard_normal(shape, dtype=np.float32).astype(np.dtype(t.dtype))
    return out


def _time(sess, feeds_list) -> float:
    t0 = time.perf_counter()
    for f in feeds_list:
        sess.run(None, f)
    return (time.perf_counter() - t0) * 1e3


def compare(sess, spec, batched_sizes: dict, single_sizes: dict, b: int, reps: int, rng) -> dict:
    big = _feeds(spec, batched_sizes, rng)
    small = [_feeds(spec, single_sizes, rng) for _ in range(b)]
    _time(sess, [big]), _time(sess, small[:1])          # first calls of these shapes, off the clock
    batched, single = [], []
    for r in range(reps):
        pair = ((batched, [big]), (single, small)) if r % 2 == 0 else ((single, small), (batched, [big]))
        for acc, fl in pair:
            acc.append(_time(sess, fl))
    bm, sm = float(np.median(batched)), float(np.median(single))
    return {"batched_ms": bm, "one_by_one_ms": sm, "gain": sm / bm if bm else float("nan"),
            "batched_all": batched, "one_by_one_all": single}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores, as served)")
    ap.add_argument("--graphs", default="llm,mask_decoder,seg_head")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from _machine import uptime

    from segllm_edge.contracts import ort as ortc
    from segllm_edge.contracts.manifest import Manifest

    m = Manifest.load(args.export)
    threads = args.threads or os.cpu_count() or 1
    b = args.batch
    rng = np.random.default_rng(0)
    report = {"benchmark": "batching", "export": str(args.export.resolve()), "batch": b, "threads": threads,
              "cpus_usable": len(os.sched_getaffinity(0)), "uptime_before": uptime(),
              "model": {k: m.model.get(k) for k in ("hidden_size", "num_layers")}, "cases": []}
    print(f"{report['cpus_usable']} cores, {threads} threads; {report['uptime_before']}", flush=True)
    for g in args.graphs.split(","):
        spec = m.graphs[g]
        sess = ortc.open_session(args.export / spec.file, ortc.session_options(threads), ortc.providers_for("cpu"), g)
        if g == "llm":
            cases = [(t, p) for p in (0, 256) for t in (1, 16, 64)]
            for t, p in cases:
                res = compare(sess, spec, {"batch": b, "seq": t, "past": p}, {"batch": 1, "seq": t, "past": p},
                              b, args.reps, rng)
                res.update(graph=g, new_tokens=t, past=p)
                report["cases"].append(res)
                print(f"llm T={t:3d} P={p:3d}: batch {b} {res['batched_ms']:8.1f} ms vs {b} x batch 1 "
                      f"{res['one_by_one_ms']:8.1f} ms -> {res['gain']:.2f}x", flush=True)
        else:
            axis = next(d for t in spec.inputs for d in t.shape if isinstance(d, str))
            res = compare(sess, spec, {axis: b}, {axis: 1}, b, args.reps, rng)
            res.update(graph=g, axis=axis)
            report["cases"].append(res)
            print(f"{g} {axis}={b}: {res['batched_ms']:8.1f} ms vs {b} x {axis}=1 {res['one_by_one_ms']:8.1f} ms "
                  f"-> {res['gain']:.2f}x", flush=True)
        del sess
    report["uptime_after"] = uptime()
    print(report["uptime_after"])
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / (f"{time.strftime('%Y%m%d-%H%M%S')}_batching_h{report['model']['hidden_size']}"
                      f"x{report['model']['num_layers']}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
