"""Load test: N concurrent SegLLM conversations against a local Triton server for a bounded time.

    python benchmarks/bench_triton_load.py --export EXPORT_DIR [--conversations 8] [--duration 60]
    python benchmarks/bench_triton_load.py --checkpoint CKPT      # exports to a temp folder first

Each worker opens a conversation on the golden image, asks the golden questions in turn (round 1,
2 with [REF:1], 3 with [REF:2]), closes after the third round and starts over, until the time is up
(rounds in flight then finish).  Reports rounds/s, per-round latency p50/p90/p99 (client round trip),
server-side stage means, error count (must be 0) and server memory (TritonServer.memory()), printed
and saved as JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
             "Segment the object above instance 2.[REF:2]")


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", type=Path, help="export folder (segllm-edge export)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint folder (exported to a temp folder first)")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to start new rounds")
    ap.add_argument("--image", type=Path, default=GOLDEN / "shapes_a.png")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from segllm_edge.client import connect
    from segllm_edge.serving.repository import generate_repository
    from segllm_edge.serving.tritonserver import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="segllm-bench-"))
    export = args.export
    if export is None:
        from segllm_edge.export.onnx_export import export_model

        export = tmp / "export"
        export_model(args.checkpoint, export, progress=False)
    repo = generate_repository(export, tmp / "repo", max_conversations=args.conversations, idle_timeout_s=600)
    image = args.image.read_bytes()
    server = TritonServer(repo, log_path=tmp / "tritonserver.log", ready_timeout=300)
    server.start()
    ready_s = server.wait_ready()
    mem_idle = server.memory()
    print(f"server ready in {ready_s:.1f} s; idle RSS server {mem_idle['server'] / 2**20:.0f} MiB, "
          f"{mem_idle['stub_count']} stubs {mem_idle['stubs'] / 2**20:.0f} MiB", flush=True)

    latencies: list[float] = []
    by_round: dict[int, list[float]] = {1: [], 2: [], 3: []}
    stages: dict[str, list[float]] = {}
    errors: list[str] = []
    peak = {"server": 0, "stubs": 0}
    lock = threading.Lock()
    deadline = [0.0]
    done = threading.Event()

    def worker(i: int) -> None:
        client = connect(server.grpc_url)
        while time.monotonic() < deadline[0]:
            s = client.session(image)
            try:
                for q in QUESTIONS:
                    if time.monotonic() >= deadline[0]:
                        break
                    t0 = time.perf_counter()
                    r = s.ask(q)
                    ms = (time.perf_counter() - t0) * 1e3
                    with lock:
                        latencies.append(ms)
                        by_round[r.round].append(ms)
                        for k, v in {**r.timings, **r.serving}.items():
                            if isinstance(v, (int, float)):
                                stages.setdefault(k, []).append(float(v))
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            finally:
                s.close()
        client.close()

    def sampler() -> None:
        while not done.wait(1.0):
            try:
                m = server.memory()
            except Exception:
                continue
            peak["server"] = max(peak["server"], m["server"])
            peak["stubs"] = max(peak["stubs"], m["stubs"])

    t_start = time.monotonic()
    deadline[0] = t_start + args.duration
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.conversations)]
    mt = threading.Thread(target=sampler, daemon=True)
    mt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    done.set()
    mem_end = server.memory()
    server_errors = server.errors()
    server.stop()

    report = {
        "benchmark": "triton_load",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "export": str(Path(export).resolve()),
        "conversations": args.conversations, "duration_s": args.duration, "wall_s": wall,
        "rounds": len(latencies), "rounds_per_s": len(latencies) / wall if wall else 0.0,
        "latency_ms": {"p50": _pct(latencies, 50), "p90": _pct(latencies, 90), "p99": _pct(latencies, 99),
                       "mean": float(np.mean(latencies)) if latencies else float("nan")},
        "latency_ms_by_round": {r: {"n": len(v), "p50": _pct(v, 50), "p90": _pct(v, 90)} for r, v in by_round.items()},
        "server_stage_ms_mean": {k: float(np.mean(v)) for k, v in sorted(stages.items())},
        "errors": len(errors), "error_samples": errors[:5], "server_log_errors": server_errors[:5],
        "memory_bytes": {"ready": mem_idle, "end": mem_end, "peak_server": peak["server"], "peak_stubs": peak["stubs"]},
        "server_ready_s": ready_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"triton_load_{args.conversations}conv_{int(args.duration)}s.json"
    out.write_text(json.dumps(report, indent=1))
    lat = report["latency_ms"]
    print(f"{report['rounds']} rounds in {wall:.1f} s with {args.conversations} conversations: "
          f"{report['rounds_per_s']:.3f} rounds/s; latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, "
          f"p99 {lat['p99']:.0f} ms; errors {len(errors)}; peak RSS server {peak['server'] / 2**20:.0f} MiB, "
          f"stubs {peak['stubs'] / 2**20:.0f} MiB")
    print(f"saved {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
