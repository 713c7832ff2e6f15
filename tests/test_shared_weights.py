"""CLIP held once: the two CLIP graphs' identical initializers are one buffer under both onnxruntime sessions
(segllm_edge/runtime/shared_weights.py), in the Triton BLS process and in load(export)."""
from __future__ import annotations

import numpy as np
import pytest


def test_initializer_locations_match_onnx(golden_export):
    """The protobuf reader (no onnx package needed when serving) finds every initializer and its exact bytes."""
    import onnx
    from onnx import numpy_helper

    from segllm_edge.runtime.shared_weights import initializer_bytes

    for graph in ("vision_encoder", "mask_encoder", "seg_head"):
        path = golden_export / f"{graph}.onnx"
        want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        got = {t.name: t for t in initializer_bytes(path)}
        assert got and set(got) <= set(want)
        # everything raw-stored is found (typed fields are only tiny scalars)
        assert sum(a.nbytes for n, a in want.items() if n not in got) < 1024
        for name, t in got.items():
            assert t.shape == want[name].shape and np.array_equal(t.array(), want[name]), name


def test_clip_weights_are_held_once_in_the_bls(golden_export):
    """Every CLIP/projector weight of mask_encoder is the very buffer vision_encoder uses; outputs unchanged."""
    import onnxruntime as ort

    from segllm_edge.contracts import ort as ortc
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.shared_weights import initializer_bytes
    from segllm_edge.serving.bls_graphs import BlsGraphs

    graphs = BlsGraphs(open_export(golden_export), threads=1)
    assert set(graphs.sessions) == {"llm", "vision_encoder", "mask_encoder"}
    sw = graphs.shared
    big = {g: [t for t in initializer_bytes(golden_export / f"{g}.onnx") if t.nbytes >= 4096]
           for g in ("vision_encoder", "mask_encoder")}
    own = [t.name for t in big["mask_encoder"] if "box_encoder" in t.name]     # mask_enc_head: its own weights
    assert sw.per_graph["mask_encoder"] == len(big["mask_encoder"]) - len(own)
    assert sw.per_graph["vision_encoder"] == len(big["vision_encoder"]) == sw.groups
    clip_bytes = sum(t.nbytes for t in big["vision_encoder"])
    assert sw.shared_bytes == clip_bytes and len(sw.values) == sw.groups      # one buffer per shared weight

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    boxes = rng.random((1, 4)).astype(np.float32)
    opts = ortc.session_options(1)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    for g, feeds in (("vision_encoder", {"pixel_values": x}), ("mask_encoder", {"crops": x, "boxes": boxes})):
        alone = ort.InferenceSession(str(golden_export / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
        out = graphs.run(g, feeds, [o.name for o in alone.get_outputs()])[0]
        np.testing.assert_array_equal(out, alone.run(None, feeds)[0])


def test_load_export_holds_clip_once(golden_export):
    import segllm_edge

    model = segllm_edge.load(golden_export, backend="onnxruntime")
    sw = model.backend.shared_weights
    assert sw is not None and sw.groups > 0 and sw.per_graph == {"vision_encoder": sw.groups,
                                                                 "mask_encoder": sw.groups}


def test_unreadable_graph_is_a_checkpoint_error(tmp_path):
    from segllm_edge.errors import CheckpointError
    from segllm_edge.runtime.shared_weights import initializer_bytes

    bad = tmp_path / "g.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")      # a graph field longer than the file
    with pytest.raises(CheckpointError, match="cannot read the initializers"):
        initializer_bytes(bad)


def test_kv_cache_bound_to_the_device_matches_the_host_cache(golden_export):
    """The IOBinding path (what a GPU BLS runs: the cache stays in device memory between rounds), here on the
    CPU: the same hidden states round after round as the host cache, and a rollback (crop) restores it."""
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.device_kv_cache import OrtValueKVCache
    from segllm_edge.serving.bls import TritonBlsBackend
    from segllm_edge.serving.bls_graphs import BlsGraphs

    export = open_export(golden_export)
    host = TritonBlsBackend(golden_export, call=None, local=BlsGraphs(export, threads=1))
    bound = TritonBlsBackend(golden_export, call=None, local=BlsGraphs(export, threads=1, bind_kv=True))
    ch, cb = host.new_cache(), bound.new_cache()
    assert isinstance(cb, OrtValueKVCache) and cb.length == 0
    rng = np.random.default_rng(1)
    H = export.info.hidden_size
    for n in (7, 3, 1):
        emb = rng.standard_normal((1, n, H)).astype(np.float32)
        np.testing.assert_allclose(bound.llm(emb, cb), host.llm(emb, ch), rtol=1e-5, atol=1e-5)
        assert cb.length == ch.length and cb.nbytes() == ch.nbytes()
    cb.crop(7)
    ch.crop(7)
    emb = rng.standard_normal((1, 2, H)).astype(np.float32)
    np.testing.assert_allclose(bound.llm(emb, cb), host.llm(emb, ch), rtol=1e-5, atol=1e-5)
    assert "llm" in bound.local_ms and cb.length == 9


# --------------------------------------------------------------------------------------------------------------------
# add_initializer takes only an OrtValue that does not own its buffer (onnxruntime's SessionOptions::AddInitializer:
# "Buffer containing the initializer must be owned by the user"); ortvalue_from_numpy(arr, "cuda", 0) of
# onnxruntime-gpu is a device copy the OrtValue owns.

def _two_graphs_sharing_a_weight(tmp_path):
    """Two tiny graphs ``y = x @ W (+ b)`` holding the same 32x64 fp32 ``W`` (8 KiB, stored raw)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    files = {}
    for g, extra in (("a", False), ("b", True)):
        nodes = [helper.make_node("MatMul", ["x", f"W_{g}"], ["m" if extra else "y"])]
        inits = [numpy_helper.from_array(w, f"W_{g}")]
        if extra:
            nodes.append(helper.make_node("Add", ["m", "bias"], ["y"]))
            inits.append(numpy_helper.from_array(np.ones(64, np.float32), "bias"))
        graph = helper.make_graph(nodes, g, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        files[g] = tmp_path / f"{g}.onnx"
        onnx.save(model, str(files[g]))
    return files, w


class _OwnedDeviceCopyOrtValue:
    """STAND-IN for onnxruntime-gpu's ``OrtValue`` (this machine has no CUDA build): ``ortvalue_from_numpy(arr,
    "cuda", id)`` returns what the CUDA build returns, a copy the OrtValue *owns* (here in host memory, made with
    the real ``ortvalue_from_shape_and_type`` + ``update_inplace``); everything else is the real OrtValue. The
    rejection of such a value is the real ``SessionOptions.add_initializer``'s, not mirrored."""

    def __init__(self, ort):
        self._ort = ort
        self.copies = []

    def ortvalue_from_numpy(self, arr, device_type="cpu", device_id=0):
        if device_type == "cpu":
            return self._ort.OrtValue.ortvalue_from_numpy(arr)
        v = self._ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype.type, "cpu", 0)
        v.update_inplace(np.ascontiguousarray(arr))
        self.copies.append(v)
        return v

    def __getattr__(self, name):
        return getattr(self._ort.OrtValue, name)


