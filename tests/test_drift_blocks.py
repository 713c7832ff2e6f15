"""The drift report within the export's memory budget at any depth (issue 24, item 6): the llm graph run block of
decoder layers by block (runtime/graph_blocks.py) computes exactly what the whole graph computes, the exporter
plans the blocks from the budget, and a 7B's probe, skipped before for want of memory, now has a plan within it."""
import os
import shutil

import numpy as np
import pytest

import segllm_edge
from segllm_edge.contracts.export_folder import open_export
from segllm_edge.contracts.manifest import Manifest
from segllm_edge.export import reference
from segllm_edge.export.drift import format_drift
from segllm_edge.contracts import llm_blocks as graph_blocks
from segllm_edge.runtime.graph_blocks import BlockedSession

from conftest import DRIFT_TEST_QUESTIONS

GIB = 2 ** 30


def _llm_runs(folder, layers_per_block=None, rounds=(5, 3)):
    """The llm of ``folder`` over a two-call conversation (a prefill, then a round on its KV cache), whole or in
    blocks: [(hidden, presents)] per call, and the blocks (None whole)."""
    import onnxruntime as ort

    from segllm_edge.runtime.lean_sessions import OwnedOutputs, lean_session_options

    llm = folder / "llm.onnx"

    def open_session(path):
        return OwnedOutputs(ort.InferenceSession(str(path), lean_session_options(), providers=["CPUExecutionProvider"]))

    blocks = graph_blocks.split_llm(llm, layers_per_block) if layers_per_block else None
    session = BlockedSession(blocks, open_session) if blocks else open_session(llm)
    ins = session.get_inputs()
    kv = np.float16 if "float16" in ins[1].type else np.float32
    rng = np.random.default_rng(0)
    past = [np.zeros((1, i.shape[1], 0, i.shape[3]), kv) for i in ins[1:]]
    out = []
    for seq in rounds:
        feeds = {"inputs_embeds": rng.standard_normal((1, seq, ins[0].shape[2])).astype(np.float32)}
        feeds.update({i.name: p for i, p in zip(ins[1:], past)})
        hidden, *past = session.run(None, feeds)
        out.append((hidden, list(past)))
    return out, blocks


