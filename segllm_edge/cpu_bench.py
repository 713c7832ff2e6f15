"""CPU execution paths side by side: the same conversation on several loaded models, one round at a time across
all of them (the order rotates per round), so load drift on the machine hits every path alike.

Used by ``segllm-edge bench --export DIR`` (every available CPU path of an export) and by
``benchmarks/bench_cpu_paths.py`` (adds the edac365 graphs). Reports, does not assert.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from .errors import SegLLMError
from .pipeline.masks import mask_iou


def _iou(a, b) -> float:
    """Mask IoU; a round that produced no mask (it failed) scores 0."""
    return 0.0 if a is None or b is None else mask_iou(a, b)


def _median(x: list) -> float:
    return statistics.median(x) if x else float("nan")


def compare_paths(models: dict, image, questions, repeats: int = 1, base: str | None = None,
                  reference_masks: list | None = None, progress=None, warmup: int = 0) -> dict:
    """``models``: name → loaded model. Per path and round: median ms, mask_decoder ms, speed-up over ``base``
    (default: the first model), final-mask IoU vs ``reference_masks`` (if given) and vs ``base``.
    ``warmup``: first rounds asked of every model, unmeasured, before the measured conversations."""
    names = list(models)
    base = base or names[0]
    for _ in range(warmup):
        for n in names:
            models[n].session(image).ask(questions[0])
    ms = {n: [[] for _ in questions] for n in names}
    dec = {n: [[] for _ in questions] for n in names}
    masks = {n: [None] * len(questions) for n in names}
    errors = {n: [None] * len(questions) for n in names}   # why a path's round failed (its SegLLMError)
    for rep in range(repeats):
        sessions = {n: models[n].session(image) for n in names}
        for r, q in enumerate(questions):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t = time.perf_counter()
                try:   # e.g. a reduced path whose earlier round gave an empty mask this round refers to
                    res = sessions[n].ask(q)
                except SegLLMError as exc:
                    errors[n][r], masks[n][r] = str(exc), None
                    if progress:
                        progress(f"repeat {rep + 1} round {r + 1} {n}: failed: {exc}")
                    continue
                ms[n][r].append((time.perf_counter() - t) * 1e3)
                dec[n][r].append(res.timings.get("mask_decoder", 0.0))
                masks[n][r] = res.model_mask
                if progress:
                    progress(f"repeat {rep + 1} round {r + 1} {n}: {ms[n][r][-1]:.0f} ms")
        for s in sessions.values():
            s.close()
    rows = []
    base_med = [_median(x) for x in ms[base]]
    for n in names:
        med = [_median(x) for x in ms[n]]
        row = {"path": n, "median_ms_per_round": med,
               "mask_decoder_median_ms": [_median(x) for x in dec[n]],
               f"speedup_vs_{base}": [b / m for b, m in zip(base_med, med)],
               f"iou_vs_{base}": [_iou(a, b) for a, b in zip(masks[n], masks[base])], "runs_ms": ms[n],
               "errors": errors[n]}
        if reference_masks is not None:
            row["iou_vs_reference"] = [_iou(a, b) for a, b in zip(masks[n], reference_masks)]
        rows.append(row)
    return {"questions": list(questions), "repeats": repeats, "base": base, "paths": rows}


def format_paths(report: dict, default: str | None = None) -> str:
    base = report["base"]
    n = len(report["questions"])
    ref = "iou_vs_reference" in report["paths"][0]
    head = ["path"] + [f"round {i + 1} ms" for i in range(n)] + [f"x {base} (rounds 2..)"]
    head.append("mask IoU vs reference" if ref else f"mask IoU vs {base}")
    lines = [" | ".join(head)]
    for row in report["paths"]:
        tag = " (default)" if row["path"] == default else ""
        sp = row[f"speedup_vs_{base}"][1:] or row[f"speedup_vs_{base}"]
        ious = row["iou_vs_reference"] if ref else row[f"iou_vs_{base}"]
        lines.append(" | ".join([row["path"] + tag] + [f"{m:.0f}" for m in row["median_ms_per_round"]]
                                + [", ".join(f"{v:.2f}x" for v in sp), ", ".join(f"{v:.4f}" for v in ious)]))
    return "\n".join(lines)


def bench_export(export_dir, image, questions, repeats: int = 1, warmup: int = 1, progress=None) -> dict:
    """Every CPU path available for ``export_dir`` side by side (``segllm-edge bench --export`` without
    ``--backend``); speed-ups and mask IoU relative to exact onnxruntime fp32 where it is installed."""
    from .bench import machine_info
    from .runtime.cpu_paths import ORT_FP32, available_cpu_paths, cpu_name, default_cpu_path

    paths = available_cpu_paths(export_dir)
    models = {p.name: p.load(export_dir) for p in paths}
    base = ORT_FP32.name if ORT_FP32 in paths else paths[-1].name
    report = compare_paths(models, image, questions, repeats=repeats, base=base, progress=progress, warmup=warmup)
    report.update(cpu=cpu_name(), machine=machine_info(), export=str(export_dir),
                  default_path=default_cpu_path(export_dir).name)
    return report
