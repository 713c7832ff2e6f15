"""The PyTorch mask post-process (the runtime's CPU implementation) against the reference-run fixture.

``tests/golden/postprocess_cases.npz`` holds, per round r in 1..3 (trimmed from
``golden_shapes_a_round{r}.npz``): ``logits`` (selected_query_mask_logits_256), ``final_mask_packed``
(np.packbits of final_mask), ``final_box``, ``crop_box`` (next_crop_box_x0y0x1y1_int), ``bbox_vec``
(next_bbox_encode), ``masked_crop`` (masked_crop_uint8), ``input_size`` (hipie_input_size), and
``image_window`` = hipie_input_image_uint8 (HWC) on the crop box grown by 8 px, with its ``image_window_origin_yx``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segllm_edge.modeling.mask_postprocess import (
    FRAME, box_to_original, crop_box, mask_bbox, masked_crop, nearest_exact_index, postprocess_mask, upsample_logits,
)

ROUNDS = (1, 2, 3)
ORIG_HW = (480, 640)  # shapes_a.png


@pytest.fixture(scope="module")
def cases(golden_dir):
    data = np.load(golden_dir / "postprocess_cases.npz")
    out = {r: {} for r in ROUNDS}
    for k in data.files:
        r, name = k.split("/", 1)
        v = data[k]
        if name.endswith("_packed"):
            name, v = name[: -len("_packed")], np.unpackbits(v).astype(bool).reshape(FRAME, FRAME)
        out[int(r[1:])][name] = v
    return out


def _frame_image(case) -> np.ndarray:
    """A 1024² HWC frame equal to the golden input image on the window around the crop, noise elsewhere
    (non-zero, so a crop reaching outside the window would show)."""
    img = np.random.default_rng(0).integers(1, 256, size=(FRAME, FRAME, 3), dtype=np.uint8)
    y, x = (int(v) for v in case["image_window_origin_yx"])
    win = case["image_window"]
    img[y:y + win.shape[0], x:x + win.shape[1]] = win
    return img


@pytest.mark.parametrize("r", ROUNDS)
def test_final_mask_from_selected_logits(cases, r):
    c = cases[r]
    logits = torch.from_numpy(c["logits"])
    out = postprocess_mask(logits, tuple(c["input_size"]), ORIG_HW)
    mm = out["model_mask"].numpy()
    assert mm.shape == (FRAME, FRAME) and mm.dtype == bool
    bad = mm != c["final_mask"]
    up = upsample_logits(logits).numpy()
    # the research code thresholds sigmoid(x) > 0.5; we threshold x > 0: only |x| ~ 0 may differ
    assert bad.sum() == 0 or np.abs(up[bad]).max() < 1e-5, (int(bad.sum()), float(np.abs(up[bad]).max()))


@pytest.mark.parametrize("r", ROUNDS)
def test_logit_threshold_equals_sigmoid_threshold(cases, r):
    up = upsample_logits(torch.from_numpy(cases[r]["logits"]))
    diff = (torch.sigmoid(up) > 0.5) != (up > 0)
    # fp32 sigmoid rounds to exactly 0.5 for 0 < x < ~9e-8: the only possible disagreement
    assert not diff.any() or up[diff].abs().max() < 1e-7


@pytest.mark.parametrize("r", ROUNDS)
def test_masked_crop_matches_research_code(cases, r):
    c = cases[r]
    square, box, bbox_vec = masked_crop(_frame_image(c), c["final_mask"], c["final_box"])
    assert box == tuple(int(v) for v in c["crop_box"])
    gold = c["masked_crop"]
    h, w = gold.shape[:2]
    assert square.dtype == np.uint8 and square.shape == (max(h, w), max(h, w), 3)
    assert np.array_equal(square[:h, :w], gold)
    assert not square[h:].any() and not square[:, w:].any()
    assert bbox_vec.dtype == np.float32 and np.array_equal(bbox_vec, c["bbox_vec"])


@pytest.mark.parametrize("r", ROUNDS)
def test_masked_crop_from_our_mask(cases, r):
    """End to end on our side: logits → model_mask → crop equals the research code's crop."""
    c = cases[r]
    mm = postprocess_mask(torch.from_numpy(c["logits"]), tuple(c["input_size"]), ORIG_HW)["model_mask"]
    square, _, _ = masked_crop(_frame_image(c), mm, torch.from_numpy(c["final_box"]))
    h, w = c["masked_crop"].shape[:2]
    assert np.array_equal(square[:h, :w], c["masked_crop"])


