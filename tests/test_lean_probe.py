"""The drift report's probe with one graph resident at a time (runtime/lean_sessions.py): the same outcomes as with
every graph resident, and never two graph sessions alive together. Golden size, on the shared fp16 export."""
import weakref

import numpy as np
import pytest

import segllm_edge
from segllm_edge.api import SegLLM
from segllm_edge.contracts.manifest import Manifest
from segllm_edge.errors import BackendError
from segllm_edge.export.drift import DriftProbe, compare_rounds, run_probe
from segllm_edge.runtime import lean_sessions
from segllm_edge.contracts.ort import DISABLE_PREPACKING
from segllm_edge.runtime.lean_sessions import (OneGraphAtATime, OwnedOutputs, lean_session_options,
                                              load_lean)

from conftest import GOLDEN_QUESTIONS

QUESTIONS = GOLDEN_QUESTIONS[:1]


@pytest.fixture(scope="module")
def lean_run(golden_export_fp16, golden_image):
    """The probe on the fp16 export, lean, with every graph session it opens tracked while it is alive."""
    alive, most, backends = set(), [], []
    real = lean_sessions._ort_opener

    def tracking(export, device, threads):
        open_graph = real(export, device, threads)

        def opened(name):
            session = open_graph(name)
            alive.add(id(session))
            weakref.finalize(session, alive.discard, id(session))
            most.append(len(alive))
            return session
        return opened

    def load(folder):
        backends.append(load_lean(folder))
        return SegLLM(backends[-1])

    mp = pytest.MonkeyPatch()
    mp.setattr(lean_sessions, "_ort_opener", tracking)
    try:
        got = run_probe(DriftProbe(load, golden_image, QUESTIONS), golden_export_fp16)
    finally:
        mp.undo()
    return got, backends[0], alive, most


def test_lean_probe_gives_the_all_resident_report(lean_run, golden_export_fp16, golden_image):
    """Round for round the same outcomes (so compare_rounds writes the same report) as every graph resident with
    the lean sessions' options; and, with the package's default options (weights prepacked), the same masks up to a
    few pixels."""
    lean = lean_run[0]

    def resident_probe(**kwargs):
        return DriftProbe(lambda f: segllm_edge.load(f, backend="onnxruntime", **kwargs), golden_image, QUESTIONS)

    resident = run_probe(resident_probe(session_options=lean_session_options()), golden_export_fp16)
    assert [r.error for r in lean] == [r.error for r in resident] == [None]
    for a, b in zip(lean, resident):
        assert a.mask.any() and np.array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.hidden, b.hidden)
        assert a.query_index == b.query_index
    assert compare_rounds(resident, lean, "fp16") == compare_rounds(resident, resident, "fp16")
    prepacked = run_probe(segllm_edge.drift_probe(golden_image, QUESTIONS, lean=False), golden_export_fp16)
    (row,) = compare_rounds(prepacked, lean, "fp16")
    # prepacking changes the accumulation order, so the last bits of the hidden states; how far that carries through
    # the layers depends on the CPU's kernels (max rel err measured below 1e-4 on one AMD EPYC, 3.2e-4 on the CI's).
    # The bound is two fp16 ulps at the largest value (2 * 2**-10): an fp16 export cannot promise better, and a real
    # fault (a wrong weight, a dropped layer) is orders of magnitude above it. The masks stay within a few pixels
    # (measured 1 of ~130k flipped on the fast-v3 graph).
    print(f"\nprepacked vs lean: {row}")
    assert row["mask_iou_vs_fp32"] >= 0.999 and row["same_query"] and row["hidden_max_rel_err"] < 2 * 2**-10, row


def test_lean_sessions_skip_prepacking_and_keep_the_arena_shrinkage(lean_run):
    """The probe's sessions: no weight prepacking, a fresh SessionOptions each; the OwnedOutputs wrapper still gets
    the llm's prefill arena shrinkage (runtime/arena.llm_run_options looks through it)."""
    from segllm_edge.runtime.arena import llm_run_options

    backend = lean_run[1]
    session = backend.sessions["llm"]
    assert isinstance(session, OwnedOutputs)
    assert session.get_session_options().get_session_config_entry(DISABLE_PREPACKING) == "1"
    assert lean_session_options() is not lean_session_options()
    assert llm_run_options(session, 500) is not None and llm_run_options(session, 5) is None
    backend.sessions.close()


def test_lean_outputs_do_not_keep_a_closed_session_arena():
    """onnxruntime's outputs are views into the session's arena (they keep it alive after the session is closed);
    a lean session's outputs own their memory."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], np.float32)
    assert session.run(None, {"x": x})[0].base is not None  # what onnxruntime hands out
    (y,) = OwnedOutputs(session).run(None, {"x": x})
    assert y.base is None and y.flags.owndata and y.tolist() == [0.0, 2.0]


def test_lean_backend_holds_one_graph_session_at_a_time(lean_run, golden_export_fp16):
    _, backend, alive, most = lean_run
    graphs = set(Manifest.load(golden_export_fp16).graphs)
    assert set(backend.sessions.opened) == graphs and len(backend.sessions.opened) > len(graphs)  # it did switch
    assert max(most) == 1, f"graph sessions alive together: {most}"
    backend.sessions.close()
    assert not alive and backend.sessions.resident is None


def test_one_graph_at_a_time_opens_on_use_and_only_known_graphs():
    opened = []
    sessions = OneGraphAtATime(("a", "b"), lambda n: opened.append(n) or object())
    assert "a" in sessions and "c" not in sessions and not opened  # membership opens nothing
    first = sessions["a"]
    assert sessions["a"] is first and opened == ["a"]  # the resident graph is not opened again
    sessions["b"]
    assert sessions.resident == "b" and opened == ["a", "b"]
    with pytest.raises(KeyError):
        sessions["c"]


def test_lean_loading_names_the_backends_it_runs(golden_export_fp16):
    with pytest.raises(BackendError, match="onnxruntime or openvino"):
        load_lean(golden_export_fp16, backend="tensorrt")


def test_a_graph_that_does_not_fit_is_not_compared_before_anything_runs(golden_export_fp16, tmp_path, monkeypatch):
    import os
    import shutil

    from segllm_edge.export import reference

    folder = tmp_path / "fp16"
    shutil.copytree(golden_export_fp16, folder, copy_function=os.link)
    (folder / "drift_report.json").unlink()

    def never(*_):
        raise AssertionError("nothing may run when the largest graph does not fit")

    monkeypatch.setattr(reference, "available_memory", lambda: 2 ** 20)
    report = reference.drift_against_fp32(folder, Manifest.load(folder), DriftProbe(never, None, QUESTIONS), "", never)
    assert [r["compared"] for r in report["rounds"]] == [False] and report["guard"]["passed"] is None
    assert "graph needs" in report["rounds"][0]["reason"] and "0.0 GiB available" in report["rounds"][0]["reason"]