def test_the_llm_in_blocks_of_layers_is_the_whole_graph(golden_export):
    """fp32: layer by layer (one block's session at a time) the llm gives the whole graph's hidden states and KV
    cache bit for bit, over a prefill and a round on its cache; the blocks' folder goes with them."""
    whole, _ = _llm_runs(golden_export)
    n = open_export(golden_export).info.num_layers
    for k in range(1, n):
        blocked, blocks = _llm_runs(golden_export, k)
        assert blocks.plan()["blocks"] == -(-n // k) >= 2
        assert [s.layers for s in blocks.stages] == [(i, min(i + k, n) - 1) for i in range(0, n, k)]
        for (h, kv), (hb, kvb) in zip(whole, blocked):
            np.testing.assert_array_equal(h, hb)
            for a, b in zip(kv, kvb):
                np.testing.assert_array_equal(a, b)
    folder = blocks.folder
    assert folder.is_dir() and folder.parent == golden_export
    del blocks
    import gc

    gc.collect()
    assert not folder.exists(), "the blocks' folder goes with them"


def test_fp16_blocks_round_their_cut_tensors_to_fp16_and_nothing_else(golden_export_fp16):
    """fp16: the blocks hand the tensors that cross a cut over in the graph's fp16, where the whole graph's CPU
    session may keep them in fp32 (onnxruntime computes fp16 MatMuls in fp32 and drops the Cast pairs between
    them): the same graph, the same weights, a few fp16 roundings more. The hidden states and the cache agree to
    fp16 precision (the end-to-end masks: test_the_probe_runs_in_blocks_...)."""
    whole, _ = _llm_runs(golden_export_fp16)
    blocked, _ = _llm_runs(golden_export_fp16, 1)
    for (h, kv), (hb, kvb) in zip(whole, blocked):
        assert h.dtype == np.float32 and kv[0].dtype == np.float16
        assert np.abs(h - hb).max() <= 4e-3 * np.abs(h).max()
        np.testing.assert_array_equal(kv[0], kvb[0])   # layer 0's keys: before any cut
        for a, b in zip(kv, kvb):
            assert np.abs(a.astype(np.float32) - b).max() <= 8e-3 * np.abs(a.astype(np.float32)).max()


def test_blocks_hold_every_weight_once_and_cross_cuts_only_by_tensors(golden_export_fp16, tmp_path):
    import onnx

    llm = golden_export_fp16 / "llm.onnx"
    whole = onnx.load(str(llm), load_external_data=False)
    blocks = graph_blocks.split_llm(llm, 1, tmp_path)
    names = [t.name for s in blocks.stages for t in onnx.load(str(s.path), load_external_data=False).graph.initializer]
    big = {t.name for t in whole.graph.initializer if np.prod(t.dims) >= 64}
    assert big <= set(names) and all(names.count(w) == 1 for w in big), "each weight in exactly one block"
    assert sum(graph_blocks.llm_layer_weight_bytes(llm)) >= sum(s.weight_bytes for s in blocks.stages) * 0.99
    assert blocks.stages[-1].outputs[0] == "hidden_states"


def test_the_probe_runs_in_blocks_where_the_whole_llm_is_over_the_budget(golden_export, golden_export_fp16,
                                                                         golden_image, tmp_path, monkeypatch):
    """With a budget the whole llm's session would exceed (and a layer's fits), the exporter's drift report runs
    the llm in blocks on both sides and reports what the whole-graph report (the fixture's) says: the same rounds
    compared, the same queries, the masks and hidden-state errors to fp16 precision; its plan is within the budget,
    and the guard decides as before."""
    import json

    folder = tmp_path / "fp16"
    shutil.copytree(golden_export_fp16, folder, copy_function=os.link)
    whole = json.loads((folder / "drift_report.json").read_text())
    before = set(folder.iterdir())
    (folder / "drift_report.json").unlink()
    manifest = Manifest.load(folder)

    def fp32_reference(out):
        shutil.copytree(golden_export, out, copy_function=os.link)
        return Manifest.load(out)

    probe = segllm_edge.drift_probe(golden_image, DRIFT_TEST_QUESTIONS)
    assert probe.splits_llm
    layers = graph_blocks.llm_layer_weight_bytes(folder / "llm.onnx")
    llm_need = sum(layers) * reference.RUNTIME_EXPANSION["fp16"]
    budget = int(llm_need * 0.9)   # the whole fp16 llm does not fit it, its largest layer block does
    assert max(layers) * reference.RUNTIME_EXPANSION["fp16"] <= budget
    monkeypatch.setattr(reference, "resident_bytes", lambda: 0)
    monkeypatch.setattr(reference, "export_budget", lambda _folder: budget)
    blocked = reference.drift_against_fp32(folder, manifest, probe, "", fp32_reference)
    for side in ("export", "fp32"):
        plan = blocked["probe_plan"][side]
        assert plan["llm_layers_per_block"] == 1 and plan["llm_blocks"] == len(layers), plan
        assert plan["budget_bytes"] == budget
    assert blocked["probe_plan"]["export"]["llm_need_bytes"] < llm_need
    assert [r["compared"] for r in blocked["rounds"]] == [r["compared"] for r in whole["rounds"]] == [True, False]
    (b, _), (w, _) = blocked["rounds"], whole["rounds"]
    assert b["same_query"] == w["same_query"] and abs(b["mask_iou_vs_fp32"] - w["mask_iou_vs_fp32"]) <= 0.01
    assert b["hidden_max_rel_err"] <= 2 * w["hidden_max_rel_err"] + 4e-3
    assert blocked["rounds"][1] == whole["rounds"][1]
    assert blocked["guard"]["passed"] is True and blocked["guard"]["compared_rounds"] == [1]
    text = format_drift(blocked)
    assert "llm in 2 blocks of 1 layers" in text and "mask IoU vs fp32" in text and "hidden max rel err" in text
    assert set(folder.iterdir()) == before | {folder / "drift_report.json"}, "no stage files left in the export"
    # the guard still fails: the same blocked rounds against a stricter threshold
    from segllm_edge.export.drift import guard

    assert guard(blocked["rounds"], min_iou=1.01)["passed"] is False


def test_a_7b_probe_has_a_plan_within_its_budget(monkeypatch):
    """LLaVA-7B at fp16 (32 layers, 386 MiB per layer, 13.6 GiB on disk) on a 24 GB machine with 17 GB available:
    the whole llm (2.5 x 12.1 GiB) does not fit, so the probe used to be skipped; in blocks of layers its largest
    session fits the memory and the budget, on both sides (the fp32 reference: 772 MiB per layer)."""
    monkeypatch.setattr(reference, "available_memory", lambda: 17 * GIB)
    monkeypatch.setattr(reference, "resident_bytes", lambda: int(1.0 * GIB))
    mib = 2 ** 20
    layer = [134 * mib] + [404 * mib] * 30 + [674 * mib]   # as split_llm assigns nodes: attention, MLP of the last
    disk = sum(layer) + 2 * 600 * mib + 270 * mib + 130 * mib + 130 * mib   # llm, CLIP x2, seg head, HIPIE
    budget = int(reference.BUDGET_PER_DISK_BYTE * disk + reference.BUDGET_BASE_BYTES)
    sizes = {"llm": sum(layer), "vision_encoder": 600 * mib, "mask_encoder": 600 * mib, "seg_head": 130 * mib,
             "mask_backbone": 120 * mib, "mask_decoder": 134 * mib}
    per = {g: reference.RUNTIME_EXPANSION["fp16"] if g not in ("mask_backbone", "mask_decoder")
           else reference.SESSION_PEAK_PER_BYTE for g in sizes}
    assert not reference.fits(sizes["llm"] * per["llm"]), "the whole llm: skipped before"
    plan = reference.plan_side(sizes, per, layer, budget)
    assert plan["llm_layers_per_block"] and plan["within_budget"] and reference.fits(plan["need_bytes"]), plan
    ref_sizes = {g: b * (2 if g in per and g not in ("mask_backbone", "mask_decoder") else 1) for g, b in sizes.items()}
    ref = reference.plan_side(ref_sizes, {g: reference.SESSION_PEAK_PER_BYTE for g in sizes}, [2 * b for b in layer],
                              budget)
    assert ref["llm_layers_per_block"] and ref["within_budget"] and reference.fits(ref["need_bytes"]), ref
    # one layer per block is the floor: a budget below even that is reported as over, not silently met
    tight = reference.plan_side(sizes, per, layer, int(1.5 * GIB))
    assert tight["llm_layers_per_block"] == 1 and not tight["within_budget"]


def test_layers_per_block_fits_every_block():
    assert graph_blocks.layers_per_block_for([1, 1, 1, 1], 1.0, 4) == 4
    assert graph_blocks.layers_per_block_for([1, 1, 1, 3], 1.0, 4) == 3   # [1,1,1] [3]
    assert graph_blocks.layers_per_block_for([1, 3, 1, 1], 1.0, 4) == 2   # k=3 would give [1,3,1]
    assert graph_blocks.layers_per_block_for([5, 5], 1.0, 1) == 1


def test_force_removes_blocks_a_killed_probe_left(golden_export, tmp_path):
    from segllm_edge.export.onnx_export import export_files

    out = tmp_path / "fp32"
    shutil.copytree(golden_export, out, copy_function=os.link)
    blocks = graph_blocks.split_llm(out / "llm.onnx", 1)
    blocks._cleanup.detach()   # as if the process had been killed
    left = blocks.folder
    assert left.is_dir() and left.parent == out, list(out.iterdir())
    assert left in export_files(out)
