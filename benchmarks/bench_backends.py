"""torch vs onnxruntime, per stage and per round, measured side by side in one run.

    python benchmarks/bench_backends.py [--checkpoint DIR] [--export DIR] [--rounds 3] [--repeats 2]

Without --checkpoint a golden-size tiny checkpoint is built (tiny LLM/CLIP, full HIPIE-R50); sizes can be
changed with --hidden/--layers. Without --export the checkpoint is exported to a temporary folder.
Both backends run the same conversations, interleaved per repeat; prints medians and ort/torch ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import segllm_edge
from segllm_edge.bench import machine_info, save_result, scripted_questions
from segllm_edge.contracts.demo import demo_image
from segllm_edge.runtime.profiler import STAGES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="segllm-bench-"))
    ckpt = args.checkpoint
    if ckpt is None:
        from segllm_edge.tiny import TinySizes, make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(tmp / "ckpt", TinySizes(hidden=args.hidden, layers=args.layers,
                                                            heads=max(1, args.hidden // 32),
                                                            intermediate=2 * args.hidden))
    export = args.export
    if export is None:
        from segllm_edge.export.onnx_export import export_model

        export = tmp / "export"
        export_model(ckpt, export)
    models = {"torch": segllm_edge.load(ckpt), "onnxruntime": segllm_edge.load(export, backend="onnxruntime")}
    questions = scripted_questions(args.rounds)
    runs = {k: [] for k in models}
    for rep in range(args.repeats + 1):  # first pass is warm-up
        for name, model in models.items():
            s = model.session(demo_image())
            rounds = [dict(s.ask(q).timings) for q in questions]
            if rep:
                runs[name].append(rounds)
    report = {"machine": machine_info(), "checkpoint": str(ckpt), "export": str(export), "questions": questions,
              "repeats": args.repeats, "per_round": []}
    print(f"{'round':>5} {'stage':>15} {'torch ms':>10} {'ort ms':>10} {'ort/torch':>9}")
    for i in range(args.rounds):
        row = {"round": i + 1, "stages": {}}
        for stage in (*STAGES, "total"):
            vals = {}
            for name in models:
                xs = [sum(r[i].values()) if stage == "total" else r[i].get(stage) for r in runs[name]]
                xs = [x for x in xs if x is not None]
                if xs:
                    vals[name] = statistics.median(xs)
            if len(vals) == 2:
                ratio = vals["onnxruntime"] / vals["torch"] if vals["torch"] > 0 else float("nan")
                row["stages"][stage] = {**vals, "ort_over_torch": ratio}
                print(f"{i + 1:>5} {stage:>15} {vals['torch']:>10.1f} {vals['onnxruntime']:>10.1f} {ratio:>9.2f}")
        report["per_round"].append(row)
    info = models["torch"].info
    saved = save_result(report, args.results_dir, f"backends_torch_vs_ort_h{info.hidden_size}x{info.num_layers}")
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
