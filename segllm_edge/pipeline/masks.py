"""From the selected query's 256x256 logits to the masks users get, and the crop the next round encodes (numpy).

The runtime's implementation; :mod:`segllm_edge.modeling.mask_postprocess` is the PyTorch reference it is
tested against (and the fused Triton kernel in :mod:`segllm_edge.kernels` reads the same index tables):

* ``model_mask``: bilinear x4 (align_corners=False) to the 1024x1024 frame, ``sigmoid > 0.5`` (``logit > 0``),
  kept as the full padded frame like the research code;
* ``mask``: the frame cut to the resized image area ``[:h, :w]`` and resized to the original (H, W) with
  nearest-exact sampling (PIL-compatible);
* :func:`masked_crop`: the research code's crop for the next round's mask token.
"""
from __future__ import annotations

import functools

import numpy as np

FRAME = 1024
LOGITS = 256


@functools.lru_cache(maxsize=4)
def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) float32 weights of 1-D bilinear resizing with align_corners=False (torch's formula)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0).astype(np.float32)
    m = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


def upsample_logits(mask_logits_256: np.ndarray) -> np.ndarray:
    """(256,256) → (1024,1024) bilinear, align_corners=False (separable: two small matrix products)."""
    x = np.asarray(mask_logits_256, dtype=np.float32).reshape(mask_logits_256.shape[-2:])
    a = _bilinear_matrix(FRAME, x.shape[0])
    b = _bilinear_matrix(FRAME, x.shape[1])
    return a @ x @ b.T


@functools.lru_cache(maxsize=64)
def nearest_exact_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output pixel for nearest-exact resizing, floor((i + 0.5) * in / out) in float32
    arithmetic as torch's ``F.interpolate(mode="nearest-exact")`` computes it (bit-identical, ties included)."""
    out_size, in_size = int(out_size), int(in_size)
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be >= 1, got out={out_size}, in={in_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    idx = np.minimum(idx, in_size - 1)
    idx.setflags(write=False)
    return idx


def mask_bbox(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (x1, y1 exclusive) of the True pixels, or all -1 when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.full((4,), -1, dtype=np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)


def check_hw(input_hw, orig_hw) -> tuple[int, int, int, int]:
    h, w = int(input_hw[0]), int(input_hw[1])
    H, W = int(orig_hw[0]), int(orig_hw[1])
    if not (1 <= h <= FRAME and 1 <= w <= FRAME):
        raise ValueError(f"input_hw must lie in [1, {FRAME}], got {(h, w)}")
    if H < 1 or W < 1:
        raise ValueError(f"orig_hw must be positive, got {(H, W)}")
    return h, w, H, W


def postprocess_mask(mask_logits_256: np.ndarray, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> dict:
    """Selected logits → ``model_mask`` (1024² bool), ``mask`` (H×W bool), ``mask_box`` (tight box of ``mask``).

    ``input_hw`` is the (h, w) of the image after the longest-side resize (before the zero padding),
    ``orig_hw`` the original (H, W). ``mask_box`` is int64 xyxy with x1, y1 exclusive, all -1 if empty.
    """
    h, w, H, W = check_hw(input_hw, orig_hw)
    model_mask = upsample_logits(mask_logits_256) > 0  # == sigmoid(.) > 0.5 up to fp32 rounding of sigmoid
    mask = model_mask[nearest_exact_index(H, h)][:, nearest_exact_index(W, w)]
    return {"model_mask": model_mask, "mask": mask, "mask_box": mask_bbox(mask)}


def box_to_original(box_xyxy_1024, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """Scale a 1024-frame xyxy box per axis (x by W/w, y by H/h) to the original image and clip it to the image."""
    h, w, H, W = check_hw(input_hw, orig_hw)
    b = np.array(box_xyxy_1024, dtype=np.float64).reshape(4)
    b[0::2] = np.clip(b[0::2] * (W / w), 0, W)
    b[1::2] = np.clip(b[1::2] * (H / h), 0, H)
    return b.astype(np.float32)


def crop_box(box_xyxy_1024) -> tuple[int, int, int, int]:
    """The research code's integer crop box: truncate, clip to [0, 1024], at least 2 px (then clip again)."""
    x0, y0, x1, y1 = (min(max(int(float(v)), 0), FRAME) for v in box_xyxy_1024)  # int() truncates toward zero
    x1 = min(max(x1, x0 + 2), FRAME)
    y1 = min(max(y1, y0 + 2), FRAME)
    return x0, y0, x1, y1


def masked_crop(resized_padded: np.ndarray, model_mask: np.ndarray, box_xyxy_1024) -> tuple[np.ndarray, tuple, np.ndarray]:
    """The next round's mask-token input: the 1024-padded image zeroed outside the mask, cropped to the
    box, zero-padded to a square anchored top-left. Returns (square uint8, (x0,y0,x1,y1), [y0,x0,y1,x1]/1024).

    ``resized_padded`` is the (1024, 1024, C) uint8 HWC frame, ``model_mask`` the (1024, 1024) bool frame mask
    (numpy arrays, or torch tensors, read through their ``numpy()``).
    """
    img = np.asarray(resized_padded)
    mm = _host(model_mask)
    if img.ndim != 3 or img.shape[:2] != (FRAME, FRAME) or mm.shape != (FRAME, FRAME):
        raise ValueError(f"expected a ({FRAME},{FRAME},C) image and a ({FRAME},{FRAME}) mask, got {img.shape}, {mm.shape}")
    x0, y0, x1, y1 = crop_box(_host(box_xyxy_1024).reshape(-1).tolist())
    # cv2.bitwise_and(img, img, mask=mask) keeps masked pixels as-is and zeroes the rest
    crop = np.where(mm[y0:y1, x0:x1, None].astype(bool), img[y0:y1, x0:x1], 0).astype(np.uint8)
    side = max(x1 - x0, y1 - y0, 1)  # 0 only for a box starting at the frame edge, where the research code crashes
    square = np.zeros((side, side, img.shape[2]), dtype=np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    bbox_vec = np.array([y0, x0, y1, x1], dtype=np.float32) / np.float32(FRAME)  # row first: released quirk
    return square, (x0, y0, x1, y1), bbox_vec


def _host(x) -> np.ndarray:
    """A numpy view of ``x``; torch tensors (duck-typed, torch is never imported here) through ``numpy()``."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree (1.0)."""
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)
