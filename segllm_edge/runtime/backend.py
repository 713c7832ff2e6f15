"""What a backend provides to the round loop: one method per exported graph.

The session (:mod:`segllm_edge.runtime.session`) owns the conversation logic; a backend
only runs the stages. The torch backend runs :class:`SegLLMModel`; the onnxruntime
backend runs the exported graphs with the same signatures.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..modeling.segllm import ModelInfo
from ..modeling.tokenizer import SegLLMTokenizer


class KVCache(Protocol):
    """A growing KV cache of one conversation."""

    @property
    def length(self) -> int: ...

    def crop(self, length: int) -> None:
        """Drop everything after ``length`` tokens (used to undo a failed round)."""

    def nbytes(self) -> int: ...


class Backend(Protocol):
    name: str
    info: ModelInfo
    tokenizer: SegLLMTokenizer

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...            # (T,) → (T, H)
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...         # (B,3,224,224) → (B, 256, H)
    def encode_masks(self, crops: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor: ...  # (K,3,224,224),(K,4) → (K,2,H)
    def new_cache(self) -> KVCache: ...
    def llm(self, embeds: torch.Tensor, cache: KVCache | None) -> torch.Tensor: ...  # (1,T,H) → (1,T,H)
    def seg_head(self, hidden: torch.Tensor) -> torch.Tensor: ...             # (N,H) → (N,8,768)
    def mask_backbone(self, image: torch.Tensor) -> list[torch.Tensor]: ...   # (1,3,1024,1024) → 4 levels
    def mask_decode(self, features: list[torch.Tensor], cond: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def memory_bytes(self) -> int | None: ...                                  # device memory in use, if known


class TorchKVCache:
    def __init__(self, cache):
        self.cache = cache  # transformers DynamicCache

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count of tokens to drop

    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class TorchBackend:
    """Runs the PyTorch reference model (CPU or CUDA)."""

    name = "torch"

    def __init__(self, loaded, device: str | torch.device = "cpu"):
        self.loaded = loaded
        self.model = loaded.model.to(device)
        self.info = loaded.info
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        self.dtype = next(self.model.llm.parameters()).dtype
        self._vision = self.model.vision_encoder
        self._masks = self.model.mask_encoder

    def _in(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        return x.to(self.device, dtype=dtype or self.dtype)

    @torch.inference_mode()
    def embed_tokens(self, ids):
        return self.model.llm.embed(ids.to(self.device))

    @torch.inference_mode()
    def encode_image(self, pixels):
        return self._vision(self._in(pixels))

    @torch.inference_mode()
    def encode_masks(self, crops, boxes):
        return self._masks(self._in(crops), self._in(boxes))

    def new_cache(self):
        return TorchKVCache(self.model.llm.new_cache())

    @torch.inference_mode()
    def llm(self, embeds, cache):
        return self.model.llm(self._in(embeds), cache.cache if cache is not None else None)

    @torch.inference_mode()
    def seg_head(self, hidden):
        return self.model.seg_head(self._in(hidden))

    @torch.inference_mode()
    def mask_backbone(self, image):
        return self.model.hipie.backbone_features(image.to(self.device, torch.float32))

    @torch.inference_mode()
    def mask_decode(self, features, cond):
        return self.model.hipie.decode(features, cond.to(self.device, torch.float32))

    def memory_bytes(self):
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
