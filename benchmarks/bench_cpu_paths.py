"""CPU paths side by side: per-round latency of the edac365 onnxruntime fp32 export vs every CPU path of the current
export vs plain OpenVINO fp32 on the old graphs, in one run, alternating, with mask IoU vs the research code.

    python benchmarks/bench_cpu_paths.py --old-export OLD --export NEW [--repeats 1] [--threads 2]

OLD is an export written by the code at commit edac365 (the release before the HIPIE graph rewrites). Run the
export from outside this repository: from its root, ``python -c`` imports this checkout's ``segllm_edge`` before
PYTHONPATH's (that is how an earlier OLD came out as a rewritten graph); the script refuses an OLD whose manifest
records a HIPIE graph variant:

    git worktree add /tmp/edac365 edac365 && cd /tmp
    PYTHONPATH=/tmp/edac365 python -c "import segllm_edge; assert segllm_edge.__file__.startswith('/tmp/edac365'); \\
        from segllm_edge.export.onnx_export import export_model; export_model('CKPT', 'OLD', drift_report=False)"

NEW is an export by this code (``segllm-edge export``) of the same golden-size checkpoint (tests/conftest.py:
tiny LLM and CLIP, full HIPIE-R50); ``--int8`` writes its INT8-FFN mask decoder first if it is missing.
Paths run in groups of --group-size models (memory), each group with its own edac365 onnxruntime fp32 base; in a
group each round of the golden conversation (tests/golden) is asked of every path in turn (the order rotates per
round), so machine load drifts hit all paths alike. Prints per-round medians, the speed-up
over edac365 onnxruntime fp32 and the final-mask IoU vs the research code's golden masks; saves JSON under
benchmarks/results/ with the CPU named. Reports, does not assert.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
             "Segment the object above instance 2.[REF:2]")  # tests/conftest.py GOLDEN_QUESTIONS


def golden_masks() -> list[np.ndarray]:
    data = np.load(GOLDEN / "rounds.npz")
    return [np.unpackbits(data[f"r{r}/final_mask_packed"]).astype(bool).reshape(1024, 1024) for r in (1, 2, 3)]


def old_export_variant(export: Path) -> str | None:
    """The HIPIE graph variant an export's manifest records (edac365 recorded none)."""
    from segllm_edge.contracts.manifest import MANIFEST_NAME

    manifest = json.loads((export / MANIFEST_NAME).read_text())
    return manifest.get("extra", {}).get("graphs", {}).get("mask_decoder", {}).get("variant")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-export", type=Path, required=True, help="export written by commit edac365")
    ap.add_argument("--export", type=Path, required=True, help="export written by this code")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--paths", default=None, help="comma list (default: all); see the output for names")
    ap.add_argument("--group-size", type=int, default=3, help="models loaded at once, the base included")
    ap.add_argument("--int8", action="store_true", help="write the INT8-FFN mask decoder if missing")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    from segllm_edge.contracts.manifest import MANIFEST_NAME

    for flag, folder in (("--old-export", args.old_export), ("--export", args.export)):
        if not (folder / MANIFEST_NAME).is_file():
            ap.error(f"{flag} {folder} is not an export folder (no {MANIFEST_NAME})")
    variant = old_export_variant(args.old_export)
    if variant:
        ap.error(f"--old-export {args.old_export} was not written by commit edac365: its mask decoder is the "
                 f"rewritten graph ({variant!r}); see the docstring for how to export with the edac365 code")

    import segllm_edge
    from segllm_edge.bench import machine_info, save_result
    from segllm_edge.cpu_bench import compare_paths, format_paths
    from segllm_edge.runtime.cpu_paths import available_cpu_paths, cpu_name, default_cpu_path

    if args.int8:
        from segllm_edge.export.hipie_quant import int8_path, quantize_hipie_int8

        if not int8_path(args.export / "mask_decoder.onnx").is_file():
            quantize_hipie_int8(args.export / "mask_decoder.onnx")
    kw = {"threads": args.threads} if args.threads else {}
    base = "edac365 onnxruntime-fp32"
    loaders = {base: lambda: segllm_edge.load(args.old_export, backend="onnxruntime", **kw),
               "edac365 openvino-fp32": lambda: segllm_edge.load(args.old_export, backend="openvino", **kw)}
    for p in available_cpu_paths(args.export):
        loaders[p.name] = (lambda p=p: p.load(args.export, **kw))
    default = default_cpu_path(args.export).name
    wanted = [n for n in (args.paths.split(",") if args.paths else loaders) if n != base]
    unknown = set(wanted) - set(loaders)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; available: {', '.join(loaders)}")
    # each group runs with its own edac365 onnxruntime-fp32 base, alternating round by round; groups of
    # --group-size models bound the memory (every loaded model holds its HIPIE graphs and their buffers)
    groups = [wanted[i:i + args.group_size - 1] for i in range(0, len(wanted), args.group_size - 1)]
    results = []
    for g in groups:
        models = {n: loaders[n]() for n in [base] + g}
        rep = compare_paths(models, GOLDEN / "shapes_a.png", QUESTIONS, repeats=args.repeats, base=base,
                            reference_masks=golden_masks(), progress=lambda m: print(m, flush=True))
        print(format_paths(rep, default), flush=True)
        results.append(rep)
        del models
        gc.collect()
    print(f"\nCPU: {cpu_name()}; load(export) default: {default}; reference = the research code's golden masks")
    for rep in results:
        print(format_paths(rep, default))
    report = {"cpu": cpu_name(), "machine": machine_info(), "old_export": str(args.old_export),
              "export": str(args.export), "default_path": default, "groups": results,
              "note": "golden-size checkpoint (tiny LLM/CLIP, full HIPIE-R50); one run per group, rounds "
                      "alternating across the group's paths, each group with its own edac365 onnxruntime-fp32 base"}
    slug = "".join(c if c.isalnum() else "-" for c in cpu_name()).strip("-")[:40]
    print(f"saved {save_result(report, args.results_dir, f'cpu_paths_{slug}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
