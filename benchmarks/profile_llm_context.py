"""Where the llm step's time goes at a short and a long context: onnxruntime's own per-node profile, summed
per operator type, for an export in the in-place KV layout.

    python benchmarks/profile_llm_context.py --export INPLACE_EXPORT [--short 300] [--long 1800] [--reps 10]

One llm session (onnxruntime, CPU, profiling on) and two random caches of ``--short`` and ``--long`` tokens.
``--reps`` times, alternating which goes first, one ``--new``-token round on each; the cache is cropped back
after each round, so every round of one cache sees the same context. Prints, per operator type, the median
time per round at each context and the difference -- what grows with the context (at 7B width: the
GroupQueryAttention nodes, which read the whole cache once per round; the matrix multiplications, most of the
round, do not grow). Saved as JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _per_run(events: list, labels: list[str]) -> dict:
    """{label: {op_type: [ms per run]}} from an onnxruntime profile, node events assigned to the run they lie in."""
    runs = [e for e in events if e.get("name") == "model_run"]
    if len(runs) != len(labels):
        raise SystemExit(f"profile has {len(runs)} runs, expected {len(labels)}")
    per = [collections.Counter() for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
            per[i][e["args"].get("op_name", "?")] += e["dur"] / 1e3
    out: dict = {lab: collections.defaultdict(list) for lab in set(labels)}
    for lab, run, counts in zip(labels, runs, per):
        out[lab]["(model_run)"].append(run["dur"] / 1e3)
        for op, ms in counts.items():
            out[lab][op].append(ms)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="an export in the in-place KV layout")
    ap.add_argument("--short", type=int, default=300)
    ap.add_argument("--long", type=int, default=1800)
    ap.add_argument("--new", type=int, default=15, help="tokens per round")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from segllm_edge.bench import save_result
    from segllm_edge.contracts import ort as ortc
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.contracts.manifest import KV_INPLACE, kv_names
    from segllm_edge.contracts.precisions import numpy_dtype
    from segllm_edge.runtime.kv_buffer import inplace_cache, run_llm_inplace

    export = open_export(args.export)
    if export.manifest.kv_layout != KV_INPLACE:
        raise SystemExit(f"{args.export} is not in the in-place KV layout (segllm-edge convert-kv-inplace)")
    info = export.info
    past, present = kv_names(info.num_layers)
    opts = ortc.session_options(args.threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="llm-profile-")) / "llm")
    sess = ortc.open_session(export.graph_path("llm"), opts, ["CPUExecutionProvider"], "llm")
    if args.long + args.new > info.max_context:
        raise SystemExit(f"--long {args.long} + --new {args.new} is past the model's context ({info.max_context})")
    spec = export.manifest.graphs["llm"]
    dtype = np.dtype(numpy_dtype(spec.input(past[0]).dtype))             # the cache's (fp16 after quantize_export)
    emb_dtype = np.dtype(numpy_dtype(spec.input("inputs_embeds").dtype))  # the embeddings' (fp32 in an fp16 export)
    rng = np.random.default_rng(0)
    caches = {}
    for label, n in (("short", args.short), ("long", args.long)):
        c = inplace_cache(info, dtype)
        c.reserve(n + args.new)
        for b in c.buffers:
            b[:, :, :n] = rng.standard_normal((1, info.num_kv_heads, n, info.head_dim)).astype(dtype)
        c.length = n
        caches[label] = c
    emb = rng.standard_normal((1, args.new, info.hidden_size)).astype(emb_dtype)
    labels, wall = [], collections.defaultdict(list)
    for rep in range(args.reps):
        for label in (("short", "long") if rep % 2 == 0 else ("long", "short")):
            c = caches[label]
            t0 = time.perf_counter()
            run_llm_inplace(sess, emb, c, "inputs_embeds", past, "hidden_states", present)
            wall[label].append((time.perf_counter() - t0) * 1e3)
            c.crop(c.length - args.new)
            labels.append(label)
    profile = Path(sess.end_profiling())
    per = _per_run(json.loads(profile.read_text()), labels)
    profile.unlink()
    med = {lab: {op: float(np.median(v)) for op, v in ops.items()} for lab, ops in per.items()}
    ops = sorted(set(med["short"]) | set(med["long"]), key=lambda o: -med["long"].get(o, 0.0))
    print(f"median ms per {args.new}-token round over {args.reps} reps, context {args.short} vs {args.long} tokens "
          f"({info.hidden_size} wide, {info.num_layers} layers, {dtype.name} cache):")
    for op in ops:
        s, lg = med["short"].get(op, 0.0), med["long"].get(op, 0.0)
        if max(s, lg) >= 0.05:
            print(f"  {op:24s} {s:8.2f} {lg:8.2f}  {lg - s:+8.2f}")
    w = {lab: float(np.median(v)) for lab, v in wall.items()}
    print(f"wall per round: {w['short']:.0f} ms at {args.short} tokens, {w['long']:.0f} ms at {args.long} "
          f"({w['long'] / w['short']:.3f}x)")
    report = {"benchmark": "llm_context_profile", "export": str(args.export), "reps": args.reps, "new_tokens": args.new,
              "context": {"short": args.short, "long": args.long}, "op_ms_median": med, "wall_ms": dict(wall),
              "threads": args.threads,
              "model": {"hidden": info.hidden_size, "layers": info.num_layers, "kv_dtype": dtype.name}}
    print(f"saved {save_result(report, args.out, f'llm_context_profile_h{info.hidden_size}x{info.num_layers}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
