"""The segllm model's metrics without Triton (the real server's are scraped in test_triton_serving), and the
Grafana dashboard's queries against the metric names."""
import json
import re
import threading
from pathlib import Path

from segllm_edge.errors import ImageError, ServerBusyError
from segllm_edge.serving.metrics import FAMILIES, STAGE_BUCKETS_S, ModelMetrics, parse_metrics, sample
from segllm_edge.serving.round_scheduler import RoundScheduler

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "segllm-dashboard.json"


def test_round_timings_go_to_the_stage_histograms_and_nothing_else():
    m = ModelMetrics("segllm")
    m.round_answered({"tokenize": 2.0, "llm_prefill": 300.0, "mask_decoder": 4000.0, "bls_total": 4400.0,
                      "state_save_ms": 3.0, "state_bytes": 123456, "calls": {"mask_decoder": 4000.0},
                      "invented_stage": 1.0})
    fam = m.families["round_stage"]
    got = {dict(k)["stage"]: v for k, v in fam.metrics.items()}
    assert set(got) == {"tokenize", "llm_prefill", "mask_decoder", "round", "state_save"}   # bytes are no seconds
    dec = got["mask_decoder"]
    assert dec.value() == 1 and abs(dec.sum - 4.0) < 1e-9
    assert dec.counts[STAGE_BUCKETS_S.index(5.0)] == 1                                     # 4 s: the le=5 bucket
    assert m.metric("rounds").value() == 1


def test_refusals_by_reason_and_code():
    m = ModelMetrics("segllm")
    for exc in (ImageError("x"), ImageError("y"), ServerBusyError("busy"), KeyError("bug")):
        m.refused(exc)
    fam = m.families["refused"]
    got = {(dict(k)["reason"], dict(k)["code"]): v.value() for k, v in fam.metrics.items()}
    assert got == {("ImageError", "INVALID_ARG"): 2, ("ServerBusyError", "UNAVAILABLE"): 1,
                   ("unexpected", "INTERNAL"): 1}


def test_scheduler_reports_running_and_queued():
    seen = []
    s = RoundScheduler(workers=1, max_pending_per_conversation=2, max_queued=4)
    s.on_change = lambda running, queued: seen.append((running, queued))
    go = threading.Event()
    s.submit("a", go.wait)
    s.submit("b", lambda: None)
    go.set()
    assert s.wait_idle(10)
    s.close()
    assert (1, 1) in seen and seen[-1] == (0, 0), seen


def test_parse_metrics():
    text = ('# HELP x y\n# TYPE segllm_rounds_total counter\nsegllm_rounds_total{model="segllm"} 3\n'
            'segllm_round_stage_seconds_bucket{model="segllm",stage="round",le="+Inf"} 2\nnv_up 1\n')
    got = parse_metrics(text)
    assert sample(got, "segllm_rounds_total", model="segllm") == 3
    assert sample(got, "segllm_round_stage_seconds_bucket", model="segllm", stage="round", le="+Inf") == 2
    assert sample(got, "nv_up") == 1 and sample(got, "absent") == 0


def test_grafana_dashboard_queries_published_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    names = {n for n, _, _ in FAMILIES.values()}
    published = names | {n + suffix for n, kind, _ in FAMILIES.values() if kind == "histogram"
                         for suffix in ("_bucket", "_sum", "_count")}
    used = {w for e in exprs for w in re.findall(r"\b(segllm_[a-z_]+)\b", e)}
    assert used and used <= published, used - published
    assert {n for n, kind, _ in FAMILIES.values() if kind != "histogram"} <= used | {"segllm_round_stage_seconds"}
