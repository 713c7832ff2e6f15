"""HIPIE input preprocessing as a torch tensor, for the PyTorch reference (the implementation is numpy:
:func:`segllm_edge.pipeline.images.hipie_preprocess`)."""
from __future__ import annotations

import numpy as np
import torch

from ...pipeline import images


def hipie_preprocess(rgb_uint8_hwc: np.ndarray):
    """Return ``(normalized (1,3,1024,1024) float32 tensor, resized_padded_uint8 (1024,1024,3) ndarray, (h, w))``."""
    normalized, padded, hw = images.hipie_preprocess(rgb_uint8_hwc)
    return torch.from_numpy(normalized), padded, hw
