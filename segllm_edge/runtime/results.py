"""What one round returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoundResult:
    round: int                 # 1-based
    question: str              # without any [REF:k] suffix
    refs: tuple[int, ...]      # rounds whose masks this round refers to
    mask: np.ndarray           # (H, W) bool at the original image size
    box: np.ndarray            # (4,) float32 xyxy at the original image size (clipped to the image)
    model_mask: np.ndarray     # (1024, 1024) bool in the model's padded frame
    model_box: np.ndarray      # (4,) float32 xyxy in the 1024 frame (may exceed it, as the model predicts)
    mask_logits: np.ndarray    # (256, 256) float32 logits of the selected query
    score: float               # selection score of the chosen instance
    query_index: int           # foreground query (0..99) that won
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage
    new_tokens: int = 0        # tokens prefilled this round
    context_tokens: int = 0    # conversation length after this round
    memory: dict[str, int] = field(default_factory=dict)      # bytes: kv_cache, session_state, device (if known)
    trace: dict | None = None  # intermediates, when the session was opened with trace=True

    @property
    def empty(self) -> bool:
        return not bool(self.model_mask.any())

    def overlay(self, image: np.ndarray, color=None, alpha: float | None = None) -> np.ndarray:
        """The original image with this round drawn on it (HxWx3 uint8): the mask tinted in the round's colour
        (or ``color``), its outline, its box and its round number (:mod:`segllm_edge.drawing`)."""
        from ..drawing import FILL_ALPHA, draw_overlay, mark_of

        return draw_overlay(image, [mark_of(self)], color=color, alpha=FILL_ALPHA if alpha is None else alpha)
