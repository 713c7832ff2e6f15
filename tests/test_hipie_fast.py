"""Export-time HIPIE variants: same function as the reference, reference untouched, used by the exporter."""
import numpy as np
import onnx
import pytest
import torch

from segllm_edge.export.hipie_fast import (HIPIE_GRAPH_VARIANTS, FastMSDeformAttn, fast_hipie,
                                           ms_deform_attn_fast)
from segllm_edge.export.hipie_fast_v3 import FastEncoderLayerV3, FastMSDeformAttnV3, aligned_bilinear_x2
from segllm_edge.contracts.manifest import Manifest
from segllm_edge.modeling.hipie import mask_head
from segllm_edge.modeling.hipie.deform_attn import ms_deform_attn
from segllm_edge.modeling.hipie.mask_head import aligned_bilinear
from segllm_edge.modeling.hipie.transformer import EncoderLayer, MSDeformAttn

SHAPES = ((8, 8), (4, 4), (2, 2), (1, 1))


def test_fast_deformable_attention_equals_reference():
    g = torch.Generator().manual_seed(0)
    n, lq, m, d, lv, p = 2, 17, 8, 32, len(SHAPES), 4
    value = torch.randn(n, sum(h * w for h, w in SHAPES), m, d, generator=g)
    loc = torch.rand(n, lq, m, lv, p, 2, generator=g) * 1.2 - 0.1   # some samples fall outside
    w = torch.softmax(torch.randn(n, lq, m, lv * p, generator=g), -1).view(n, lq, m, lv, p)
    ref = ms_deform_attn(value, SHAPES, loc, w)
    got = ms_deform_attn_fast(value, SHAPES, loc, w)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_variant_is_swapped_in_and_restored():
    mod = torch.nn.Sequential(MSDeformAttn(), torch.nn.Linear(2, 2))
    with fast_hipie(mod, "fast-v2"):
        assert type(mod[0]) is FastMSDeformAttn
    assert type(mod[0]) is MSDeformAttn
    with fast_hipie(mod):
        assert type(mod[0]) is FastMSDeformAttnV3
    assert type(mod[0]) is MSDeformAttn
    try:
        with fast_hipie(mod):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert type(mod[0]) is MSDeformAttn and mask_head.aligned_bilinear is aligned_bilinear
    with pytest.raises(ValueError, match="fast-v2, fast-v3"):
        with fast_hipie(mod, "fast-v9"):
            pass


def test_exported_mask_decoder_is_the_default_variant(golden_export):
    man = Manifest.load(golden_export)
    m = onnx.load(str(golden_export / man.graphs["mask_decoder"].file), load_external_data=False)
    ops = [n for n in m.graph.node if n.op_type == "Einsum"]
    eqs = {a.s.decode() for n in ops for a in n.attribute if a.name == "equation"}
    assert not any(e.replace(" ", "") == "ndqp,nqp->nqd" for e in eqs), eqs
    # fast-v3: GridSample only in the encoder (6 layers x 4 levels), the decoder gathers memory rows
    assert sum(n.op_type == "GridSample" for n in m.graph.node) == 24
    assert sum(n.op_type == "Resize" and any(a.name == "mode" and a.s == b"linear" for a in n.attribute)
               for n in m.graph.node) == 0                                  # x2 mask upsampling without it
    assert man.extra["graphs"]["mask_decoder"]["variant"] == HIPIE_GRAPH_VARIANTS["fast-v3"]


def _attn_pair(seed=0):
    torch.manual_seed(seed)
    ref = MSDeformAttn().eval()
    fast = MSDeformAttn().eval()
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = FastMSDeformAttnV3
    return ref, fast


def test_fast_v3_encoder_attention_equals_reference():
    """Encoder form (2-d reference points): folded location arithmetic, per-level channel-major value."""
    g = torch.Generator().manual_seed(1)
    ref, fast = _attn_pair()
    lq = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, lq, 256, generator=g)
    value = torch.randn(2, lq, 256, generator=g)
    points = torch.rand(1, lq, 1, 2, generator=g)
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    with torch.no_grad():
        want = ref(query, points, value, SHAPES, norm)
        got = fast(query, points, value, SHAPES, norm)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())


