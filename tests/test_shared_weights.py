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
