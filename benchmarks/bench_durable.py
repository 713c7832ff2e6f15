"""Durable conversations: bytes a conversation stores per round, write latency per round in a directory and in
Redis, and restore time at round 1 and round 8, against the cost of a round on the same model.

    python benchmarks/bench_durable.py --export EXPORT [--image IMG] [--rounds 8] [--repeats 5] \
        [--state-dir DIR] [--redis-url redis://127.0.0.1:6379/0] [--json out.json]

Without --redis-url it starts a throwaway ``redis-server`` on a free loopback port (if the binary exists).
Writes are the server's own: ``DirectoryStore.put`` (temp file, fsync, rename, fsync dir) and
``RedisStore.put`` (one Lua script), directory and Redis alternating, ``--repeats`` times per round, medians
printed. Restores alternate round 1 and the last round. Restore = image encode + one prefill (no mask decoder).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Segment the red circle.", "Segment the blue square next to it.[REF:1]",
             "Segment the object above instance 2.[REF:2]"]


def question(i: int) -> str:
    if i < len(QUESTIONS):
        return QUESTIONS[i]
    return f"Segment the object next to instance {i}.[REF:{i}]"


def start_redis(tmp: Path):
    from segllm_edge.serving.tritonserver import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    import redis

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--image", type=Path, default=ROOT / "tests" / "golden" / "shapes_a.png")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--state-dir", type=Path, default=None, help="directory store (default: a temp dir)")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import segllm_edge
    from segllm_edge.errors import RoundReferenceError
    from segllm_edge.serving.state_store import DirectoryStore, RedisStore, state_key

    tmp = Path(tempfile.mkdtemp(prefix="segllm-bench-durable-"))
    redis_proc, url = (None, a.redis_url) if a.redis_url else start_redis(tmp)
    stores = {"directory": DirectoryStore(a.state_dir or tmp / "states", ttl_s=3600)}
    if url:
        stores["redis"] = RedisStore(url, ttl_s=3600, prefix="bench:")
    try:
        model = segllm_edge.load(a.export, backend="onnxruntime")
        s = model.session(a.image)
        rows, states = [], {}
        for i in range(a.rounds):
            t0 = time.perf_counter()
            try:
                s.ask(question(i))
            except RoundReferenceError:                       # the round referred to had an empty mask
                s.ask(question(i).split("[REF:")[0])
            round_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            blob = model.save(s)
            save_ms = (time.perf_counter() - t0) * 1e3
            states[i + 1] = blob
            write = {k: [] for k in stores}
            for rep in range(a.repeats):                      # directory and Redis alternating
                for kind, store in stores.items():
                    key = state_key(f"bench-{i}-{rep}")
                    t0 = time.perf_counter()
                    store.put(key, blob)
                    write[kind].append((time.perf_counter() - t0) * 1e3)
                    store.delete(key)
            row = {"round": i + 1, "state_bytes": len(blob), "round_ms": round_ms, "save_ms": save_ms,
                   **{f"write_{k}_ms": statistics.median(v) for k, v in write.items()}}
            rows.append(row)
            print(f"round {row['round']:2d}: state {row['state_bytes']:>9,d} B  serialize {save_ms:6.1f} ms  " +
                  "  ".join(f"write {k} {row[f'write_{k}_ms']:6.2f} ms" for k in stores) +
                  f"  (the round itself {round_ms:7.0f} ms)", flush=True)
        first, last = 1, a.rounds
        times = {first: [], last: []}
        stages = {}
        for _ in range(max(1, a.repeats // 2)):               # alternating round 1 / last round
            for n in (first, last):
                t0 = time.perf_counter()
                r = model.restore(states[n])
                times[n].append((time.perf_counter() - t0) * 1e3)
                stages[n] = r.restore_timings
        mean_round = statistics.median(r["round_ms"] for r in rows[1:]) if len(rows) > 1 else rows[0]["round_ms"]
        rest = {n: statistics.median(v) for n, v in times.items()}
        for n in (first, last):
            st = ", ".join(f"{k} {v:.0f}" for k, v in stages[n].items())
            print(f"restore at round {n}: {rest[n]:7.0f} ms  ({st} ms)  = {rest[n] / mean_round:.2f} x the median "
                  f"round ({mean_round:.0f} ms)")
        print(f"restore round {last} / round {first}: {rest[last] / rest[first]:.2f}")
        out = {"export": str(a.export), "rows": rows, "restore_ms": rest, "restore_stages": stages,
               "median_round_ms": mean_round}
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
    finally:
        for st in stores.values():
            st.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
