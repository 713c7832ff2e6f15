"""Where the conversation state and the weights live in a Triton server, measured: per-round cost over
Triton vs in-process at short and long context, and the server's memory (PSS) against the export's size.

    python benchmarks/bench_triton_state.py --export EXPORT_DIR [--reps 9] [--label after]

The server runs the code of the checkout this file is in (its root goes first on the stubs' sys.path),
so the same file measures another design: put it in a checkout of that design and run it from there.

One tritonserver on a repository generated from the export, and the same export in this process
(``segllm_edge.load(export, backend="onnxruntime")``). Four conversations on the golden image, two over
Triton and two in-process: ``A`` stays short (round 1 + one short round: ~300 tokens), ``B`` is grown to
~1,800 tokens by two long questions (filler text, counted with the export's tokenizer). Then ``--reps``
times, alternating: a short round (no reference) on Triton A, Triton B, local A, local B -- A before B on
even reps, B before A on odd ones (what ran just before a round changes its cost: in five runs, rounds after a
Triton round were slower than the same rounds after an in-process one in 15 of 20 comparisons, -16 to +90 ms,
so a fixed order, which put every Triton B round and no Triton A round after a Triton round, biased B/A; the
medians are also reported split by the side of the previous round). Per round, the
cost outside the mask decoder: Triton = client round trip - the server's ``mask_decoder`` call; local =
the round's wall time - its ``mask_decoder`` stage. Ratios: Triton/local at ~1,800 tokens (target
<= 1.3), Triton 1,800/300 (target <= 1.1). Memory: PSS summed over tritonserver and its stubs (and per
process), at ready and after the rounds (two live conversations), against the export's bytes on disk +
the conversations' state (as the in-process sessions report it for the same conversations; target
PSS <= 1.2 x export + state), after every rep (it grows by what the rounds add to the conversations' state:
their new tokens' KV, each round's masks and crop), and once both are closed (back near the ready figure: nothing
kept of a closed conversation). Rounds are noisy on
a shared machine: median and min of >= 7 reps, and a verdict line per target. Saved as JSON under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GOLDEN_IMAGE = ROOT / "tests" / "golden" / "shapes_a.png"
FIRST = "Segment the red circle."
SHORT = "Segment the blue square next to it."
FILLER = "the red circle is next to the blue square and above the green triangle, "


def _filler(tokenizer, tokens: int) -> str:
    """A question of about ``tokens`` tokens (within the limits: <= 1024 tokens, <= 8192 bytes)."""
    head, tail = "Segment the object described here: ", "which one is it?"
    reps = max(1, (tokens - tokenizer.count_tokens(head + tail)) // tokenizer.count_tokens(FILLER))
    while reps > 1 and tokenizer.count_tokens(head + FILLER * reps + tail) > min(tokens, 1000):
        reps -= 1
    return head + FILLER * reps + tail


def _per_process(procs) -> str:
    return ", ".join(f"{p['model']} {p['pss'] / 2**20:.0f} MiB" for p in procs)


def _arena_free_hipie(local, export: Path, threads) -> None:
    """The in-process model's HIPIE sessions without onnxruntime's CPU arena (the mask decoder's grows by GBs
    of activations; it is not what is measured here, and the server's need the room)."""
    import onnxruntime as ort

    for g in ("mask_backbone", "mask_decoder"):
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads = threads or os.cpu_count() or 1
        o.enable_cpu_mem_arena = False
        o.log_severity_level = 3
        path = export / local.backend.manifest.graphs[g].file
        local.backend.sessions[g] = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _export_bytes(export: Path) -> int:
    return sum(p.stat().st_size for p in export.rglob("*") if p.is_file())


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=12, help="alternating reps (even: A and B go first equally often)")
    ap.add_argument("--long-tokens", type=int, default=1800, help="context of conversation B")
    ap.add_argument("--label", default="", help="name of the design measured (part of the result file name)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads per model (default all cores)")
    ap.add_argument("--phased", action="store_true",
                    help="for a design whose server leaves no room for the in-process model beside it: the "
                         "in-process rounds first, alone, then the server's (the Triton/in-process ratio is then not "
                         "alternating; 300/1,800 on each side still is)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.reps < 2 or args.reps % 2:
        ap.error("--reps must be even (A and B go first equally often)")

    import segllm_edge
    from segllm_edge.client import connect
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.serving.pystub import default_sys_path
    from segllm_edge.serving.repository import describe_repository, generate_repository
    from segllm_edge.serving.tritonserver import TritonServer

    assert Path(segllm_edge.__file__).resolve().is_relative_to(ROOT), segllm_edge.__file__
    export = args.export.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="segllm-state-"))
    repo = generate_repository(export, tmp / "repo", max_conversations=4, idle_timeout_s=3600,
                               sys_path=[str(ROOT), *default_sys_path()], threads=args.threads)
    models = describe_repository(repo)
    image = GOLDEN_IMAGE.read_bytes()
    report: dict = {"benchmark": "triton_state", "label": args.label, "commit": _git("rev-parse", "HEAD"),
                    "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
                    "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                    "export": str(export), "export_bytes": _export_bytes(export), "models": models}
    info = open_export(export).info
    report["model"] = {"hidden": info.hidden_size, "layers": info.num_layers,
                       "kv_bytes_per_token": info.kv_bytes_per_token(4)}
    print(f"export {export}: {report['export_bytes'] / 2**30:.2f} GiB on disk; models {sorted(models)}", flush=True)

    sides = ("triton", "local")
    conv: dict = {}
    context: dict = {}
    rounds: dict[str, list] = {f"{s}_{c}": [] for s in sides for c in "AB"}
    stages: dict[str, list] = {k: [] for k in rounds}
    local = None

    last_round = [""]       # the key of the round that ran last (growth rounds included)

    def ask(key, q):
        t = time.perf_counter()
        r = conv[key].ask(q)
        wall = (time.perf_counter() - t) * 1e3
        last_round[0] = f"{key[0]}_{key[1]}"
        if key[0] == "local":
            context[key[1]] = r.context_tokens
            return wall - r.timings.get("mask_decoder", 0.0), r
        calls = getattr(r, "serving", {}).get("calls") or r.timings.get("calls", {})   # where the client puts them
        return wall - calls.get("mask_decoder", 0.0), r

    def open_local():
        nonlocal local
        t0 = time.perf_counter()
        local = segllm_edge.load(export, backend="onnxruntime", threads=args.threads)
        _arena_free_hipie(local, export, args.threads)
        report["local_load_s"] = time.perf_counter() - t0
        conv[("local", "A")], conv[("local", "B")] = local.session(GOLDEN_IMAGE), local.session(GOLDEN_IMAGE)

    fills: list[str] = []

    def grow(which):
        """A to ~300 tokens, B to ~long-tokens (the same questions on every side; planned on the first call,
        which includes the in-process side: its rounds report their context length)."""
        t0 = time.perf_counter()
        for side in which:
            ask((side, "A"), FIRST)
            ask((side, "B"), FIRST)
        if not fills:
            rest = args.long_tokens - context["B"] - 2 * 30
            fills.extend(_filler(local.backend.tokenizer, n) for n in [min(1000, rest)] + ([rest - 1000] if rest > 1000 else []))
        for q in fills:
            for side in which:
                ask((side, "B"), q)
        report.setdefault("grow_s", []).append(time.perf_counter() - t0)
        print(f"conversations grown in {report['grow_s'][-1]:.0f} s: A {context['A']} tokens, B {context['B']} tokens",
              flush=True)

    previous: dict[str, list] = {k: [] for k in rounds}

    def measure(which):
        for rep in range(args.reps):
            # the order of A and B flips every rep, so that each follows a Triton round and an in-process round
            # equally often (what ran just before a round changes its cost: see "by_previous")
            order = "AB" if rep % 2 == 0 else "BA"
            for key in [(side, c) for side in which for c in order]:
                before = last_round[0]
                ms, r = ask(key, SHORT)
                rounds[f"{key[0]}_{key[1]}"].append(ms)
                stages[f"{key[0]}_{key[1]}"].append({k: v for k, v in r.timings.items() if not isinstance(v, str)})
                previous[f"{key[0]}_{key[1]}"].append(before)
            pss = ""
            if "triton" in which:
                report.setdefault("pss_per_rep", []).append(server.memory()["pss"])
                report.setdefault("processes_per_rep", []).append(server.process_memory())
                pss = f", server PSS {report['pss_per_rep'][-1] / 2**30:.2f} GiB"
            print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in rounds.items() if v)
                  + f" (A {context['A']}, B {context['B']} tokens{pss})", flush=True)

    local_state = {}
    if args.phased:        # the in-process rounds first, alone; then the model is released for the server
        open_local()
        grow(("local",))
        measure(("local",))
        local_state = {c: conv.pop(("local", c)).state_bytes() for c in "AB"}
        local = None
        import gc

        gc.collect()
    server = TritonServer(repo, log_path=tmp / "tritonserver.log", ready_timeout=900)
    server.start()
    try:
        report["server_ready_s"] = server.wait_ready()
        time.sleep(2.0)
        report["memory_ready"] = server.memory()
        report["processes_ready"] = server.process_memory()
        print(f"server ready in {report['server_ready_s']:.0f} s; PSS {report['memory_ready']['pss'] / 2**30:.2f} GiB "
              f"({_per_process(report['processes_ready'])})", flush=True)
        client = connect(server.grpc_url, timeout_s=3600)
        conv[("triton", "A")], conv[("triton", "B")] = client.session(image), client.session(image)
        which = ("triton",) if args.phased else sides
        if not args.phased:
            open_local()
        grow(which)
        measure(which)
        time.sleep(2.0)
        report["memory_after"] = server.memory()
        report["processes_after"] = server.process_memory()
        if not args.phased:
            local_state = {c: conv[("local", c)].state_bytes() for c in "AB"}
        for key in [k for k in conv if k[0] == "triton"]:
            conv.pop(key).close()
        client.close()
        time.sleep(2.0)
        report["memory_closed"] = server.memory()     # what the conversations held goes back (no leak)
        report["processes_closed"] = server.process_memory()
        report["server_log_errors"] = server.errors()[:5]
    finally:
        server.stop()
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    low = {k: float(np.min(v)) for k, v in rounds.items()}
    report.update(phased=args.phased, round_ms_outside_mask_decoder=rounds, round_ms_median=med, round_ms_min=low,
                  round_stage_ms=stages, context_tokens=dict(context), previous_round=previous)
    by_previous: dict = {}
    for key, ms in rounds.items():
        for prev_side in sides:
            got = [m for m, p in zip(ms, previous[key]) if p.startswith(prev_side)]
            if got:
                by_previous.setdefault(key, {})[f"after_{prev_side}"] = {"median": float(np.median(got)), "n": len(got)}
    report["round_ms_by_previous_side"] = by_previous
    report["ratios"] = {
        "triton_over_local_at_long": med["triton_B"] / med["local_B"],
        "triton_over_local_at_short": med["triton_A"] / med["local_A"],
        "triton_long_over_short": med["triton_B"] / med["triton_A"],
        "local_long_over_short": med["local_B"] / med["local_A"],
    }
    state = local_state
    report["conversation_state_bytes"] = state
    total_state = sum(v for v in state.values() if v)
    pss = report["memory_after"]["pss"]
    report["pss_target_bytes"] = 1.2 * report["export_bytes"] + total_state
    report["pss_over_export"] = pss / report["export_bytes"]
    report["pss_within_target"] = pss <= report["pss_target_bytes"]

    report["ratios_of_min"] = {"triton_over_local_at_long": low["triton_B"] / low["local_B"],
                               "triton_long_over_short": low["triton_B"] / low["triton_A"],
                               "local_long_over_short": low["local_B"] / low["local_A"]}
    per_rep = report.get("pss_per_rep", [])
    report["pss_creep_bytes"] = per_rep[-1] - per_rep[0] if len(per_rep) > 1 else 0
    r = report["ratios"]
    for what, d in (("median", med), ("min", low)):
        print(f"round outside the mask decoder ({what} of {args.reps}): Triton {d['triton_A']:.0f} ms at "
              f"{context['A']} tokens, {d['triton_B']:.0f} ms at {context['B']}; in-process {d['local_A']:.0f} / "
              f"{d['local_B']:.0f} ms")
    print(f"Triton/in-process at {context['B']} tokens: {r['triton_over_local_at_long']:.2f}x (target <= 1.3); "
          f"Triton {context['B']}/{context['A']} tokens: {r['triton_long_over_short']:.2f}x (target <= 1.1); "
          f"in-process {r['local_long_over_short']:.2f}x")
    print(f"server PSS: ready {report['memory_ready']['pss'] / 2**30:.2f} GiB, after {pss / 2**30:.2f} GiB with 2 "
          f"conversations ({total_state / 2**20:.0f} MiB of state); export {report['export_bytes'] / 2**30:.2f} GiB: "
          f"{report['pss_over_export']:.2f}x (target <= 1.2x + state: {report['pss_within_target']})")
    print("after, per process: " + _per_process(report["processes_after"]))
    closed = report["memory_closed"]["pss"]
    print(f"server PSS after closing both conversations: {closed / 2**30:.2f} GiB ({(closed - report['memory_ready']['pss']) / 2**20:+.0f} MiB "
          f"vs ready; per process: {_per_process(report['processes_closed'])})")
    if per_rep:
        at_first, at_last = ({p["model"]: p["pss"] for p in report["processes_per_rep"][i]} for i in (0, -1))
        print(f"server PSS after rep 1: {per_rep[0] / 2**30:.2f} GiB, after rep {len(per_rep)}: "
              f"{per_rep[-1] / 2**30:.2f} GiB (creep {report['pss_creep_bytes'] / 2**20:+.0f} MiB; per process: "
              + ", ".join(f"{m} {(b - at_first.get(m, 0)) / 2**20:+.0f}" for m, b in at_last.items()) + ")")
    print("median by the side of the round just before: " + "; ".join(
        f"{k} " + ", ".join(f"{p} {d['median']:.0f} ms (n={d['n']})" for p, d in v.items()) for k, v in by_previous.items()))
    llm = {k: float(np.median([st.get("llm_prefill", np.nan) for st in v])) for k, v in stages.items() if v}
    report["llm_prefill_ms_median"] = llm
    print("llm_prefill stage (median): " + ", ".join(f"{k} {v:.0f} ms" for k, v in llm.items())
          + f"; Triton B/A {llm['triton_B'] / llm['triton_A']:.2f}x, in-process B/A {llm['local_B'] / llm['local_A']:.2f}x")
    m = report["ratios_of_min"]
    verdicts = {
        "triton_over_local": (r["triton_over_local_at_long"] <= 1.3, f"{r['triton_over_local_at_long']:.2f}x median, "
                              f"{m['triton_over_local_at_long']:.2f}x min (target <= 1.3x)"),
        "long_over_short": (r["triton_long_over_short"] <= 1.1, f"{r['triton_long_over_short']:.2f}x median, "
                            f"{m['triton_long_over_short']:.2f}x min (target <= 1.1x; in-process "
                            f"{r['local_long_over_short']:.2f}x / {m['local_long_over_short']:.2f}x)"),
        "pss": (report["pss_within_target"], f"{pss / 2**30:.2f} GiB <= {report['pss_target_bytes'] / 2**30:.2f} GiB "
                "(1.2x export + state)"),
    }
    report["verdicts"] = {k: bool(ok) for k, (ok, _) in verdicts.items()}
    for k, (ok, text) in verdicts.items():
        print(f"VERDICT {k}: {'met' if ok else 'NOT met'}: {text}")
    from segllm_edge.bench import save_result

    tag = f"triton_state_{args.label or 'run'}_h{info.hidden_size}x{info.num_layers}"
    print(f"saved {save_result(report, args.out, tag, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
