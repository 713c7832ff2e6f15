"""bf16 tensors into and out of onnxruntime (segllm_edge/runtime/ort_values.py), on the CPU build.

The package holds bf16 as ``ml_dtypes.bfloat16`` arrays; onnxruntime's Python API takes none of them (the first
test shows each refusal, so these tests fail on code that hands them over raw). The graphs here are tiny bf16
graphs of ops the CPU provider has bf16 kernels for (Identity, Concat, Reshape, Cast), shaped like the llm graph's
two KV layouts, run through the same helpers the backends, the KV caches and the BLS use.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from segllm_edge.runtime import ort_values as ov  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
H = 4          # hidden size == head_dim, one kv head: the round's embeddings are its keys and values


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


@pytest.fixture(scope="module")
def concat_llm():
    """The concat layout: ``present.0.* = Concat(past_key_values.0.*, embeds as (1, 1, T, H))`` (bf16),
    ``hidden_states = Cast(embeds, float)``."""
    BF = TensorProto.BFLOAT16
    shape = helper.make_tensor("kv_shape", TensorProto.INT64, [4], [1, 1, -1, H])
    nodes = [helper.make_node("Reshape", ["inputs_embeds", "kv_shape"], ["kv"]),
             helper.make_node("Cast", ["inputs_embeds"], ["hidden_states"], to=TensorProto.FLOAT)]
    outs = [_vi("hidden_states", TensorProto.FLOAT, [1, "seq", H])]
    for kv in ("key", "value"):
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kv}", "kv"], [f"present.0.{kv}"], axis=2))
        outs.append(_vi(f"present.0.{kv}", BF, [1, 1, "total", H]))
    ins = [_vi("inputs_embeds", BF, [1, "seq", H])] + [_vi(f"past_key_values.0.{kv}", BF, [1, 1, "past", H])
                                                      for kv in ("key", "value")]
    return _model(nodes, ins, outs, [shape])


@pytest.fixture(scope="module")
def inplace_llm():
    """The in-place layout's interface: past and present bound to one buffer (here present = Identity(past): the
    buffer passes through), ``past_length`` fed, ``hidden_states = Cast(embeds, float)``."""
    BF = TensorProto.BFLOAT16
    nodes = [helper.make_node("Cast", ["inputs_embeds"], ["hidden_states"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["past_length"], ["past_length_out"])]
    outs = [_vi("hidden_states", TensorProto.FLOAT, [1, "seq", H]), _vi("past_length_out", TensorProto.INT64, [1])]
    for kv in ("key", "value"):
        nodes.append(helper.make_node("Identity", [f"past_key_values.0.{kv}"], [f"present.0.{kv}"]))
        outs.append(_vi(f"present.0.{kv}", BF, [1, 1, "cap", H]))
    ins = [_vi("inputs_embeds", BF, [1, "seq", H]), _vi("past_length", TensorProto.INT64, [1])] + \
        [_vi(f"past_key_values.0.{kv}", BF, [1, 1, "cap", H]) for kv in ("key", "value")]
    return _model(nodes, ins, outs)


def _bf16(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(BF16)


PAST = ["past_key_values.0.key", "past_key_values.0.value"]
PRESENT = ["present.0.key", "present.0.value"]


def test_the_raw_path_fails(concat_llm):
    """What onnxruntime's Python API does with ml_dtypes.bfloat16 arrays: refuses them, everywhere."""
    e = _bf16(1, 2, H)
    past = np.zeros((1, 1, 0, H), BF16)
    with pytest.raises(Exception):
        concat_llm.run(None, {"inputs_embeds": e, PAST[0]: past, PAST[1]: past})
    with pytest.raises(Exception):
        ort.OrtValue.ortvalue_from_numpy(e)
    with pytest.raises(Exception):
        io = concat_llm.io_binding()
        io.bind_cpu_input("inputs_embeds", e)
        io.bind_cpu_input(PAST[0], past)
        io.bind_cpu_input(PAST[1], past)
        io.bind_output("hidden_states")
        concat_llm.run_with_iobinding(io)
    value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(e.view(np.uint16), ov.BFLOAT16)
    with pytest.raises(Exception, match="bfloat16"):
        value.numpy()


def test_ortvalues_round_trip_bf16_bits():
    a = _bf16(2, 3, 5)
    v = ov.to_ortvalue(a)
    assert v.element_type() == ov.BFLOAT16 and v.shape() == [2, 3, 5]
    back = ov.to_numpy(v)
    assert back.dtype == BF16 and np.array_equal(back.view(np.uint16), a.view(np.uint16))
    assert ov.to_numpy(ov.to_ortvalue(np.zeros((1, 1, 0, H), BF16))).shape == (1, 1, 0, H)
    assert ov.element_type(BF16) == ov.BFLOAT16 and ov.element_type(np.float16) is np.float16
    f = np.arange(6, dtype=np.float32)
    assert ov.to_numpy(ov.to_ortvalue(f)).dtype == np.float32         # other dtypes: onnxruntime's own path


def test_run_feeds_and_returns_bf16(concat_llm):
    e1, e2 = _bf16(1, 3, H, seed=1), _bf16(1, 2, H, seed=2)
    past = [np.zeros((1, 1, 0, H), BF16)] * 2
    for e in (e1, e2):
        hidden, *present = ov.run(concat_llm, None, {"inputs_embeds": e, **dict(zip(PAST, past))})
        np.testing.assert_array_equal(hidden, e.astype(np.float32))
        assert all(p.dtype == BF16 for p in present)
        past = present
    want = np.concatenate([e1, e2], axis=1).reshape(1, 1, 5, H)
    assert np.array_equal(past[0].view(np.uint16), want.view(np.uint16))


