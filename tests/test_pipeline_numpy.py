"""The runtime's numpy pipeline against the PyTorch reference and the research code's outputs (tests/golden):
instance selection, mask post-process (upsample, threshold, nearest-exact resize, box)."""
import numpy as np
import pytest
import torch

from segllm_edge.modeling import mask_postprocess as ref_pp
from segllm_edge.modeling.hipie import selection as ref_sel
from segllm_edge.pipeline import masks as np_pp
from segllm_edge.pipeline import selection as np_sel


@pytest.mark.parametrize("r", [1, 2, 3])
def test_selection_matches_reference_and_golden(golden_rounds, r):
    g = golden_rounds[r]
    raw = {k: g[f"hipie_raw_{k}"][-1:] for k in ("pred_logits", "pred_boxes", "pred_boxious")}
    got = np_sel.select_instance(raw)
    want = ref_sel.select_instance({**{k: torch.from_numpy(v) for k, v in raw.items()},
                                    "pred_masks": torch.zeros(1, raw["pred_logits"].shape[1], 256, 256)})
    assert got["query_index"] == want["query_index"] == int(g["selected_fg_query_id_last"])
    np.testing.assert_array_equal(got["nms_keep"], want["nms_keep"].numpy())
    np.testing.assert_array_equal(got["inst_fg_query_ids"], want["inst_fg_query_ids"].numpy())
    np.testing.assert_allclose(got["inst_scores"], want["inst_scores"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["box_xyxy"], want["box_xyxy"].numpy(), rtol=0, atol=1e-3)
    assert np.abs(got["box_xyxy"] - g["final_box"]).max() < 1e-2


def test_mask_row_picks_the_selected_query():
    masks = np.arange(2 * 110 * 4 * 4, dtype=np.float32).reshape(2, 110, 1, 4, 4)
    np.testing.assert_array_equal(np_sel.mask_row(masks, -1, 3), masks[1, 13, 0])
    np.testing.assert_array_equal(np_sel.mask_row(torch.from_numpy(masks), 0, 0), masks[0, 10, 0])
    row = np_sel.mask_row(masks, -1, 3)     # kept by every round result: must not hold all of pred_masks alive
    assert row.base is None or row.base.nbytes == row.nbytes


@pytest.mark.parametrize("r", [1, 2, 3])
def test_postprocess_matches_reference_on_golden_logits(golden_rounds, r):
    logits = golden_rounds[r]["selected_query_mask_logits_256"].astype(np.float32)
    got = np_pp.postprocess_mask(logits, (768, 1024), (480, 640))
    want = ref_pp.postprocess_mask(torch.from_numpy(logits), (768, 1024), (480, 640))
    up, up_ref = np_pp.upsample_logits(logits), ref_pp.upsample_logits(torch.from_numpy(logits)).numpy()
    assert np.abs(up - up_ref).max() < 1e-4
    for k in ("model_mask", "mask", "mask_box"):
        np.testing.assert_array_equal(got[k], want[k].numpy())


def test_postprocess_random_logits_and_sizes():
    rng = np.random.default_rng(1)
    for input_hw, orig_hw in [((768, 1024), (48, 64)), ((1024, 512), (2000, 1000)), ((37, 1024), (5, 140)),
                              ((1024, 1024), (1024, 1024))]:
        logits = rng.normal(size=(256, 256)).astype(np.float32)
        got = np_pp.postprocess_mask(logits, input_hw, orig_hw)
        want = ref_pp.postprocess_mask(torch.from_numpy(logits), input_hw, orig_hw)
        agree = (got["model_mask"] == want["model_mask"].numpy()).mean()
        assert agree > 1 - 1e-5          # sign flips only for |logit| ~ 1e-7 (summation order)
        assert got["mask"].shape == tuple(orig_hw)


@pytest.mark.parametrize("out,inp", [(480, 768), (640, 1024), (2000, 1000), (7, 1024), (1024, 1), (999, 1000)])
def test_nearest_exact_index_is_torchs(out, inp):
    np.testing.assert_array_equal(np_pp.nearest_exact_index(out, inp), ref_pp.nearest_exact_index(out, inp).numpy())


def test_box_to_original():
    b = np_pp.box_to_original(np.array([100.0, 50.0, 1055.7, 800.0]), (768, 1024), (480, 640))
    assert b.dtype == np.float32 and np.allclose(b, [62.5, 31.25, 640.0, 480.0])
