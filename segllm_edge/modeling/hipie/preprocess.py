"""HIPIE input preprocessing, as the released SegLLM code does it.

SAM's ``ResizeLongestSide(1024)`` (bilinear PIL resize of the uint8 RGB image, new size
``int(dim * 1024 / max(h, w) + 0.5)``), zero padding bottom/right to 1024x1024, then
``(x - mean) / std`` over the whole padded frame (the padding is normalised too; HIPIE
gets no padding mask).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMG_SIZE = 1024
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_hw(h: int, w: int, target: int = IMG_SIZE) -> tuple[int, int]:
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def hipie_preprocess(rgb_uint8_hwc: np.ndarray):
    """Return ``(normalized (1,3,1024,1024) float32 tensor, resized_padded_uint8 (1024,1024,3) ndarray, (h, w))``.

    ``(h, w)`` is the resized size before padding (the valid area of the 1024 frame).
    """
    img = np.asarray(rgb_uint8_hwc)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    nh, nw = resized_hw(h, w)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    padded = np.zeros((IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    padded[:nh, :nw] = resized
    x = torch.from_numpy(padded).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    normalized = ((x - mean) / std).unsqueeze(0).contiguous()
    return normalized, padded, (nh, nw)
