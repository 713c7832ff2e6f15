"""A prefill's onnxruntime arena growth is given back (runtime/arena.py), in-process and in the BLS."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def _record_runs(session) -> list:
    """Record the run options of every call of the real session (it still runs)."""
    seen, real = [], session.run

    def run(outputs, feeds, run_options=None):
        seen.append(run_options)
        return real(outputs, feeds, run_options)

    session.run = run
    return seen


def _shrinks(opts) -> bool:
    from segllm_edge.runtime.arena import ARENA_SHRINKAGE

    return opts is not None and opts.get_run_config_entry(ARENA_SHRINKAGE) == "cpu:0"


@pytest.mark.parametrize("where", ["in-process", "bls"])
def test_prefill_gives_back_the_arena_short_rounds_keep_it(golden_export, where):
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.arena import PREFILL_TOKENS

    export = open_export(golden_export)
    if where == "in-process":
        from segllm_edge.runtime.ort_backend import OrtBackend

        backend = OrtBackend.from_export(golden_export, threads=1)
        session = backend.sessions["llm"]
    else:
        from segllm_edge.serving.bls import TritonBlsBackend
        from segllm_edge.serving.bls_graphs import BlsGraphs

        backend = TritonBlsBackend(golden_export, call=None, local=BlsGraphs(export, threads=1))
        session = backend.local.sessions["llm"]
    seen = _record_runs(session)
    rng = np.random.default_rng(0)
    H = export.info.hidden_size
    cache = backend.new_cache()
    long_emb = rng.standard_normal((1, PREFILL_TOKENS + 36, H)).astype(np.float32)
    short_emb = rng.standard_normal((1, 5, H)).astype(np.float32)
    h1 = backend.llm(long_emb, cache)
    h2 = backend.llm(short_emb, cache)
    assert [_shrinks(o) for o in seen] == [True, False]
    assert cache.length == PREFILL_TOKENS + 41
    # the same values as runs without the option
    plain = backend.new_cache()
    feeds = {session.get_inputs()[0].name: long_emb, **dict(zip([i.name for i in session.get_inputs()[1:]],
                                                                 plain.arrays))}
    np.testing.assert_array_equal(session.run(None, feeds)[0], h1)
    assert h2.shape == (1, 5, H)


def test_no_run_options_for_other_engines():
    from segllm_edge.runtime.arena import llm_run_options

    assert llm_run_options(object(), 10_000) is None      # e.g. the OpenVINO stand-in session


def test_a_session_without_an_arena_gets_no_shrink_option(golden_export):
    """onnxruntime rejects the shrink option on a session without a CPU arena: a user's SessionOptions with the
    arena off must still run prefills."""
    import onnxruntime as ort

    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.arena import PREFILL_TOKENS, llm_run_options

    export = open_export(golden_export)
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    path = golden_export / export.manifest.graphs["llm"].file
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert llm_run_options(session, PREFILL_TOKENS + 1) is None
    with_arena = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert llm_run_options(with_arena, PREFILL_TOKENS + 1) is not None
