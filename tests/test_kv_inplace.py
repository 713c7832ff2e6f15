"""The llm graph in the in-place KV layout (export/kv_inplace.py, runtime/kv_buffer.py): the same outputs as the
concat graph, the cache grown in place (no copy of the past per round), rollback, durable state, the BLS path,
and the backends that cannot run it saying so."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GOLDEN_QUESTIONS


@pytest.fixture(scope="module")
def inplace_export(golden_export, tmp_path_factory):
    """The golden export converted by the CLI (other files hard-linked, the llm rewritten)."""
    from click.testing import CliRunner

    from segllm_edge.cli import main

    out = tmp_path_factory.mktemp("kv_inplace") / "fp32"
    res = CliRunner().invoke(main, ["convert-kv-inplace", str(golden_export), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "in-place KV layout" in res.output
    return out


def _backends(golden_export, inplace_export):
    from segllm_edge.runtime.ort_backend import OrtBackend

    return OrtBackend.from_export(golden_export, threads=1), OrtBackend.from_export(inplace_export, threads=1)


def test_manifest_records_the_layout_and_old_exports_read_as_concat(golden_export, inplace_export, tmp_path):
    from segllm_edge.contracts.manifest import KV_CONCAT, KV_INPLACE, PAST_LENGTH, Manifest
    from segllm_edge.errors import CheckpointError
    from segllm_edge.export.kv_inplace import convert_export

    old, new = Manifest.load(golden_export), Manifest.load(inplace_export)
    assert old.kv_layout == KV_CONCAT and new.kv_layout == KV_INPLACE
    assert [t.name for t in new.graphs["llm"].inputs][-1] == PAST_LENGTH
    assert new.graphs["llm"].inputs[1].shape[2] == "capacity"
    d = json.loads((golden_export / "manifest.json").read_text())
    d.pop("kv_layout", None)                      # a manifest written before the field existed
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    assert Manifest.load(tmp_path).kv_layout == KV_CONCAT
    d["kv_layout"] = "paged"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="kv_layout 'paged'"):
        Manifest.load(tmp_path)
    with pytest.raises(CheckpointError, match="already has the in-place"):
        convert_export(inplace_export, tmp_path / "again")
    from segllm_edge.export.onnx_export import export_model

    with pytest.raises(CheckpointError, match="unknown kv_layout"):
        export_model(tmp_path / "no-checkpoint", tmp_path / "out", kv_layout="paged", progress=False)
    import onnx

    g = onnx.load(str(inplace_export / "llm.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    assert "GroupQueryAttention" in ops and not ops & {"IsNaN", "Softmax"}
    assert not any(n.op_type == "Concat" and n.output[0].startswith("present.") for n in g.node)


def test_rounds_equal_the_concat_graph_and_grow_in_place(golden_export, inplace_export):
    """Hidden states of the in-place graph equal the concat graph's round after round; within capacity the
    buffers stay where they are (nothing copies the past), growth keeps the valid part; crop only shortens."""
    from segllm_edge.runtime import kv_buffer

    old, new = _backends(golden_export, inplace_export)
    co, cn = old.new_cache(), new.new_cache()
    assert isinstance(cn, kv_buffer.BufferKVCache) and cn.length == 0 and cn.capacity == 0
    rng = np.random.default_rng(3)
    H = new.info.hidden_size
    ptrs = None
    for n in (20, 7, 1, 9):
        emb = rng.standard_normal((1, n, H)).astype(np.float32)
        np.testing.assert_allclose(new.llm(emb, cn), old.llm(emb, co), rtol=1e-4, atol=1e-5)
        assert cn.length == co.length and cn.capacity == kv_buffer.BLOCK
        if ptrs is not None:
            assert cn.data_pointers() == ptrs        # written in place: the same buffers every round
        ptrs = cn.data_pointers()
        for a, b in zip(cn.views(), co.arrays):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    cn.crop(20)
    co.crop(20)                                      # rollback: only the length
    assert cn.data_pointers() == ptrs and cn.capacity == kv_buffer.BLOCK
    emb = rng.standard_normal((1, kv_buffer.BLOCK, H)).astype(np.float32)   # does not fit: grows once
    np.testing.assert_allclose(new.llm(emb, cn), old.llm(emb, co), rtol=1e-4, atol=1e-5)
    assert cn.length == 20 + kv_buffer.BLOCK and cn.capacity == 2 * kv_buffer.BLOCK and cn.grown == 2
    assert cn.nbytes() == 2 * cn.capacity * new.info.kv_bytes_per_token(4) // 2
    assert cn.valid_bytes() == co.nbytes()
    emb = rng.standard_normal((1, 3, H)).astype(np.float32)
    np.testing.assert_allclose(new.llm(emb, cn), old.llm(emb, co), rtol=1e-4, atol=1e-5)


def test_capacity_never_grows_past_the_context_unless_needed():
    from segllm_edge.runtime.kv_buffer import BufferKVCache

    c = BufferKVCache(1, 2, 4, max_tokens=600)
    for total, cap in ((10, 256), (300, 512), (520, 600), (600, 600)):
        c.reserve(total)
        c.length = total
        assert c.capacity == cap
    c.buffers[0][:, :, :600] = 1.0
    c.reserve(700)                                    # past the context (a caller that checks none): still room
    assert c.capacity >= 700 and float(c.buffers[0][:, :, :600].min()) == 1.0


def _region_of(array):
    """The memory map an array's data lies in (None if it is not in one)."""
    import mmap

    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    obj = base.obj if isinstance(base, memoryview) else base
    return obj if isinstance(obj, mmap.mmap) else None


