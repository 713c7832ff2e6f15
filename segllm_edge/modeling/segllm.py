"""All parts of the released SegLLM as one PyTorch module (the reference every backend is checked against)."""
from __future__ import annotations

from torch import nn

from .hipie.model import HipieMaskDecoder
from .llm import LanguageModel
from .projectors import MLPProjector, SegHead
from .vision import ClipVisionTower, MaskEncoder, VisionEncoder


class SegLLMModel(nn.Module):
    """Vision tower + projector + box encoder + LLM + seg head + HIPIE, with the checkpoint's key layout
    (after :data:`segllm_edge.modeling.loader.KEY_ROUTES`)."""

    def __init__(self, clip_config, llama_config, select_layer: int = -2, use_stored_gammas: bool = False):
        super().__init__()
        h = llama_config.hidden_size
        self.tower = ClipVisionTower(clip_config, select_layer=select_layer)
        self.projector = MLPProjector(clip_config.hidden_size, h, h)
        self.box_encoder = nn.Linear(4, h)
        self.llm = LanguageModel(llama_config)
        self.seg_head = SegHead(h)
        self.hipie = HipieMaskDecoder(use_stored_gammas=use_stored_gammas)

    # Composite views used by the runtime and the exporter (not registered: they share weights).
    @property
    def vision_encoder(self) -> VisionEncoder:
        return VisionEncoder(self.tower, self.projector)

    @property
    def mask_encoder(self) -> MaskEncoder:
        return MaskEncoder(self.tower, self.projector, self.box_encoder)
