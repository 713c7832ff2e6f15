"""All parts of the released SegLLM as one PyTorch module (the reference every backend is checked against)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hipie.model import HipieMaskDecoder
from .llm import LanguageModel
from .projectors import MLPProjector, SegHead
from .vision import ClipVisionTower, MaskEncoder, VisionEncoder


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the package needs to know about a loaded model."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    clip_hidden: int
    clip_image_size: int
    image_tokens: int  # patch tokens per image (256 for CLIP-L/14 at 224)
    max_context: int  # tokens (tokenizer model_max_length; 2048 for the release)
    video_token_id: int
    seg_token_id: int
    eos_token_id: int
    dtype: str

    def kv_bytes_per_token(self, itemsize: int | None = None) -> int:
        item = itemsize or torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * item


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