def test_growth_returns_the_old_buffers_to_the_system():
    """Each host buffer is a memory map of its own, unmapped once a growth replaced it (from the C heap, the freed
    buffers stayed resident in the server's PSS: glibc keeps blocks under its dynamic mmap threshold)."""
    import gc
    import weakref

    from segllm_edge.runtime.kv_buffer import BufferKVCache

    c = BufferKVCache(2, 4, 64, max_tokens=2048)
    c.reserve(200)
    for i in range(len(c.buffers)):
        c.buffers[i][:, :, :200] = 2.0
    c.length = 200
    regions = [_region_of(b) for b in c.buffers]
    assert all(r is not None for r in regions), "host KV buffers are not memory maps of their own"
    gone = [weakref.ref(r) for r in regions]
    del regions
    c.reserve(300)
    gc.collect()
    assert float(c.buffers[3][:, :, :200].min()) == 2.0 and c.buffers[3].flags.writeable
    assert all(_region_of(b) is not None for b in c.buffers)
    assert all(r() is None for r in gone), "a replaced buffer is still mapped"


def test_session_round_rollback_and_durable_state(inplace_export, golden_image, golden_rounds):
    """A golden round matches the research code as the concat export's does (tests/test_export.py); a failed
    round leaves the cache as it was; a saved conversation restored (one prefill into fresh buffers) holds the
    same cache and continues the same."""
    import segllm_edge
    from segllm_edge.runtime.session_state import restore_session, save_session
    from segllm_edge.runtime.transaction import snapshot
    from test_fidelity import iou

    new = segllm_edge.load(inplace_export, backend="onnxruntime", threads=1)
    sn = new.session(golden_image)
    rn = sn.ask(GOLDEN_QUESTIONS[0])
    assert iou(rn.model_mask, golden_rounds[1]["final_mask"]) >= 0.999
    assert rn.query_index == int(golden_rounds[1]["selected_fg_query_id_last"])
    assert rn.memory["kv_cache"] == sn._cache.nbytes() >= sn._cache.valid_bytes()
    cache, length, ptrs = sn._cache, sn._cache.length, sn._cache.data_pointers()
    H = new.backend.info.hidden_size
    before = snapshot(sn)
    sn.backend.llm(np.zeros((1, 5, H), np.float32), cache)    # a round that then fails
    before.restore(sn)
    assert sn._cache is cache and cache.length == length and cache.data_pointers() == ptrs
    back = restore_session(save_session(sn), new.backend)
    assert back._cache.length == length and back._cache.data_pointers() != ptrs
    for a, b in zip(back._cache.views(), cache.views()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    emb = np.random.default_rng(2).standard_normal((1, 4, H)).astype(np.float32)
    np.testing.assert_allclose(new.backend.llm(emb, back._cache), new.backend.llm(emb, cache), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bind_kv", [False, True])
def test_bls_runs_the_inplace_llm_host_and_bound(golden_export, inplace_export, bind_kv):
    """The BLS's in-process llm on the in-place layout: host buffers, and device OrtValues through IOBinding
    (what a GPU server runs; here on the CPU), the same hidden states as the concat export's BLS."""
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.kv_buffer import BufferKVCache
    from segllm_edge.serving.bls import TritonBlsBackend
    from segllm_edge.serving.bls_graphs import BlsGraphs

    ref = TritonBlsBackend(golden_export, call=None, local=BlsGraphs(open_export(golden_export), threads=1))
    bls = TritonBlsBackend(inplace_export, call=None,
                           local=BlsGraphs(open_export(inplace_export), threads=1, bind_kv=bind_kv))
    cr, cb = ref.new_cache(), bls.new_cache()
    assert isinstance(cb, BufferKVCache) and cb.device == (("cpu", 0) if bind_kv else None)
    rng = np.random.default_rng(5)
    H = bls.info.hidden_size
    ptrs = None
    for n in (7, 3, 1):
        emb = rng.standard_normal((1, n, H)).astype(np.float32)
        np.testing.assert_allclose(bls.llm(emb, cb), ref.llm(emb, cr), rtol=1e-4, atol=1e-5)
        assert cb.length == cr.length
        ptrs = ptrs or cb.data_pointers()
        assert cb.data_pointers() == ptrs
    cb.crop(7)
    cr.crop(7)
    emb = rng.standard_normal((1, 2, H)).astype(np.float32)
    np.testing.assert_allclose(bls.llm(emb, cb), ref.llm(emb, cr), rtol=1e-4, atol=1e-5)
    assert "llm" in bls.local_ms and cb.length == 9


def test_backends_without_the_kernel_refuse_the_inplace_layout(inplace_export):
    from segllm_edge.errors import BackendError
    from segllm_edge.runtime.kv_buffer import BufferKVCache, run_llm_inplace

    class NotOrt:
        def run(self, *a):
            raise AssertionError("must not run")

    with pytest.raises(BackendError, match="in-place KV layout runs on onnxruntime only"):
        run_llm_inplace(NotOrt(), np.zeros((1, 1, 4), np.float32), BufferKVCache(1, 1, 4), "inputs_embeds",
                        ["p.k", "p.v"], "hidden_states", ["k", "v"])


def test_openvino_runs_the_inplace_llm_on_onnxruntime_and_tensorrt_quantize_refuse(golden_export, inplace_export):
    pytest.importorskip("openvino")
    import onnxruntime as ort

    from segllm_edge.errors import BackendError, CheckpointError
    from segllm_edge.export.quantize import quantize_export
    from segllm_edge.export.tensorrt.builder import plan_build
    from segllm_edge.runtime.openvino_backend import OpenVinoBackend
    from segllm_edge.runtime.ort_backend import OrtBackend

    ov = OpenVinoBackend.from_export(inplace_export, threads=1)
    assert isinstance(ov.sessions["llm"], ort.InferenceSession)
    ref = OrtBackend.from_export(golden_export, threads=1)
    emb = np.random.default_rng(4).standard_normal((1, 6, ov.info.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(ov.llm(emb, ov.new_cache()), ref.llm(emb, ref.new_cache()), rtol=1e-4, atol=1e-5)
    with pytest.raises(BackendError, match="KV layout"):
        plan_build(inplace_export, "fp16")
    with pytest.raises(CheckpointError, match="quantize the export first"):
        quantize_export(inplace_export, "int8", drift_report=False)


def test_fp16_cache_in_place(golden_export_fp16, tmp_path):
    """An fp16 export (fp16 KV cache) converted: fp16 buffers, the same hidden states within fp16 rounding."""
    from segllm_edge.export.kv_inplace import convert_export
    from segllm_edge.runtime.ort_backend import OrtBackend

    old = OrtBackend.from_export(golden_export_fp16, threads=1)
    new = OrtBackend.from_export(convert_export(golden_export_fp16, tmp_path / "fp16"), threads=1)
    co, cn = old.new_cache(), new.new_cache()
    rng = np.random.default_rng(6)
    for n in (12, 3, 1):
        emb = rng.standard_normal((1, n, new.info.hidden_size)).astype(np.float32)
        np.testing.assert_allclose(new.llm(emb, cn), old.llm(emb, co), rtol=2e-2, atol=2e-2)
    assert cn.buffers[0].dtype == np.float16 and cn.length == co.length == 16


def test_fp32_cuda_cache_stays_on_the_host_and_old_onnxruntime_is_refused():
    """onnxruntime's CUDA GroupQueryAttention has no fp32 kernel: an fp32 cache is not put on the GPU (it would
    cross PCIe whole twice per round); an onnxruntime without multi-token GQA over a past is a clear error."""
    from types import SimpleNamespace

    from segllm_edge.errors import BackendError
    from segllm_edge.runtime.kv_buffer import check_onnxruntime_version, inplace_cache

    info = SimpleNamespace(num_layers=1, num_kv_heads=2, head_dim=4, max_context=64)
    assert inplace_cache(info, np.float32, ("cuda", 0)).device is None
    assert inplace_cache(info, np.float32, ("cpu", 0)).device == ("cpu", 0)
    check_onnxruntime_version("1.20.0")
    check_onnxruntime_version("1.32.0")
    with pytest.raises(BackendError, match="onnxruntime >= 1.20"):
        check_onnxruntime_version("1.19.2")


def test_bf16_in_place_is_refused_before_any_export_work(tmp_path):
    from segllm_edge.errors import ConfigError
    from segllm_edge.export.onnx_export import export_model

    with pytest.raises(ConfigError, match="no bf16 kernel"):
        export_model(tmp_path / "no-checkpoint-needed", tmp_path / "out", precision="bf16", kv_layout="inplace")
    assert not (tmp_path / "out").exists()
