"""Where the mask decoder's time goes: per-op-type totals of one export's mask_decoder.onnx under OpenVINO's
CPU plugin (``PERF_COUNT``) or onnxruntime's profiler, on random inputs of the manifest's shapes.

    python benchmarks/profile_mask_decoder.py --export DIR [--runtime openvino|onnxruntime] [--threads 2]
        [--precision f32|bf16|bf16-ffn|int8-ffn] [--top 25]

Prints the wall time of two runs after a warm-up, then op type (and OpenVINO's kernel) → ms, share, count, and
the slowest single nodes. Reports, does not assert. docs/cpu.md quotes its output.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def feeds_for(manifest) -> dict:
    rng = np.random.default_rng(0)
    spec = manifest.graphs["mask_decoder"]
    return {t.name: rng.standard_normal([1 if isinstance(d, str) else d for d in t.shape], dtype=np.float32)
            for t in spec.inputs}


def profile_openvino(path: Path, feeds: dict, threads: int, precision: str):
    import openvino as ov

    from segllm_edge.runtime.openvino_backend import FFN_PRECISIONS
    from segllm_edge.runtime.openvino_mixed import INT8_DYNAMIC_GROUP_SIZE, read_ffn

    core = ov.Core()
    ffn = FFN_PRECISIONS.get(precision)
    model = read_ffn(core, path, ffn) if ffn else core.read_model(str(path))
    config = {"INFERENCE_PRECISION_HINT": "f32" if ffn else precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    if ffn == "int8":
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = INT8_DYNAMIC_GROUP_SIZE
    compiled = core.compile_model(model, "CPU", config)
    req = compiled.create_infer_request()
    req.infer(feeds)
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        req.infer(feeds)
        walls.append(time.perf_counter() - t)
    rows = [(p.node_type, p.exec_type, p.node_name, p.real_time.total_seconds() * 1e3)
            for p in req.get_profiling_info()]
    return walls, rows


ORT_RUNS = 3   # onnxruntime profiles every run of the session: the warm-up and the two timed runs


def profile_onnxruntime(path: Path, feeds: dict, threads: int):
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        walls = []
        for _ in range(2):
            t = time.perf_counter()
            sess.run(None, feeds)
            walls.append(time.perf_counter() - t)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    rows = [(e["args"].get("op_name", "?"), "ort", e["name"][:-len("_kernel_time")], e["dur"] / 1e3 / ORT_RUNS)
            for e in runs]
    return walls, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--runtime", choices=("openvino", "onnxruntime"), default="openvino")
    ap.add_argument("--precision", choices=("f32", "bf16", "bf16-ffn", "int8-ffn"), default="f32", help="OpenVINO only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from segllm_edge.contracts.manifest import Manifest

    manifest = Manifest.load(args.export)
    path = args.export / manifest.graphs["mask_decoder"].file
    feeds = feeds_for(manifest)
    if args.runtime == "openvino":
        walls, rows = profile_openvino(path, feeds, args.threads, args.precision)
    else:
        walls, rows = profile_onnxruntime(path, feeds, args.threads)
    print(f"{path} ({manifest.extra.get('graphs', {}).get('mask_decoder', {}).get('variant', 'no variant')})")
    print(f"{args.runtime} {args.precision if args.runtime == 'openvino' else 'fp32'}, {args.threads} threads: "
          f"wall {', '.join(f'{w:.2f}' for w in walls)} s")
    agg, count = collections.Counter(), collections.Counter()
    per_node = ORT_RUNS if args.runtime == "onnxruntime" else 1
    for op, kernel, _, ms in rows:
        agg[(op, kernel)] += ms
        count[(op, kernel)] += 1 / per_node
    total = sum(agg.values()) or 1.0
    print(f"per-op total {total:.0f} ms (last run)")
    for (op, kernel), ms in agg.most_common(args.top):
        print(f"{ms:9.1f} ms {100 * ms / total:5.1f}%  n={round(count[(op, kernel)]):4d}  {op} [{kernel}]")
    print("slowest nodes:")
    for op, kernel, name, ms in sorted(rows, key=lambda r: -r[3])[:10]:
        print(f"{ms:9.1f} ms  {op} [{kernel}]  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