@pytest.fixture
def cuda_standin(monkeypatch):
    """onnxruntime with the stand-in OrtValue above (and CUDA listed as available), for the package's code."""
    import types

    import onnxruntime as ort

    from segllm_edge.contracts import ort as ortc

    fake = types.SimpleNamespace(**{k: getattr(ort, k) for k in dir(ort) if not k.startswith("__")})
    fake.__version__ = ort.__version__
    fake.OrtValue = _OwnedDeviceCopyOrtValue(ort)
    fake.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ortc, "require_onnxruntime", lambda: fake)
    return fake


def test_an_owned_ortvalue_is_refused_by_the_real_add_initializer():
    """What the CUDA path did (an OrtValue owning its buffer), reproduced on the CPU build: the real refusal."""
    import onnxruntime as ort

    owned = ort.OrtValue.ortvalue_from_shape_and_type([4, 1024], np.float32, "cpu", 0)
    with pytest.raises(Exception, match="must be owned by the user"):
        ort.SessionOptions().add_initializer("w", owned)


def test_user_owned_view_on_a_device_is_accepted_and_views_the_one_copy(cuda_standin):
    import onnxruntime as ort

    from segllm_edge.runtime.ort_values import user_owned_view

    arr = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with pytest.raises(Exception, match="must be owned by the user"):       # the old call, on the stand-in
        ort.SessionOptions().add_initializer("w", cuda_standin.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
    view = user_owned_view(arr, ("cuda", 0))
    ort.SessionOptions().add_initializer("w", view)                         # accepted
    copy = cuda_standin.OrtValue.copies[-1]
    assert view.data_ptr() == copy.data_ptr() != arr.ctypes.data            # a view of the one device copy
    del copy
    cuda_standin.OrtValue.copies.clear()
    np.testing.assert_array_equal(view.numpy(), arr)                        # the capsule keeps the copy alive


def test_cuda_sessions_get_initializers_add_initializer_accepts(cuda_standin, monkeypatch, tmp_path):
    """open_sessions_sharing_weights on a CUDA provider list: every shared initializer goes through the real
    add_initializer (the sessions themselves, which need a GPU, are not opened)."""
    import onnxruntime as ort

    from segllm_edge.contracts import ort as ortc
    from segllm_edge.runtime.shared_weights import open_sessions_sharing_weights

    files, w = _two_graphs_sharing_a_weight(tmp_path)
    opened = {}
    monkeypatch.setattr(ortc, "open_session", lambda f, o, p, g: opened.setdefault(g, (o, p)))
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    sessions, sw = open_sessions_sharing_weights(files, ort.SessionOptions, providers)
    assert set(opened) == {"a", "b"} and sw.groups == 1 and sw.per_graph == {"a": 1, "b": 1}
    assert len(cuda_standin.OrtValue.copies) == 1                            # one device copy for both sessions
    assert sw.values[0].data_ptr() == cuda_standin.OrtValue.copies[0].data_ptr()
    np.testing.assert_array_equal(sw.values[0].numpy(), w)


def test_cpu_sessions_still_share_the_mapped_weight(tmp_path):
    """On the CPU the shared initializer is a view of the one host array (the mapped file bytes, or their aligned
    copy), under both sessions."""
    import onnxruntime as ort

    from segllm_edge.runtime.shared_weights import open_sessions_sharing_weights

    files, w = _two_graphs_sharing_a_weight(tmp_path)
    sessions, sw = open_sessions_sharing_weights(files, ort.SessionOptions, ["CPUExecutionProvider"])
    assert sw.groups == 1 and sw.shared_bytes == w.nbytes
    assert sw.values[0].data_ptr() == sw.arrays[0].ctypes.data                 # no copy of its own
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    np.testing.assert_allclose(sessions["a"].run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sessions["b"].run(None, {"x": x})[0], x @ w + 1, rtol=1e-5, atol=1e-5)


def test_in_process_cuda_llm_keeps_the_kv_cache_on_the_device(golden_export, golden_image, monkeypatch):
    """load(export, backend="cuda") with the concat KV layout: a CUDA llm session makes the session's cache
    device OrtValues (issue 23 item 4; a HostKVCache would send the whole past to the device and the whole present
    back every round). Here the bound path runs on device ("cpu", 0), standing in for ("cuda", 0): per round only
    the round's embeddings cross into onnxruntime and its hidden states come back, the same masks as the host
    cache, and a failed round's rollback works."""
    import segllm_edge
    import segllm_edge.runtime.device_kv_cache as dkv
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.runtime.ort_backend import OrtBackend

    class CudaLlm:        # what session_kv_device reads off an onnxruntime-gpu session placed on cuda:1
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_provider_options(self):
            return {"CUDAExecutionProvider": {"device_id": "1"}}

    export = open_export(golden_export)
    assert OrtBackend.from_sessions(export, {"llm": CudaLlm()}).kv_device == ("cuda", 1)
    host = segllm_edge.load(golden_export, backend="onnxruntime")
    assert host.backend.kv_device is None                   # CPU: host numpy arrays (read in place)
    bound = segllm_edge.load(golden_export, backend="onnxruntime")
    bound.backend.bind_kv(("cpu", 0))
    crossed = []
    real_in, real_out = dkv.bind_cpu_input, dkv.to_numpy
    monkeypatch.setattr(dkv, "bind_cpu_input", lambda io, name, a: (crossed.append(("in", name, a.nbytes)),
                                                                    real_in(io, name, a))[1])
    monkeypatch.setattr(dkv, "to_numpy", lambda v: (lambda a: (crossed.append(("out", "", a.nbytes)), a)[1])(real_out(v)))
    sh, sb = host.session(golden_image), bound.session(golden_image)
    H = export.info.hidden_size
    for i, q in enumerate(("Segment the red circle.", "Segment the blue square.", "Segment it.[REF:1]")):
        crossed.clear()
        a, b = sh.ask(q), sb.ask(q)
        assert np.array_equal(a.mask, b.mask) and a.context_tokens == b.context_tokens
        assert isinstance(sb._cache, dkv.OrtValueKVCache) and sb._cache.length == sh._cache.length
        assert b.memory["kv_cache"] == a.memory["kv_cache"]
        n = b.new_tokens
        assert crossed == [("in", "inputs_embeds", n * H * 4), ("out", "", n * H * 4)], (i, crossed)
    length, seg_head = sb._cache.length, bound.backend.seg_head

    def fails(hidden):
        raise RuntimeError("the seg head failed after the llm ran")

    monkeypatch.setattr(bound.backend, "seg_head", fails)
    with pytest.raises(RuntimeError):
        sb.ask("Segment the green triangle.")
    assert sb._cache.length == length                       # rolled back: the device cache cropped
    monkeypatch.setattr(bound.backend, "seg_head", seg_head)
    a, b = sh.ask("Segment the green triangle."), sb.ask("Segment the green triangle.")
    assert np.array_equal(a.mask, b.mask) and sb._cache.length == sh._cache.length
