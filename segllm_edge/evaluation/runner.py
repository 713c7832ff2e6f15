"""Run an evaluation dataset through a loaded model: resumable, with bad annotations reported by name.

Per model, ``<out>/<label>/`` holds ``rounds.jsonl`` (one line per finished conversation: its round scores),
``problems.jsonl`` (items that could not be evaluated, with the reason) and ``metrics.json`` (per-round
gIoU / cIoU / P@0.5). An interrupted run resumes where it stopped: finished conversations are not re-run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import SegLLMError
from .datasets import AnnotationError, Conversation, decode_segmentation
from .metrics import RoundScore, aggregate, mask_box, score_round

ROUNDS_FILE, PROBLEMS_FILE, METRICS_FILE = "rounds.jsonl", "problems.jsonl", "metrics.json"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interruption: that item runs again
                continue
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _ground_truth(conv: Conversation) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image (HxWx3 uint8) and every round's mask, all checked before the model runs."""
    from ..pipeline.images import load_image

    if not conv.image.is_file():
        raise AnnotationError(f"image {conv.image} does not exist")
    try:
        rgb = load_image(conv.image)
    except SegLLMError as exc:
        raise AnnotationError(str(exc)) from None
    h, w = rgb.shape[:2]
    return rgb, [decode_segmentation(r.segmentation, h, w, conv.image.parent, what=f"round {i}")
                 for i, r in enumerate(conv.rounds, 1)]


def evaluate_conversation(model, conv: Conversation) -> list[RoundScore]:
    """Scores of every round. A round the model cannot run (it refers to a round whose predicted mask is
    empty) scores 0: the research code's accounting of a miss."""
    rgb, gts = _ground_truth(conv)
    session = model.session(rgb)
    scores = []
    for i, (rd, gt) in enumerate(zip(conv.rounds, gts), 1):
        try:
            res = session.ask(rd.question, refs=list(rd.refs) or None)
            scores.append(score_round(i, res.mask, gt, res.box, rd.box or mask_box(gt)))
        except SegLLMError:
            scores.append(score_round(i, np.zeros_like(gt), gt, None, rd.box or mask_box(gt)))
    return scores


def run_eval(model, items: list[Conversation], out_dir, problems=(), progress: bool = True,
             desc: str = "eval") -> dict:
    """Evaluate ``items`` (skipping those already in ``out_dir``); returns and writes the metrics."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds_f, problems_f = out / ROUNDS_FILE, out / PROBLEMS_FILE
    done = {r["id"] for r in _read_jsonl(rounds_f)} | {r["id"] for r in _read_jsonl(problems_f)}
    todo = [c for c in items if c.id not in done]
    for name, reason in problems:
        if name not in done:
            _append(problems_f, {"id": name, "error": reason})
    for conv in tqdm(todo, desc=desc, unit="conv", disable=not progress):
        try:
            scores = evaluate_conversation(model, conv)
        except AnnotationError as exc:
            _append(problems_f, {"id": conv.id, "error": str(exc)})
            continue
        _append(rounds_f, {"id": conv.id, "scores": [s.to_dict() for s in scores]})
    return summarize(out)


def summarize(out_dir) -> dict:
    out = Path(out_dir)
    rows = _read_jsonl(out / ROUNDS_FILE)
    scores = [RoundScore(**s) for r in rows for s in r["scores"]]
    metrics = {"conversations": len(rows), "problems": _read_jsonl(out / PROBLEMS_FILE),
               "rounds": [m.to_dict() for m in aggregate(scores)]}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


def compare_table(results: dict[str, dict]) -> str:
    """Per-round gIoU / cIoU / P@0.5 side by side, one column group per model (precision)."""
    labels = list(results)
    rounds = sorted({r["round"] for m in results.values() for r in m["rounds"]})
    head = "round " + "".join(f"| {lab[:20]:^20s} " for lab in labels)
    sub = "      " + "| gIoU   cIoU   P@0.5  " * len(labels)
    lines = [head, sub]
    for rnd in rounds:
        cells = []
        for lab in labels:
            r = next((x for x in results[lab]["rounds"] if x["round"] == rnd), None)
            cells.append("| " + (f"{r['gIoU']:.3f}  {r['cIoU']:.3f}  {r['P@0.5']:.3f}  " if r else f"{'-':^21s} "))
        lines.append(f"{rnd:5d} " + "".join(cells))
    lines.append("items " + "".join("| " + f"{m['conversations']} conv, {len(m['problems'])} bad".ljust(20) + " "
                                       for m in results.values()))
    return "\n".join(lines)


def plot(results: dict[str, dict], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for lab, m in results.items():
        xs = [r["round"] for r in m["rounds"]]
        for ax, key in zip(axes, ("gIoU", "cIoU", "P@0.5")):
            ax.plot(xs, [r[key] for r in m["rounds"]], marker="o", label=lab)
            ax.set_title(key)
            ax.set_xlabel("round")
            ax.set_ylim(0, 1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
