"""The drift report of a reduced-precision export: the same conversation on the fp32 graphs and on the
converted ones, compared round by round, and the accuracy guard computed from it.

The exporter does not import the runtime: it is handed a :class:`DriftProbe` (a loader, an image and
the questions) by its caller (``segllm-edge export`` builds one from ``segllm_edge.load``). A sanity
check never turns a good export into a failure: a round that cannot run (an empty mask upstream, a
reference it cannot resolve) is recorded as not compared, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SegLLMError
from ..pipeline.masks import mask_iou

GUARD_MIN_IOU = 0.9  # a compared round whose mask IoU vs fp32 falls below this fails the accuracy guard


@dataclass(frozen=True)
class DriftProbe:
    """What the drift report runs: ``load(folder)`` returns a model with ``.session(image, trace=True)``.
    ``reference_load`` loads the fp32 reference instead of ``load`` when set (a bf16 export runs on OpenVINO, its
    fp32 reference on onnxruntime, where the 7B-width probe's fp32 reference needs less memory); ``backends`` names the
    runtime of each side for the report. ``splits_llm``: the loaders take ``llm_layers_per_block=k`` and then run the
    llm graph block of k layers by block (one block's session at a time, where that side's runtime is onnxruntime:
    :mod:`segllm_edge.runtime.graph_blocks`), which the exporter asks for when the whole llm would not fit its
    budget."""
    load: Callable[[Path], Any]
    image: Any
    questions: tuple[str, ...]
    reference_load: Callable[[Path], Any] | None = None
    backends: dict | None = None   # {"export": ..., "fp32": ...}
    splits_llm: bool = False

    def for_reference(self) -> "DriftProbe":
        """The probe that runs the fp32 reference export."""
        return self if self.reference_load is None else replace(self, load=self.reference_load, reference_load=None)


@dataclass
class RoundOutcome:
    """One round of the probe conversation, reduced to numpy (the model can be freed after the run)."""
    mask: np.ndarray | None = None
    hidden: np.ndarray | None = None
    query_index: int | None = None
    error: str | None = None        # why the round could not run (its SegLLMError), None when it ran


def run_probe(probe: DriftProbe, folder: Path, llm_layers_per_block: int | None = None) -> list[RoundOutcome]:
    """Every question of the probe on the export in ``folder``. A round that raises a SegLLMError is
    recorded with its message and the conversation goes on (a failed round leaves the session as it was);
    a model that cannot even be loaded gives that error for every round. ``llm_layers_per_block``: passed to the
    loader of a probe that ``splits_llm`` (the llm run block by block)."""
    kwargs = {"llm_layers_per_block": llm_layers_per_block} if llm_layers_per_block and probe.splits_llm else {}
    try:
        session = probe.load(Path(folder), **kwargs).session(probe.image, trace=True)
    except SegLLMError as exc:
        return [RoundOutcome(error=f"cannot open the export: {exc}") for _ in probe.questions]
    out = []
    for q in probe.questions:
        try:
            r = session.ask(q)
        except SegLLMError as exc:
            out.append(RoundOutcome(error=str(exc)))
            continue
        out.append(RoundOutcome(mask=np.asarray(r.model_mask, dtype=bool),
                                hidden=np.asarray(r.trace["hidden"], dtype=np.float32), query_index=int(r.query_index)))
    return out


def compare_rounds(ref: list[RoundOutcome], got: list[RoundOutcome], precision: str) -> list[dict]:
    rounds = []
    for i, (a, b) in enumerate(zip(ref, got), 1):
        row: dict = {"round": i}
        if a.error is None and b.error is None:
            err = np.abs(a.hidden - b.hidden)
            row.update(compared=True, mask_iou_vs_fp32=mask_iou(a.mask, b.mask),
                       hidden_max_rel_err=float(err.max() / max(np.abs(a.hidden).max(), 1e-12)),
                       hidden_mean_rel_err=float(err.mean() / max(np.abs(a.hidden).mean(), 1e-12)),
                       same_query=a.query_index == b.query_index, empty_masks=[not a.mask.any(), not b.mask.any()])
        elif a.error is not None and b.error is not None:
            row.update(compared=False, mismatch=False, reason=f"neither run could answer it: {a.error}")
        else:
            side, err = ("fp32", a.error) if a.error is not None else (precision, b.error)
            row.update(compared=False, mismatch=True, reason=f"only the {side} run failed: {err}")
        rounds.append(row)
    return rounds


def guard(rounds: list[dict], min_iou: float = GUARD_MIN_IOU) -> dict:
    """passed: True / False, or None when no round could be compared (inconclusive, not a failure)."""
    compared = [r for r in rounds if r["compared"]]
    mismatched = [r["round"] for r in rounds if not r["compared"] and r.get("mismatch")]
    worst = min((r["mask_iou_vs_fp32"] for r in compared), default=None)
    if mismatched or (worst is not None and worst < min_iou):
        passed = False
    else:
        passed = True if compared else None
    return {"min_mask_iou": min_iou, "worst_mask_iou": worst, "compared_rounds": [r["round"] for r in compared],
            "mismatched_rounds": mismatched, "passed": passed}


def format_drift(report: dict) -> str:
    lines = [f"precision {report['precision']} (converted graphs: {', '.join(report['graphs'])})"]
    for r in report.get("rounds", []):
        if r["compared"]:
            empty = " (both masks empty)" if all(r.get("empty_masks", [])) else ""
            lines.append(f"  round {r['round']}: mask IoU vs fp32 {r['mask_iou_vs_fp32']:.4f}{empty}, hidden max rel "
                         f"err {r['hidden_max_rel_err']:.2e}, mean {r['hidden_mean_rel_err']:.2e}, "
                         f"same query {r['same_query']}")
        else:
            lines.append(f"  round {r['round']}: not compared ({r['reason']})")
    if report.get("probe_backends"):
        lines.append("  probe ran on " + ", ".join(f"{k}: {v}" for k, v in report["probe_backends"].items()))
    for side, plan in (report.get("probe_plan") or {}).items():
        how = (f"llm in {plan['llm_blocks']} blocks of {plan['llm_layers_per_block']} layers"
               if plan.get("llm_layers_per_block") else "llm whole")
        lines.append(f"  probe on the {side} side: {how}, largest session ~{plan['need_bytes'] / 2**30:.2f} GiB "
                     f"(estimated peak {plan['estimated_peak_bytes'] / 2**30:.2f} GiB)")
    if report.get("budget_bytes"):
        peak = max((p for p in report.get("peak_rss_bytes", {}).values() if p), default=None)
        if peak:
            lines.append(f"  peak RSS {peak / 2**30:.2f} GiB, budget {report['budget_bytes'] / 2**30:.2f} GiB "
                         f"(1.5 x on disk + 1 GiB): {'within' if report.get('within_budget') else 'OVER'}")
    if report.get("drift_skipped"):
        lines.append(f"  drift report not run: {report['drift_skipped']}")
    g = report.get("guard")
    if g:
        if g["passed"] is None:
            verdict = "inconclusive: no round could be compared"
        elif g["passed"]:
            verdict = f"passed (worst {g['worst_mask_iou']:.3f})"
        else:
            why = []
            if g["worst_mask_iou"] is not None and g["worst_mask_iou"] < g["min_mask_iou"]:
                why.append(f"worst mask IoU {g['worst_mask_iou']:.3f}")
            if g["mismatched_rounds"]:
                why.append(f"rounds {', '.join(map(str, g['mismatched_rounds']))} ran in only one of the two")
            verdict = f"FAILED ({'; '.join(why)}): do not deploy this precision without checking accuracy"
        lines.append(f"  accuracy guard (mask IoU >= {g['min_mask_iou']}): {verdict}")
    sizes = report["size_bytes"]
    fp32, q = sizes["fp32"], sizes[report["precision"]]
    for name in q:
        was = f"{fp32[name] / 1e6:.1f} MB → " if name in fp32 else ""
        lines.append(f"  {name}: {was}{q[name] / 1e6:.1f} MB")
    return "\n".join(lines)
