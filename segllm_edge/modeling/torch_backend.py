"""The PyTorch backend: runs the reference :class:`SegLLMModel` behind the round loop's Backend protocol
(:mod:`segllm_edge.runtime.backend`). Takes numpy arrays (or tensors) in, returns tensors; the session reads
them through their ``numpy()``."""
from __future__ import annotations

import torch


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

    def _in(self, x, dtype=None) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device, dtype=dtype or self.dtype)

    @torch.inference_mode()
    def embed_tokens(self, ids):
        return self.model.llm.embed(torch.as_tensor(ids, dtype=torch.long).to(self.device))

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
        return self.model.hipie.backbone_features(self._in(image, torch.float32))

    @torch.inference_mode()
    def mask_decode(self, features, cond):
        return self.model.hipie.decode(features, self._in(cond, torch.float32))

    def memory_bytes(self):
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
