"""Per-round, per-stage wall time (and, where the backend reports it, memory)."""
from __future__ import annotations

import csv
import io
import json
import time
from contextlib import contextmanager

# The stages of one round, in pipeline order; a round records those it ran.
STAGES = (
    "preprocess",      # image decode + CLIP/HIPIE preprocessing (round 1, or every round without reuse)
    "tokenize",
    "vision_encoder",
    "mask_encoder",    # CLIP on referenced masked crops + box encoder
    "llm_prefill",
    "seg_head",
    "mask_backbone",
    "mask_decoder",
    "postprocess",     # selection (NMS, top-k) + mask upsampling + mapping to the original image
    "crop",            # masked crop for later rounds
)


class StageTimer:
    """Collects milliseconds per stage for one round; stages may repeat (times add up)."""

    def __init__(self, sync=None):
        self.ms: dict[str, float] = {}
        self._sync = sync  # e.g. torch.cuda.synchronize on GPU backends

    @contextmanager
    def stage(self, name: str):
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def total(self) -> float:
        return sum(self.ms.values())


def timings_table(rows: list[dict[str, float]], title: str = "") -> str:
    """Rounds as rows, stages as columns (ms), plus a total column."""
    used = [s for s in STAGES if any(s in r for r in rows)]
    used += sorted({k for r in rows for k in r} - set(used))
    head = ["round"] + used + ["total"]
    lines = [title] if title else []
    widths = [max(len(h), 8) for h in head]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for i, r in enumerate(rows, 1):
        cells = [str(i)] + [f"{r[s]:.1f}" if s in r else "-" for s in used] + [f"{sum(r.values()):.1f}"]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def timings_json(rows: list[dict[str, float]]) -> str:
    return json.dumps([{"round": i, **r, "total": sum(r.values())} for i, r in enumerate(rows, 1)], indent=1)


def timings_csv(rows: list[dict[str, float]]) -> str:
    used = [s for s in STAGES if any(s in r for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["round", *used, "total"])
    for i, r in enumerate(rows, 1):
        w.writerow([i, *[f"{r.get(s, 0.0):.3f}" for s in used], f"{sum(r.values()):.3f}"])
    return buf.getvalue()
