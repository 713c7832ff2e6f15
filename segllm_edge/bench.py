"""Per-round latency benchmark: the caching runtime against the research code's recompute-everything loop.

Both modes run in the same process, interleaved per repeat, on the same model and image, so
the ratios printed are measured side by side. Not a test: it reports, it does not assert.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .runtime.profiler import STAGES

FIRST_QUESTION = "Segment the red circle."
FOLLOW_UPS = (
    "Segment the blue square next to instance {k}.",
    "Segment the object above instance {k}.",
    "Segment the shape left of instance {k}.",
    "Segment the largest object near instance {k}.",
)


def scripted_questions(rounds: int) -> list[str]:
    """Round 1 plus follow-ups that each refer to an earlier round (alternating the last and the first)."""
    qs = [FIRST_QUESTION]
    for n in range(2, rounds + 1):
        k = n - 1 if n % 2 == 0 else max(1, n - 2)
        qs.append(FOLLOW_UPS[(n - 2) % len(FOLLOW_UPS)].format(k=k) + f"[REF:{k}]")
    return qs


@dataclass
class ModeResult:
    mode: str
    runs: list[list[dict[str, float]]] = field(default_factory=list)  # repeat → round → stage ms
    memory: list[dict[str, int]] = field(default_factory=list)        # per round, last repeat

    def per_round(self) -> list[dict]:
        n = len(self.runs[0])
        out = []
        for i in range(n):
            totals = [sum(run[i].values()) for run in self.runs]
            stages = {s: statistics.median(run[i].get(s, 0.0) for run in self.runs)
                      for s in STAGES if any(s in run[i] for run in self.runs)}
            out.append({"round": i + 1, "median_ms": statistics.median(totals), "min_ms": min(totals),
                        "max_ms": max(totals), "stages_ms": stages,
                        "memory": self.memory[i] if i < len(self.memory) else {}})
        return out


def run_benchmark(model, image, rounds: int = 8, repeats: int = 3, warmup: int = 1,
                  modes: tuple[str, ...] = ("reuse", "no_reuse"), progress=None) -> dict:
    questions = scripted_questions(rounds)
    results = {m: ModeResult(m) for m in modes}
    total = (warmup + repeats) * len(modes)
    step = 0
    for rep in range(warmup + repeats):
        for m in modes:  # interleaved so drift in machine load hits both modes alike
            s = model.session(image, reuse=(m == "reuse"))
            run, mem = [], []
            for q in questions:
                r = s.ask(q)
                run.append(dict(r.timings))
                mem.append(dict(r.memory))
            s.close()
            if rep >= warmup:
                results[m].runs.append(run)
                results[m].memory = mem
            step += 1
            if progress:
                progress(step, total, m)
    report = {"questions": questions, "rounds": rounds, "repeats": repeats, "warmup": warmup,
              "modes": {m: r.per_round() for m, r in results.items()}}
    if "reuse" in results and "no_reuse" in results:
        a, b = report["modes"]["reuse"], report["modes"]["no_reuse"]
        report["speedup_no_reuse_over_reuse"] = [round(y["median_ms"] / x["median_ms"], 3) for x, y in zip(a, b)]
    if "reuse" in results and rounds >= 2:
        a = report["modes"]["reuse"]
        report["flatness_round_n_over_round_2"] = [round(x["median_ms"] / a[1]["median_ms"], 3) for x in a]
    return report


def machine_info() -> dict:
    info = {"machine": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:  # torch is optional (an install with only [cpu] runs exports)
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def format_report(report: dict) -> str:
    lines = []
    modes = report["modes"]
    names = list(modes)
    head = ["round"] + [f"{m} median ms (min-max)" for m in names]
    if "speedup_no_reuse_over_reuse" in report:
        head.append("no_reuse/reuse")
    if "flatness_round_n_over_round_2" in report:
        head.append("reuse round/round2")
    lines.append(" | ".join(head))
    for i in range(report["rounds"]):
        cells = [str(i + 1)]
        for m in names:
            x = modes[m][i]
            cells.append(f"{x['median_ms']:.1f} ({x['min_ms']:.1f}-{x['max_ms']:.1f})")
        if "speedup_no_reuse_over_reuse" in report:
            cells.append(f"{report['speedup_no_reuse_over_reuse'][i]:.2f}x")
        if "flatness_round_n_over_round_2" in report:
            cells.append(f"{report['flatness_round_n_over_round_2'][i]:.2f}")
        lines.append(" | ".join(cells))
    for m in names:
        stages = [s for s in STAGES if any(s in x["stages_ms"] for x in modes[m])]
        lines.append(f"\n{m}: median ms per stage")
        lines.append("round | " + " | ".join(stages))
        for x in modes[m]:
            lines.append(f"{x['round']} | " + " | ".join(f"{x['stages_ms'].get(s, 0.0):.1f}" for s in stages))
    return "\n".join(lines)


def plot_report(report: dict, out: Path) -> None:
    """Stacked per-stage bars per round, one panel per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from .errors import BackendError

        raise BackendError(f"--plot needs matplotlib (pip install 'segllm-edge[bench]'): {exc}") from None
    modes = report["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True, squeeze=False)
    for ax, (m, rows) in zip(axes[0], modes.items()):
        stages = [s for s in STAGES if any(s in x["stages_ms"] for x in rows)]
        bottom = [0.0] * len(rows)
        xs = [x["round"] for x in rows]
        for s in stages:
            vals = [x["stages_ms"].get(s, 0.0) for x in rows]
            ax.bar(xs, vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(m)
        ax.set_xlabel("round")
        ax.set_xticks(xs)
    axes[0][0].set_ylabel("median latency (ms)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(report.get("title", "per-round latency by stage"))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def save_result(report: dict, results_dir: Path, tag: str, default=None) -> Path:
    """``report`` as ``results_dir/<stamp>_<tag>.json`` (``default``: json.dumps's, for values it cannot write)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p = results_dir / f"{stamp}_{tag}.json"
    p.write_text(json.dumps(report, indent=1, default=default))
    return p
