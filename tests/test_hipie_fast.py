"""Export-time HIPIE variants: same function as the reference, reference untouched, used by the exporter."""
import onnx
import torch

from segllm_edge.export.hipie_fast import FastMSDeformAttn, fast_hipie, ms_deform_attn_fast
from segllm_edge.contracts.manifest import Manifest
from segllm_edge.modeling.hipie.deform_attn import ms_deform_attn
from segllm_edge.modeling.hipie.transformer import MSDeformAttn

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
    with fast_hipie(mod):
        assert type(mod[0]) is FastMSDeformAttn
    assert type(mod[0]) is MSDeformAttn
    try:
        with fast_hipie(mod):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert type(mod[0]) is MSDeformAttn


def test_exported_mask_decoder_has_no_einsum(golden_export):
    man = Manifest.load(golden_export)
    m = onnx.load(str(golden_export / man.graphs["mask_decoder"].file), load_external_data=False)
    ops = [n for n in m.graph.node if n.op_type == "Einsum"]
    eqs = {a.s.decode() for n in ops for a in n.attribute if a.name == "equation"}
    assert not any(e.replace(" ", "") == "ndqp,nqp->nqd" for e in eqs), eqs
    assert sum(n.op_type == "GridSample" for n in m.graph.node) == 48
    assert "variant" in man.extra["graphs"]["mask_decoder"]
