"""What a backend provides to the round loop: one method per exported graph.

The session (:mod:`segllm_edge.runtime.session`) owns the conversation logic, in numpy; a backend only
runs the stages. Inputs are numpy arrays. Outputs the session computes with (embeddings, image and mask
tokens, hidden states, the mask decoder's outputs) are numpy arrays or anything with ``numpy()`` (torch
tensors of the PyTorch backend, :mod:`segllm_edge.modeling.torch_backend`); the backbone features and the
seg head's conditioning are handed back to the same backend untouched, so they may stay on its device.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..contracts.model_info import ModelInfo
from ..pipeline.tokenizer import SegLLMTokenizer


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

    def embed_tokens(self, ids: np.ndarray) -> Any: ...                      # (T,) int64 → (T, H)
    def encode_image(self, pixels: np.ndarray) -> Any: ...                   # (B,3,224,224) → (B, 256, H)
    def encode_masks(self, crops: np.ndarray, boxes: np.ndarray) -> Any: ...  # (K,3,224,224),(K,4) → (K,2,H)
    def new_cache(self) -> KVCache: ...
    def llm(self, embeds: np.ndarray, cache: KVCache | None) -> Any: ...      # (1,T,H) → (1,T,H)
    def seg_head(self, hidden: np.ndarray) -> Any: ...                       # (N,H) → (N,8,768), opaque
    def mask_backbone(self, image: np.ndarray) -> list: ...                  # (1,3,1024,1024) → 4 levels, opaque
    def mask_decode(self, features: list, cond: Any) -> dict: ...            # → pred_logits/boxes/boxious/masks
    def memory_bytes(self) -> int | None: ...                                # device memory in use, if known


def host(x) -> np.ndarray:
    """``x`` as a float32 numpy array: numpy as is, a tensor (duck-typed; torch is never imported) via ``numpy()``."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
