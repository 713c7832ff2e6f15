"""Throughput and round latency at concurrency 1, 2, 4, 8: the same conversations one after another and all at once.

    python benchmarks/bench_concurrency.py --export EXPORT_DIR [--concurrency 1,2,4,8] [--reps 2]
    python benchmarks/bench_concurrency.py --checkpoint CKPT      # exports to a temp folder first

One server (``generate_repository`` + ``TritonServer``, as ``segllm-edge serve`` runs it) for the whole run. For
each concurrency C: C conversations (alternately the golden image and its mirror), each asking the three golden
questions (round 1, round 2 with [REF:1], round 3 with [REF:2]), run

* **serial**: one conversation after another from one client thread (what a server that runs one round at a
  time gives C users at best), and
* **concurrent**: all C at once from C client threads,

side by side in one run (``--reps`` alternates the order: serial/concurrent, then concurrent/serial). It reports
rounds/s of each and their ratio, p50/p95/p99 round latency (client round trip), each concurrent round's latency
over the solo latency of the same round in the serial run (the slowdown), and whether every concurrent mask
equals the serial run's (it must). With ``--hold`` the last concurrent batch of conversations is left open and the
server's PSS is compared with the export's size plus the state the server counts for them.

The machine's cores, CPU model and ``uptime`` before and after are recorded: ratios from a quiet and a busy
machine are different figures. JSON (and ``--plot`` PNG) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import io
import json
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
#: --no-refs: the same rounds without references (a random-weight checkpoint, e.g. make-tiny-checkpoint's 7B-width
#: one, may find an empty mask in round 1, which a [REF:1] cannot refer to)
PLAIN_QUESTIONS = tuple(q.split("[REF:")[0] for q in QUESTIONS)


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def _images(path: Path) -> list[bytes]:
    from PIL import Image

    a = path.read_bytes()
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(buf, format="PNG")
    return [a, buf.getvalue()]


def _conversation(client, image: bytes, questions, close: bool = True):
    """(per round: (round, latency ms, model_mask, counted memory, serving ms)), the session (open when not
    ``close``)."""
    s = client.session(image)
    out = []
    try:
        for q in questions:
            t0 = time.perf_counter()
            r = s.ask(q)
            out.append((r.round, (time.perf_counter() - t0) * 1e3, r.model_mask, dict(r.memory), dict(r.serving)))
    finally:
        if close:
            s.close()
    return out, s


def run_serial(client, images, c: int, questions):
    t0 = time.monotonic()
    convs = [_conversation(client, images[i % len(images)], questions)[0] for i in range(c)]
    return time.monotonic() - t0, convs, []


def run_concurrent(client, images, c: int, questions, hold: bool = False):
    convs: dict[int, list] = {}
    sessions: dict[int, object] = {}
    errors: list[str] = []
    barrier = threading.Barrier(c)

    def worker(i):
        try:
            barrier.wait()
            convs[i], sessions[i] = _conversation(client, images[i % len(images)], questions, close=not hold)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return wall, [convs.get(i, []) for i in range(c)], errors, [sessions[i] for i in sorted(sessions)]


def _summary(wall: float, convs: list) -> dict:
    lat = [ms for conv in convs for (_, ms, *_rest) in conv]
    n = len(lat)
    return {"wall_s": wall, "rounds": n, "rounds_per_s": n / wall if wall else 0.0,
            "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                           "max": max(lat) if lat else float("nan")}}


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", type=Path, help="export folder (segllm-edge export)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint folder (exported to a temp folder first)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma-separated conversation counts")
    ap.add_argument("--rounds", type=int, default=3, choices=(1, 2, 3), help="rounds per conversation")
    ap.add_argument("--reps", type=int, default=1, help="repetitions per concurrency (orders alternate)")
    ap.add_argument("--max-concurrent-rounds", type=int, default=None, help="the server's setting (default: its own)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads per graph (default: all cores)")
    ap.add_argument("--instances", type=int, default=1, help="instances per stateless graph model (serve --instances)")
    ap.add_argument("--graph-engine", default="onnxruntime", choices=("onnxruntime", "openvino"),
                    help="what the stateless graph models run on (serve --graph-engine)")
    ap.add_argument("--no-refs", action="store_true", help="ask the rounds without [REF:k] (random-weight checkpoints)")
    ap.add_argument("--hold", action="store_true",
                    help="keep the last concurrent run's conversations open and measure the server's PSS")
    ap.add_argument("--image", type=Path, default=GOLDEN / "shapes_a.png")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="added to the result file name")
    ap.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib: the [bench] extra)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    questions = (PLAIN_QUESTIONS if args.no_refs else QUESTIONS)[:args.rounds]

    from _machine import host as machine, uptime

    from segllm_edge.client import connect
    from segllm_edge.serving.repository import generate_repository
    from segllm_edge.serving.round_scheduler import scheduler_parameters
    from segllm_edge.serving.tritonserver import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="segllm-conc-"))
    export = args.export
    if export is None:
        from segllm_edge.export.onnx_export import export_model

        export = tmp / "export"
        export_model(args.checkpoint, export, progress=False)
    export = Path(export).resolve()
    manifest = json.loads((export / "manifest.json").read_text())
    sched = scheduler_parameters(args.max_concurrent_rounds)
    repo = generate_repository(export, tmp / "repo", max_conversations=max(levels), idle_timeout_s=600,
                               instance_count=args.instances, threads=args.threads, bls_parameters=sched,
                               graph_engine=args.graph_engine)
    images = _images(args.image)
    host = machine()
    report = {"benchmark": "concurrency", "host": host, "uptime_before": uptime(), "export": str(export),
              "model": {k: manifest["model"].get(k) for k in ("hidden_size", "num_layers", "num_heads")
                        if k in manifest.get("model", {})},
              "server": {"max_concurrent_rounds": args.max_concurrent_rounds or "default (4)",
                         "threads": args.threads or "all cores", "graph_instances": args.instances,
                         "graph_engine": args.graph_engine},
              "rounds_per_conversation": args.rounds, "questions": list(questions), "levels": {}}
    print(f"{host['cpus_usable']} usable cores ({host['cpu']}); {report['uptime_before']}", flush=True)
    server = TritonServer(repo, log_path=tmp / "tritonserver.log", ready_timeout=600)
    server.start()
    failures = 0
    try:
        server.wait_ready()
        client = connect(server.grpc_url, retry=False)
        report["memory_ready"] = server.memory()
        warm, _ = _conversation(client, images[0], questions)      # first calls of every graph, off the clock
        report["warmup_round_ms"] = [ms for (_, ms, *_r) in warm]
        held = []
        for c in levels:
            level = {"serial": [], "concurrent": [], "ratio": [], "slowdown_max": [], "masks_equal": True,
                     "errors": []}
            for rep in range(args.reps):
                order = ("serial", "concurrent") if rep % 2 == 0 else ("concurrent", "serial")
                got = {}
                for mode in order:
                    last = c == levels[-1] and rep == args.reps - 1 and mode == "concurrent" and args.hold
                    if mode == "serial":
                        got[mode] = run_serial(client, images, c, questions)
                    else:
                        wall, convs, errs, sessions = run_concurrent(client, images, c, questions, hold=last)
                        got[mode] = (wall, convs, errs)
                        if last:
                            held = [(s, conv) for s, conv in zip(sessions, convs)]
                s_wall, s_convs, _ = got["serial"]
                c_wall, c_convs, c_errs = got["concurrent"]
                level["errors"] += c_errs
                level["serial"].append(_summary(s_wall, s_convs))
                level["concurrent"].append(_summary(c_wall, c_convs))
                level["ratio"].append(s_wall / c_wall if c_wall else float("nan"))
                # each round number's solo latency: the serial run's median
                solo_by_round = {rnd: float(np.median([ms for conv in s_convs for (r2, ms, *_r) in conv if r2 == rnd]))
                                 for rnd in {r[0] for conv in s_convs for r in conv}}
                slow = [ms / solo_by_round[rnd] for conv in c_convs for (rnd, ms, *_r) in conv]
                level["slowdown_max"].append(max(slow) if slow else float("nan"))
                for sc, cc in zip(s_convs, c_convs):       # conversation i: same image, same questions
                    if len(sc) != len(cc) or any(not np.array_equal(a[2], b[2]) for a, b in zip(sc, cc)):
                        level["masks_equal"] = False
            report["levels"][str(c)] = level
            ratio = float(np.median(level["ratio"]))
            cl = level["concurrent"][-1]["latency_ms"]
            print(f"C={c}: serial {np.median([x['rounds_per_s'] for x in level['serial']]):.3f} rounds/s, "
                  f"concurrent {np.median([x['rounds_per_s'] for x in level['concurrent']]):.3f} rounds/s -> "
                  f"{ratio:.2f}x; concurrent latency p50 {cl['p50']:.0f} p95 {cl['p95']:.0f} p99 {cl['p99']:.0f} ms; "
                  f"worst round {max(level['slowdown_max']):.2f}x its solo latency; masks equal: "
                  f"{level['masks_equal']}; errors {len(level['errors'])}", flush=True)
            failures += len(level["errors"]) + (not level["masks_equal"])
        if held:
            mem = server.memory()
            counted = sum(sum(conv[-1][3].values()) for _, conv in held if conv)
            report["held"] = {"conversations": len(held), "pss": mem["pss"], "pss_ready": report["memory_ready"]["pss"],
                              "export_bytes": _dir_bytes(export), "counted_state_bytes": counted,
                              "per_process": server.process_memory()}
            h = report["held"]
            print(f"{len(held)} live conversations: server PSS {h['pss'] / 2**20:.0f} MiB (ready: "
                  f"{h['pss_ready'] / 2**20:.0f} MiB); export {h['export_bytes'] / 2**20:.0f} MiB + counted state "
                  f"{counted / 2**20:.1f} MiB = {(h['export_bytes'] + counted) / 2**20:.0f} MiB", flush=True)
            for s, _ in held:
                s.close()
        report["server_log_errors"] = server.errors()[:5]
        client.close()
    finally:
        server.stop()
    report["uptime_after"] = uptime()
    print(report["uptime_after"])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    width = report["model"].get("hidden_size", "x")
    out = args.out / f"{stamp}_concurrency_h{width}x{report['model'].get('num_layers', 'x')}{args.tag}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"saved {out}")
    if args.plot:
        _plot(report, out.with_suffix(".png"))
        print(f"saved {out.with_suffix('.png')}")
    return 1 if failures else 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(int(c) for c in report["levels"])
    get = lambda c, mode, f: float(np.median([f(x) for x in report["levels"][str(c)][mode]]))  # noqa: E731
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("serial", "o--"), ("concurrent", "s-")):
        a.plot(levels, [get(c, mode, lambda x: x["rounds_per_s"]) for c in levels], style, label=mode)
    a.set_xlabel("conversations"), a.set_ylabel("rounds / s"), a.set_xticks(levels), a.legend()
    a.set_ylim(bottom=0), a.set_title("throughput")
    for q, style in (("p50", "s-"), ("p95", "^-"), ("p99", "v-")):
        b.plot(levels, [get(c, "concurrent", lambda x: x["latency_ms"][q]) / 1e3 for c in levels], style,
               label=f"concurrent {q}")
    b.plot(levels, [get(c, "serial", lambda x: x["latency_ms"]["p50"]) / 1e3 for c in levels], "o--",
           label="solo p50 (serial run)")
    b.set_xlabel("conversations"), b.set_ylabel("round latency, s"), b.set_xticks(levels), b.legend()
    b.set_ylim(bottom=0), b.set_title("round latency")
    host = report["host"]
    fig.suptitle(f"segllm over Triton, {host['cpus_usable']} cores ({host['cpu'][:40]}); "
                 f"h{report['model'].get('hidden_size')}x{report['model'].get('num_layers')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:            # --replot RESULT.json: redraw a saved run's PNG
        _plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]).with_suffix(".png"))
        sys.exit(0)
    sys.exit(main())