def test_crop_box_rules():
    assert crop_box([957.9, 392.57, 1055.7, 543.3]) == (957, 392, 1024, 543)   # truncate, clip
    assert crop_box([-3.7, -0.5, 10.2, 1.9]) == (0, 0, 10, 2)                  # int(-0.5) == 0; min 2 px
    assert crop_box([100.2, 50.0, 100.9, 49.0]) == (100, 50, 102, 52)         # degenerate → 2 px
    assert crop_box([1023.5, 1023.0, 1030.0, 1100.0]) == (1023, 1023, 1024, 1024)  # re-clipped after +2
    assert crop_box(np.array([5.99, 6.01, 7.0, 9.99], dtype=np.float32)) == (5, 6, 7, 9)


def test_masked_crop_square_pad_and_bbox_vec():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(FRAME, FRAME, 3), dtype=np.uint8)
    mask = rng.random((FRAME, FRAME)) > 0.3
    square, box, vec = masked_crop(img, mask, np.array([10.7, 20.2, 40.9, 30.0]))
    assert box == (10, 20, 40, 30)
    assert square.shape == (30, 30, 3)
    expect = img[20:30, 10:40] * mask[20:30, 10:40, None]
    assert np.array_equal(square[:10, :30], expect) and not square[10:].any()
    assert np.array_equal(vec, np.array([20, 10, 30, 40], np.float32) / 1024)
    # tall box: padded on the right
    square, box, _ = masked_crop(img, torch.from_numpy(mask), torch.tensor([5.0, 0.0, 9.0, 50.0]))
    assert box == (5, 0, 9, 50) and square.shape == (50, 50, 3) and not square[:, 4:].any()


@pytest.mark.parametrize("out_size,in_size", [(480, 768), (640, 1024), (7, 3), (1367, 700), (100, 341), (1, 1024),
                                              (141, 6), (4000, 17)])
def test_nearest_exact_index_is_torch(out_size, in_size):
    ramp = torch.arange(in_size, dtype=torch.float32)[None, None, None, :]
    torch_idx = F.interpolate(ramp, size=(1, out_size), mode="nearest-exact")[0, 0, 0].long()
    assert torch.equal(nearest_exact_index(out_size, in_size), torch_idx)
    idx = nearest_exact_index(out_size, in_size)
    assert idx.min() >= 0 and idx.max() <= in_size - 1


@pytest.mark.parametrize("input_hw,orig_hw", [((768, 1024), (480, 640)), ((1024, 700), (2000, 1367)),
                                              ((300, 1024), (100, 341)), ((1024, 1024), (1024, 1024))])
def test_mask_is_nearest_exact_resize_of_crop(input_hw, orig_hw):
    g = torch.Generator().manual_seed(3)
    logits = F.avg_pool2d(torch.randn(1, 1, 256, 256, generator=g), 9, 1, 4)[0, 0] * 8
    out = postprocess_mask(logits, input_hw, orig_hw)
    h, w = input_hw
    crop = out["model_mask"][:h, :w].float()[None, None]
    expect = F.interpolate(crop, size=orig_hw, mode="nearest-exact")[0, 0] > 0.5
    assert out["mask"].shape == orig_hw and out["mask"].dtype == torch.bool
    assert torch.equal(out["mask"], expect)
    ys, xs = torch.nonzero(expect, as_tuple=True)
    assert out["mask_box"].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_empty_mask_box():
    out = postprocess_mask(torch.full((256, 256), -3.0), (768, 1024), (480, 640))
    assert not out["mask"].any() and out["mask_box"].tolist() == [-1, -1, -1, -1]
    assert mask_bbox(torch.zeros(3, 4, dtype=torch.bool)).tolist() == [-1, -1, -1, -1]


def test_upsample_is_torch_bilinear_and_threshold():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))
    up = upsample_logits(x)
    assert up.shape == (FRAME, FRAME)
    assert torch.equal(up, F.interpolate(x[None, None], scale_factor=4, mode="bilinear", align_corners=False)[0, 0])
    out = postprocess_mask(x, (1024, 1024), (1024, 1024))
    assert torch.equal(out["model_mask"], up > 0) and torch.equal(out["mask"], out["model_mask"])


def test_box_to_original():
    b = box_to_original(torch.tensor([100.0, 50.0, 1055.7, 800.0]), (768, 1024), (480, 640))
    assert b.dtype == torch.float32
    assert torch.allclose(b, torch.tensor([62.5, 31.25, 640.0, 480.0]))
    b = box_to_original(np.array([-5.0, 10.0, 20.0, 30.0], np.float32), (1024, 512), (2048, 1000))
    assert torch.allclose(b, torch.tensor([0.0, 20.0, 20.0 * 1000 / 512, 60.0]))


@pytest.mark.parametrize("bad", [((0, 10), (5, 5)), ((1025, 10), (5, 5)), ((10, 10), (0, 5))])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError):
        postprocess_mask(torch.zeros(256, 256), *bad)
