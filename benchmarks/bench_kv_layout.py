"""The llm step alone, concat vs in-place KV layout, side by side: per-round time at a short and a long context
and the process's PSS creep as the conversations grow.

    python benchmarks/bench_kv_layout.py --export CONCAT_EXPORT [--inplace INPLACE_EXPORT] [--reps 9]

Two llm sessions in one process: the export's (``concat``: ``present = Concat(past, new)``) and the same
graph in the in-place layout (``--inplace``, or converted into a temporary folder next to nothing: hard links +
one rewritten ``llm.onnx``). Two conversations per layout start from random caches at ``--short`` and
``--long`` tokens; then ``--reps`` times, alternating layout and conversation, one ``--new``-token round each
(the caches grow by it, as in a conversation): concat keeps each round's ``present.*`` arrays, in-place writes
into its :class:`~segllm_edge.runtime.kv_buffer.BufferKVCache`. Prints median ms per round, long/short per layout,
in-place/concat, and the PSS after every rep. Saved as JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _pss_mib() -> float:
    """This process's PSS in MiB (NaN where /proc has no smaps_rollup)."""
    from segllm_edge.process_memory import kib_field

    pss = kib_field("/proc/self/smaps_rollup", "Pss")
    return float("nan") if pss is None else pss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="an export in the concat layout")
    ap.add_argument("--inplace", type=Path, default=None, help="the same export in the in-place layout")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--short", type=int, default=300)
    ap.add_argument("--long", type=int, default=1655)
    ap.add_argument("--new", type=int, default=15, help="tokens per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=("concat", "inplace"), default=None,
                    help="run one layout alone (its PSS creep on its own; no ratios between layouts)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from segllm_edge.bench import save_result
    from segllm_edge.contracts import ort as ortc
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.contracts.manifest import KV_CONCAT, kv_names
    from segllm_edge.export.kv_inplace import convert_export
    from segllm_edge.runtime.kv_buffer import inplace_cache, run_llm_inplace

    concat = open_export(args.export)
    if concat.manifest.kv_layout != KV_CONCAT:
        raise SystemExit(f"{args.export} is not in the concat layout")
    inplace_dir = args.inplace or convert_export(args.export, Path(tempfile.mkdtemp(prefix="kv-inplace-")) / "e")
    inplace = open_export(inplace_dir)
    info = concat.info
    past, present = kv_names(info.num_layers)
    opts = ortc.session_options(args.threads)
    sess = {"concat": ortc.open_session(concat.graph_path("llm"), opts, ["CPUExecutionProvider"], "llm"),
            "inplace": ortc.open_session(inplace.graph_path("llm"), opts, ["CPUExecutionProvider"], "llm")}
    rng = np.random.default_rng(0)
    shape = (1, info.num_kv_heads, 0, info.head_dim)
    caches: dict = {}
    for c, n in (("short", args.short), ("long", args.long)):
        init = [rng.standard_normal((1, shape[1], n, shape[3])).astype(np.float32) for _ in past]
        caches["concat", c] = init
        buf = inplace_cache(info, np.float32)
        buf.reserve(n)
        for b, x in zip(buf.buffers, init):
            b[:, :, :n] = x
        buf.length = n
        caches["inplace", c] = buf
    emb = rng.standard_normal((1, args.new, info.hidden_size)).astype(np.float32)
    ms: dict = {k: [] for k in caches}
    pss = [_pss_mib()]
    if args.only:
        caches = {k: v for k, v in caches.items() if k[0] == args.only}
        ms = {k: [] for k in caches}
    for rep in range(args.reps):
        for key in caches:
            layout, _ = key
            t0 = time.perf_counter()
            if layout == "concat":
                out = sess[layout].run(None, {"inputs_embeds": emb, **dict(zip(past, caches[key]))})
                caches[key] = out[1:]
            else:
                run_llm_inplace(sess[layout], emb, caches[key], "inputs_embeds", past, "hidden_states", present)
            ms[key].append((time.perf_counter() - t0) * 1e3)
        pss.append(_pss_mib())
        print(f"rep {rep + 1}: " + ", ".join(f"{a}/{c} {v[-1]:.0f} ms" for (a, c), v in ms.items())
              + f"; PSS {pss[-1]:.0f} MiB", flush=True)
    med = {f"{a}_{c}": float(np.median(v[1:] if len(v) > 2 else v)) for (a, c), v in ms.items()}
    ctx = {"short": args.short + args.reps * args.new, "long": args.long + args.reps * args.new}
    layouts = sorted({a for a, _ in caches})
    ratios = {f"{a}_long_over_short": med[f"{a}_long"] / med[f"{a}_short"] for a in layouts}
    if len(layouts) == 2:
        ratios.update(inplace_over_concat_long=med["inplace_long"] / med["concat_long"],
                      inplace_over_concat_short=med["inplace_short"] / med["concat_short"])
    print(f"median ms per round (rep 1 left out), contexts ~{args.short}->{ctx['short']} and ~{args.long}->{ctx['long']}: "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print("ratios: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
          + f"; PSS rep 1 -> rep {args.reps}: {pss[-1] - pss[1]:+.0f} MiB ({' + '.join(layouts)} in this process)")
    report = {"benchmark": "kv_layout", "export": str(args.export), "inplace": str(inplace_dir), "reps": args.reps,
              "new_tokens": args.new, "context": ctx, "round_ms": {f"{a}_{c}": v for (a, c), v in ms.items()},
              "round_ms_median": med, "ratios": ratios, "pss_mib": pss,
              "model": {"hidden": info.hidden_size, "layers": info.num_layers}}
    tag = f"kv_layout{'_' + args.only if args.only else ''}_h{info.hidden_size}x{info.num_layers}"
    print(f"saved {save_result(report, args.out, tag, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