def test_fast_v3_decoder_attention_equals_reference():
    """Decoder form (box reference points): corners gathered as memory rows, value projection after the sum;
    large offsets put many corners outside the maps (zero padding, the bias only where a corner is inside)."""
    g = torch.Generator().manual_seed(2)
    ref, fast = _attn_pair(3)
    with torch.no_grad():
        ref.sampling_offsets.weight.mul_(20.0)
        fast.sampling_offsets.weight.copy_(ref.sampling_offsets.weight)
        ref.value_proj.bias.normal_(generator=g)
        fast.value_proj.bias.copy_(ref.value_proj.bias)
    memory = torch.randn(2, sum(h * w for h, w in SHAPES), 256, generator=g)
    query = torch.randn(2, 11, 256, generator=g)
    boxes = torch.rand(2, 11, 1, 4, generator=g)
    with torch.no_grad():
        want = ref(query, boxes, memory, SHAPES)
        got = fast(query, boxes, memory, SHAPES)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())


def test_fast_v3_encoder_layer_equals_reference():
    torch.manual_seed(4)
    ref = EncoderLayer().eval()
    fast = EncoderLayer().eval()
    fast.load_state_dict(ref.state_dict())
    lq = sum(h * w for h, w in SHAPES)
    g = torch.Generator().manual_seed(5)
    src, pos = torch.randn(1, lq, 256, generator=g), torch.randn(1, lq, 256, generator=g)
    points = torch.rand(1, lq, 1, 2, generator=g)
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    with torch.no_grad():
        want = ref(src, pos, points, SHAPES, norm)
        with fast_hipie(fast):
            assert type(fast) is FastEncoderLayerV3 and type(fast.self_attn) is FastMSDeformAttnV3
            got = fast(src, pos, points, SHAPES, norm)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_x2_mask_upsampling_equals_aligned_bilinear():
    g = torch.Generator().manual_seed(6)
    for shape in ((3, 1, 5, 7), (2, 1, 128, 128)):
        x = torch.randn(*shape, generator=g)
        want = aligned_bilinear(x, 2)
        assert torch.allclose(aligned_bilinear_x2(x, 2), want, atol=1e-6, rtol=0), shape
    assert torch.equal(aligned_bilinear_x2(x, 4), aligned_bilinear(x, 4))


def test_fast_v3_swaps_the_mask_head_upsampling_and_restores_it():
    mod = torch.nn.Sequential(MSDeformAttn())
    with fast_hipie(mod):
        assert mask_head.aligned_bilinear is aligned_bilinear_x2
    assert mask_head.aligned_bilinear is aligned_bilinear
    with fast_hipie(mod, "fast-v2"):
        assert mask_head.aligned_bilinear is aligned_bilinear and type(mod[0]) is FastMSDeformAttn


def test_exported_mask_decoder_matches_pytorch_under_openvino(golden_export, golden_model):
    """The default CPU path runs the fast-v3 graph on OpenVINO: within the export tolerance of the reference
    (onnxruntime is checked in test_export.py; OpenVINO once miscomputed a rank-7 broadcast of the decoder)."""
    ov = pytest.importorskip("openvino")
    from segllm_edge.contracts.manifest import HIPIE_LEVELS
    from segllm_edge.export.graphs import GRAPH_MODULES

    g = torch.Generator().manual_seed(7)
    # two conditionings: the decoder's per-conditioning row offsets (0 for the first) are exercised
    args = (*[torch.randn(1, 256, h, w, generator=g) for h, w in HIPIE_LEVELS], torch.randn(2, 8, 768, generator=g) * 0.5)
    with torch.no_grad():
        want = GRAPH_MODULES["mask_decoder"](golden_model.backend.model).eval()(*args)
    man = Manifest.load(golden_export)
    spec = man.graphs["mask_decoder"]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(golden_export / spec.file)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    got = compiled({t.name: a.numpy() for t, a in zip(spec.inputs, args)})
    for i, (t, w) in enumerate(zip(spec.outputs, want)):
        err = float(np.abs(got[compiled.output(i)] - w.numpy()).max() / np.abs(w.numpy()).max())
        assert err <= 1e-4, (t.name, err)
