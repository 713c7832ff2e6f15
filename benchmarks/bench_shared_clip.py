"""CLIP held once for both CLIP graphs: memory (PSS) and speed of two plain onnxruntime sessions vs two
sessions sharing their identical initializers (segllm_edge/runtime/shared_weights.py, prepacking off).

    python benchmarks/bench_shared_clip.py --export EXPORT_DIR [--reps 3] [--threads N]

Memory: one child process per variant opens vision_encoder + mask_encoder, runs each once (an image, one
crop), and reports its PSS. Speed: in this process, a plain vision_encoder session (prepacked weights)
and the shared one, run alternately ``--reps`` times on the same image. Saved under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GRAPHS = ("vision_encoder", "mask_encoder")


def _pss() -> int:
    import os

    from segllm_edge.serving.tritonserver import _pss as pss_of

    return pss_of(os.getpid())


def _feeds(g: str):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    return {"pixel_values": x} if g == "vision_encoder" else {"crops": x, "boxes": rng.random((1, 4), np.float32)}


def _open(export: Path, variant: str, threads, graphs=GRAPHS):
    from segllm_edge.contracts import ort as ortc
    from segllm_edge.runtime.shared_weights import open_sessions_sharing_weights

    files = {g: export / f"{g}.onnx" for g in graphs}
    if variant == "shared":
        return open_sessions_sharing_weights(files, lambda: ortc.session_options(threads), ["CPUExecutionProvider"])
    return {g: ortc.open_session(f, ortc.session_options(threads), ["CPUExecutionProvider"], g)
            for g, f in files.items()}, None


def child(export: Path, variant: str, threads) -> None:
    base = _pss()
    sessions, keep = _open(export, variant, threads)
    loaded = _pss()
    for g, s in sessions.items():
        s.run(None, _feeds(g))
    print(json.dumps({"variant": variant, "pss_base": base, "pss_loaded": loaded, "pss_after_runs": _pss(),
                      "shared_bytes": keep.shared_bytes if keep else 0}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", choices=("plain", "shared"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    export = args.export.resolve()
    if args.child:
        child(export, args.child, args.threads)
        return 0
    clip_bytes = sum(p.stat().st_size for g in GRAPHS for p in export.glob(f"{g}.onnx*"))
    mem = {}
    for variant in ("plain", "shared"):
        cmd = [sys.executable, __file__, "--export", str(export), "--child", variant]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        mem[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{variant}: PSS loaded {mem[variant]['pss_loaded'] / 2**20:.0f} MiB, after a run of each graph "
              f"{mem[variant]['pss_after_runs'] / 2**20:.0f} MiB", flush=True)

    plain, _ = _open(export, "plain", args.threads, graphs=("vision_encoder",))
    shared, keep = _open(export, "shared", args.threads)
    feeds = _feeds("vision_encoder")
    times = {"plain": [], "shared": []}
    for v in (plain, shared):
        v["vision_encoder"].run(None, feeds)         # warm-up
    for _ in range(args.reps):
        for name, v in (("plain", plain), ("shared", shared)):
            t0 = time.perf_counter()
            v["vision_encoder"].run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    report = {"benchmark": "shared_clip", "export": str(export), "clip_graph_bytes_on_disk": clip_bytes,
              "memory": mem, "vision_encoder_ms": times, "vision_encoder_ms_median": med,
              "shared_over_plain_time": med["shared"] / med["plain"],
              "shared_over_plain_pss": mem["shared"]["pss_after_runs"] / mem["plain"]["pss_after_runs"]}
    print(f"vision_encoder median of {args.reps}: plain {med['plain']:.0f} ms, shared (no prepacking) "
          f"{med['shared']:.0f} ms: {report['shared_over_plain_time']:.2f}x; PSS shared/plain "
          f"{report['shared_over_plain_pss']:.2f}x (CLIP graphs on disk {clip_bytes / 2**20:.0f} MiB)")
    from segllm_edge.bench import save_result

    print(f"saved {save_result(report, args.out, 'shared_clip')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
