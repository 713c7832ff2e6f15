"""The torch backend against the original research code's outputs (tests/golden), both session modes.

Each mode runs the 3-round golden conversation once (module-scoped); the tests compare every
intermediate the fixture has: prompt ids, inputs_embeds (CLIP features + placeholders), LLM hidden
states, seg-head in/out, HIPIE raw outputs, selection, masks, boxes and the crop for the next round.
"""
import numpy as np
import pytest
import torch

from conftest import GOLDEN_QUESTIONS

REL = 1e-4


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


@pytest.fixture(scope="module", params=[True, False], ids=["reuse", "no_reuse"])
def run(request, golden_model, golden_image):
    s = golden_model.session(golden_image, reuse=request.param, trace=True)
    results = [s.ask(q) for q in GOLDEN_QUESTIONS]
    return request.param, s, results


@pytest.mark.parametrize("r", [1, 2, 3])
def test_prompt_ids(run, golden_rounds, r):
    _, _, res = run
    assert res[r - 1].trace["input_ids"] == golden_rounds[r]["input_ids"].tolist()


@pytest.mark.parametrize("r", [1, 2, 3])
def test_llm_inputs_and_hidden_states(run, golden_rounds, r):
    reuse, _, res = run
    g = golden_rounds[r]
    tr = res[r - 1].trace
    start = len(g["input_ids"]) - tr["inputs_embeds"].shape[0]  # reuse: only this round's rows were computed
    assert start == (len(golden_rounds[r - 1]["input_ids"]) if reuse and r > 1 else 0)
    assert rel_err(tr["inputs_embeds"], g["llm_inputs_embeds"][start:]) < REL
    assert rel_err(tr["hidden"], g["llm_last_hidden_state"][start:]) < REL


@pytest.mark.parametrize("r", [1, 2, 3])
def test_seg_head(run, golden_rounds, r):
    reuse, _, res = run
    g = golden_rounds[r]
    tr = res[r - 1].trace
    rows = slice(-1, None) if reuse else slice(None)
    assert tr["seg_in"].shape[0] == (1 if reuse else r)
    assert rel_err(tr["seg_in"], g["seg_predictor_in"][rows]) < REL
    assert rel_err(tr["seg_out"].reshape(tr["seg_out"].shape[0], -1), g["seg_predictor_out"][rows]) < REL


@pytest.mark.parametrize("r", [1, 2, 3])
def test_hipie_raw_outputs(run, golden_rounds, r):
    reuse, _, res = run
    g = golden_rounds[r]
    raw = res[r - 1].trace["raw"]
    rows = slice(-1, None) if reuse else slice(None)
    assert rel_err(raw["pred_logits"], g["hipie_raw_pred_logits"][rows]) < REL
    assert rel_err(raw["pred_boxious"], g["hipie_raw_pred_boxious"][rows]) < REL
    # boxes: +inf-logit proposals make some boxes large; compare absolutely in normalised units
    assert np.abs(raw["pred_boxes"].numpy() - g["hipie_raw_pred_boxes"][rows]).max() < 1e-4


@pytest.mark.parametrize("r", [1, 2, 3])
def test_selection_mask_and_box(run, golden_rounds, r):
    _, _, res = run
    g = golden_rounds[r]
    out = res[r - 1]
    assert out.query_index == int(g["selected_fg_query_id_last"])
    assert rel_err(out.mask_logits, g["selected_query_mask_logits_256"]) < REL
    assert iou(out.model_mask, g["final_mask"]) >= 0.999
    assert np.abs(out.model_box - g["final_box"]).max() < 1e-2  # px in the 1024 frame
    assert out.mask.shape == (480, 640) and out.model_mask.shape == (1024, 1024)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_crop_for_next_round(run, golden_rounds, r):
    _, _, res = run
    g = golden_rounds[r]
    tr = res[r - 1].trace
    crop = g["masked_crop_uint8"]
    h, w = crop.shape[:2]
    assert tr["crop"].shape[:2] == (max(h, w), max(h, w))
    assert np.array_equal(tr["crop"][:h, :w], crop)
    assert not tr["crop"][h:].any() and not tr["crop"][:, w:].any()
    assert np.allclose(tr["bbox_vec"], g["next_bbox_encode"], atol=1e-7)


def test_original_size_mapping(run):
    _, s, res = run
    r = res[0]
    h, w = s.rgb.shape[:2]
    assert r.mask.shape == (h, w)
    assert 0 <= r.box[0] <= r.box[2] <= w and 0 <= r.box[1] <= r.box[3] <= h
    # nearest-exact from the resized (768x1024) area of the frame
    ys = ((np.arange(h) + 0.5) * 768 / h).astype(int)
    xs = ((np.arange(w) + 0.5) * 1024 / w).astype(int)
    assert np.array_equal(r.mask, r.model_mask[ys][:, xs])


def test_timings_and_memory_are_reported(run):
    reuse, s, res = run
    for r in res:
        assert {"llm_prefill", "seg_head", "mask_decoder", "postprocess", "crop"} <= set(r.timings)
        assert all(v >= 0 for v in r.timings.values())
        assert r.memory["session_state"] > 0
    if reuse:
        assert "vision_encoder" in res[0].timings and "vision_encoder" not in res[2].timings
        assert "mask_backbone" not in res[1].timings
        assert res[0].memory["kv_cache"] == s.backend.info.kv_bytes_per_token() * res[0].context_tokens
        assert res[2].new_tokens == len(s.rounds[2].ids) < 30
    else:
        assert all("vision_encoder" in r.timings and "mask_backbone" in r.timings for r in res)
        assert res[2].new_tokens == res[2].context_tokens
