"""HIPIE-R50 mask decoder vs the original research code (tests/golden/hipie_component.npz).

Weights: the golden tiny checkpoint (full HIPIE-R50, deterministic random), from conftest's
``golden_state_dict``. The image is rebuilt from tests/golden/shapes_a.png.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segllm_edge.modeling.hipie.deform_attn import ms_deform_attn
from segllm_edge.modeling.hipie.model import (CHECKPOINT_PREFIX, IGNORED_KEY_PATTERNS, HipieMaskDecoder,
                                              hipie_state_dict_from_checkpoint, ignored_key_patterns)
from segllm_edge.modeling.hipie.preprocess import hipie_preprocess
from segllm_edge.modeling.hipie.selection import mask_from_logits, select_instance

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = GOLDEN_DIR / "hipie_component.npz"
NUM_BG = 10
REL_TOL = 1e-4  # of each output's max |value|


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def _png_path() -> Path:
    return GOLDEN_DIR / "shapes_a.png"


@pytest.fixture(scope="module")
def preprocessed():
    from PIL import Image
    rgb = np.asarray(Image.open(_png_path()).convert("RGB"))
    return hipie_preprocess(rgb)


@pytest.fixture(scope="module")
def model(golden_state_dict):
    m = HipieMaskDecoder().eval()
    m.load_state_dict(hipie_state_dict_from_checkpoint(golden_state_dict), strict=True)
    return m


@pytest.fixture(scope="module")
def run(model, preprocessed, golden):
    """One backbone pass + ONE batched decode of both conditionings (row 0: component, row 1: round 1)."""
    image = preprocessed[0]
    cond = torch.cat([torch.from_numpy(golden["comp_conditioning"]), torch.from_numpy(golden["r1_lang_hidden"])])
    with torch.no_grad():
        feats, res = model.backbone_features(image, return_resnet=True)
        out = model.decode(feats, cond)
    return {"feats": feats, "res": res, "out": out}


def _close(name, got, ref, rel=REL_TOL):
    got = got.detach().float().numpy().reshape(ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got - ref).max())
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel:g} * {scale:.3g}"
    return err, err / scale


def _unpack(bits):
    return np.unpackbits(bits)[: 1024 * 1024].reshape(1024, 1024).astype(bool)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ----------------------------------------------------------------------------- no weights needed
def test_preprocess_matches_golden(preprocessed, golden):
    normalized, padded, hw = preprocessed
    assert normalized.shape == (1, 3, 1024, 1024) and normalized.dtype == torch.float32
    assert tuple(hw) == tuple(golden["comp_input_size_hw"])
    chw = np.ascontiguousarray(padded.transpose(2, 0, 1))
    assert hashlib.sha256(chw.tobytes()).hexdigest() == str(golden["comp_input_uint8_sha256"])
    np.testing.assert_allclose(normalized[0].double().sum((1, 2)).numpy(), golden["comp_normalized_input_channel_sum"],
                               rtol=1e-9, atol=1e-3)


def test_selection_reproduces_golden_on_golden_outputs(golden):
    """Pure selection logic (NMS, top-k, class-2 pick) on the research code's own raw outputs."""
    out = {"pred_logits": torch.from_numpy(golden["comp_raw_pred_logits"])[None],
           "pred_boxes": torch.from_numpy(golden["comp_raw_pred_boxes"])[None],
           "pred_boxious": torch.from_numpy(golden["comp_raw_pred_boxious"])[None],
           "pred_masks": torch.zeros(1, 110, 256, 256)}
    s = select_instance(out)
    np.testing.assert_array_equal(s["nms_keep"].numpy(), golden["comp_nms_keep"])
    np.testing.assert_array_equal(s["nms_labels"].numpy(), golden["comp_nms_labels"])
    np.testing.assert_allclose(s["nms_scores"].numpy(), golden["comp_nms_scores"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(s["nms_boxes_xyxy"].numpy(), golden["comp_nms_boxes_xyxy"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(s["inst_scores"].numpy(), golden["comp_inst_scores"], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s["inst_pred_classes"].numpy(), golden["comp_inst_pred_classes"])
    np.testing.assert_allclose(s["inst_pred_boxes"].numpy(), golden["comp_inst_pred_boxes"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(s["inst_fg_query_ids"].numpy(), golden["comp_inst_fg_query_ids"])
    assert s["selected_instance_index"] == int(golden["comp_selected_instance_index"])
    assert s["query_index"] == int(golden["comp_selected_fg_query_id"])
    np.testing.assert_allclose(s["box_xyxy"].numpy(), golden["comp_selected_box_xyxy_1024"], rtol=0, atol=1e-4)
    # round 1 too
    out = {"pred_logits": torch.from_numpy(golden["r1_raw_pred_logits"]),
           "pred_boxes": torch.from_numpy(golden["r1_raw_pred_boxes"]),
           "pred_boxious": torch.from_numpy(golden["r1_raw_pred_boxious"]),
           "pred_masks": torch.zeros(1, 110, 256, 256)}
    s = select_instance(out)
    np.testing.assert_array_equal(s["nms_keep"].numpy(), golden["r1_nms_keep_last"])
    np.testing.assert_array_equal(s["inst_fg_query_ids"].numpy(), golden["r1_inst_fg_query_ids_last"])
    np.testing.assert_array_equal(s["inst_pred_classes"].numpy(), golden["r1_inst_pred_classes_last"])
    assert s["selected_instance_index"] == int(golden["r1_selected_instance_index_last"])
    assert s["query_index"] == int(golden["r1_selected_fg_query_id_last"])
    np.testing.assert_allclose(s["box_xyxy"].numpy(), golden["r1_final_box"], rtol=0, atol=1e-4)


def test_mask_from_logits_matches_golden(golden):
    m = mask_from_logits(torch.from_numpy(golden["r1_selected_query_mask_logits_256"])).numpy()
    assert m.shape == (1024, 1024) and m.dtype == bool
    np.testing.assert_array_equal(m, _unpack(golden["r1_final_mask_packed"]))


def _naive_ms_deform_attn(value, shapes, loc, attw):
    n, _, m, d = value.shape
    _, lq, _, nl, npt, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(n):
        for q in range(lq):
            for h_ in range(m):
                for l in range(nl):
                    hh, ww = shapes[l]
                    v = value[b, starts[l]:starts[l + 1], h_].double().view(hh, ww, d)
                    for p in range(npt):
                        x = loc[b, q, h_, l, p, 0].item() * ww - 0.5
                        y = loc[b, q, h_, l, p, 1].item() * hh - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        acc = torch.zeros(d, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < hh and 0 <= xx < ww:
                                    acc += wy * wx * v[yy, xx]
                        out[b, q, h_] += attw[b, q, h_, l, p].item() * acc
    return out.view(n, lq, m * d)


def test_ms_deform_attn_matches_naive_bilinear():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 4), (2, 2)]
    n, m, d, lq, npt = 2, 2, 3, 5, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), npt, 2, generator=g) * 1.4 - 0.2   # some samples fall outside
    attw = torch.rand(n, lq, m, len(shapes), npt, generator=g)
    attw = (attw.flatten(-2).softmax(-1)).view_as(attw)
    got = ms_deform_attn(value, shapes, loc, attw)
    ref = _naive_ms_deform_attn(value, shapes, loc, attw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- with weights
def test_state_dict_keys_and_strict_load(golden_state_dict):
    hipie_keys = {k[len(CHECKPOINT_PREFIX):] for k in golden_state_dict if k.startswith(CHECKPOINT_PREFIX)}
    pats = [re.compile(p) for p in IGNORED_KEY_PATTERNS]
    expected = {k for k in hipie_keys if not any(p.search(k) for p in pats)}
    m = HipieMaskDecoder()
    assert set(m.state_dict().keys()) == expected
    m.load_state_dict(hipie_state_dict_from_checkpoint(golden_state_dict), strict=True)
    # shared heads: one object, both key sets
    assert m.detr.detr.transformer.decoder.bbox_embed is m.detr.detr.bbox_embed
    assert m.detr.detr.transformer.decoder.class_embed is m.detr.detr.class_embed
    # default gammas are the constructor value 1/6, not the stored ones
    b = m.detr.detr.transformer.encoder.vl_layers[0].b_attn
    assert torch.all(b.gamma_v == 1.0 / 6.0) and torch.all(b.gamma_l == 1.0 / 6.0)
    # stored gammas on request
    m2 = HipieMaskDecoder(use_stored_gammas=True)
    m2.load_state_dict(hipie_state_dict_from_checkpoint(golden_state_dict, use_stored_gammas=True), strict=True)
    key = "detr.detr.transformer.encoder.vl_layers.0.b_attn.gamma_v"
    assert torch.equal(m2.state_dict()[key], golden_state_dict[CHECKPOINT_PREFIX + key])
    assert len(ignored_key_patterns(True)) == len(IGNORED_KEY_PATTERNS) - 1


def test_backbone_feature_stats(run, golden):
    for i, f in enumerate(run["res"]):
        assert tuple(f.shape[1:]) == tuple(golden[f"r1_backbone_feat{i}_shape"])
        stats = np.array([f.mean().item(), f.std().item(), f.abs().max().item()])
        np.testing.assert_allclose(stats, golden[f"r1_backbone_feat{i}_stats"], rtol=1e-4)
    assert [tuple(f.shape) for f in run["feats"]] == [(1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32),
                                                     (1, 256, 16, 16)]


def test_raw_outputs_component(run, golden):
    out = run["out"]
    assert out["pred_logits"].shape == (2, 110, 8) and out["pred_boxes"].shape == (2, 110, 4)
    assert out["pred_boxious"].shape == (2, 110, 1) and out["pred_masks"].shape == (2, 110, 256, 256)
    _close("logits", out["pred_logits"][0], golden["comp_raw_pred_logits"])
    _close("boxes", out["pred_boxes"][0], golden["comp_raw_pred_boxes"])
    _close("ious", out["pred_boxious"][0], golden["comp_raw_pred_boxious"])
    ids = torch.from_numpy(golden["comp_mask_query_ids"])
    _close("mask logits (subset)", out["pred_masks"][0, ids], golden["comp_mask_logits_subset"])
    pooled = out["pred_masks"][0].reshape(110, 32, 8, 32, 8).mean((2, 4))
    _close("mask logits (all queries, 8x8 pooled)", pooled, golden["comp_mask_logits_pool8"])


def test_raw_outputs_round1(run, golden):
    out = run["out"]
    _close("r1 logits", out["pred_logits"][1:], golden["r1_raw_pred_logits"])
    _close("r1 boxes", out["pred_boxes"][1:], golden["r1_raw_pred_boxes"])
    _close("r1 ious", out["pred_boxious"][1:], golden["r1_raw_pred_boxious"])


def test_selection_component(run, golden):
    s = select_instance(run["out"], index=0)
    assert s["query_index"] == int(golden["comp_selected_fg_query_id"])
    np.testing.assert_array_equal(s["nms_keep"].numpy(), golden["comp_nms_keep"])
    np.testing.assert_allclose(s["box_xyxy"].numpy(), golden["comp_selected_box_xyxy_1024"], rtol=0, atol=1e-3)
    assert _iou(mask_from_logits(s["mask_logits"]).numpy(), _unpack(golden["comp_selected_mask_1024_packed"])) >= 0.999


def test_selection_round1(run, golden):
    s = select_instance(run["out"], index=1)
    assert s["query_index"] == int(golden["r1_selected_fg_query_id_last"])
    np.testing.assert_array_equal(s["nms_keep"].numpy(), golden["r1_nms_keep_last"])
    np.testing.assert_allclose(s["box_xyxy"].numpy(), golden["r1_final_box"], rtol=0, atol=1e-3)
    _close("r1 selected mask logits", s["mask_logits"], golden["r1_selected_query_mask_logits_256"])
    assert _iou(mask_from_logits(s["mask_logits"]).numpy(), _unpack(golden["r1_final_mask_packed"])) >= 0.999