def test_bind_cpu_input_takes_bf16(concat_llm):
    e = _bf16(1, 2, H, seed=3)
    past = _bf16(1, 1, 3, H, seed=4)
    io = concat_llm.io_binding()
    ov.bind_cpu_input(io, "inputs_embeds", e)
    ov.bind_cpu_input(io, PAST[0], past)
    ov.bind_cpu_input(io, PAST[1], past)
    for name in ("hidden_states", *PRESENT):
        io.bind_output(name, "cpu")
    concat_llm.run_with_iobinding(io)
    hidden, key, _ = io.get_outputs()
    np.testing.assert_array_equal(ov.to_numpy(hidden), e.astype(np.float32))
    assert np.array_equal(ov.to_numpy(key)[:, :, 3:].reshape(1, 2, H).view(np.uint16), e.view(np.uint16))


def test_device_kv_cache_in_bf16(concat_llm):
    """OrtValueKVCache + run_llm_bound (the BLS's device cache; here on device ("cpu", 0)) in bf16, rollback too."""
    from segllm_edge.runtime.device_kv_cache import OrtValueKVCache, run_llm_bound

    cache = OrtValueKVCache(1, 1, H, BF16, ("cpu", 0))
    e1, e2 = _bf16(1, 3, H, seed=5), _bf16(1, 2, H, seed=6)
    for e in (e1, e2):
        hidden = run_llm_bound(concat_llm, e, cache, "inputs_embeds", PAST, "hidden_states", PRESENT)
        np.testing.assert_array_equal(hidden, e.astype(np.float32))
    assert cache.length == 5 and cache.values[0].element_type() == ov.BFLOAT16
    cache.crop(3)
    assert cache.length == 3
    assert np.array_equal(ov.to_numpy(cache.values[1]).view(np.uint16), e1.reshape(1, 1, 3, H).view(np.uint16))


@pytest.mark.parametrize("device", [None, ("cpu", 0)], ids=["host-buffers", "ortvalue-buffers"])
def test_inplace_kv_buffers_in_bf16(inplace_llm, device):
    """BufferKVCache + run_llm_inplace in bf16: host numpy buffers (bound by pointer with the BFLOAT16 element
    type) and OrtValue buffers (the GPU path's code, on the CPU), growth copies included."""
    from segllm_edge.runtime.kv_buffer import BLOCK, BufferKVCache, run_llm_inplace

    cache = BufferKVCache(1, 1, H, BF16, device=device)
    cache.reserve(2)
    cache.buffers = [ov.to_ortvalue(_bf16(1, 1, cache.capacity, H, seed=9), device) if device else
                     _bf16(1, 1, cache.capacity, H, seed=9) for _ in range(2)]
    before = [ov.to_numpy(b) if device else b.copy() for b in cache.buffers]     # whole buffers
    e = _bf16(1, 2, H, seed=7)
    hidden = run_llm_inplace(inplace_llm, e, cache, "inputs_embeds", PAST, "hidden_states", PRESENT)
    np.testing.assert_array_equal(hidden, e.astype(np.float32))
    assert cache.length == 2
    views = cache.views()                 # the graph passed its buffers through: the same bits, where they were
    assert all(v.dtype == BF16 and np.array_equal(v.view(np.uint16), w[:, :, :2].view(np.uint16))
               for v, w in zip(views, before))
    kept = [v.copy() for v in views]
    cache.reserve(BLOCK + 1)                                         # growth: the valid part copied over
    assert cache.grown == 2 and all(np.array_equal(a.view(np.uint16), b.view(np.uint16))
                                    for a, b in zip(cache.views(), kept))


def test_lean_owned_outputs_run_bf16(concat_llm):
    from segllm_edge.runtime.lean_sessions import OwnedOutputs

    e = _bf16(1, 2, H, seed=8)
    past = np.zeros((1, 1, 0, H), BF16)
    hidden, key, value = OwnedOutputs(concat_llm).run(None, {"inputs_embeds": e, PAST[0]: past, PAST[1]: past})
    assert key.dtype == BF16 and np.array_equal(key.reshape(1, 2, H).view(np.uint16), e.view(np.uint16))


def test_ort_backend_and_bls_graphs_run_bf16(concat_llm):
    """OrtBackend._run (casts to the manifest's bf16, then runs) and BlsGraphs.run hand bf16 over as OrtValues."""
    from segllm_edge.runtime.ort_backend import OrtBackend
    from segllm_edge.serving.bls_graphs import BlsGraphs

    e = np.random.default_rng(10).standard_normal((1, 2, H)).astype(np.float32)
    past = np.zeros((1, 1, 0, H), np.float32)
    backend = OrtBackend.__new__(OrtBackend)            # only what _run reads
    backend._dtypes = {"llm": {"inputs_embeds": BF16, PAST[0]: BF16, PAST[1]: BF16}}
    backend.sessions = {"llm": concat_llm}
    hidden, key, _ = backend._run("llm", {"inputs_embeds": e, PAST[0]: past, PAST[1]: past})
    np.testing.assert_array_equal(hidden, e.astype(BF16).astype(np.float32))
    assert key.dtype == BF16

    graphs = BlsGraphs.__new__(BlsGraphs)
    graphs.sessions = {"llm": concat_llm}
    feeds = {"inputs_embeds": e.astype(BF16), PAST[0]: past.astype(BF16), PAST[1]: past.astype(BF16)}
    (key,) = graphs.run("llm", feeds, [PRESENT[0]])
    assert key.dtype == BF16 and key.shape == (1, 1, 2, H)
