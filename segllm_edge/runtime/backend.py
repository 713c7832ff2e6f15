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


def _torch_of(x):
    """The torch module of a tensor ``x`` (already imported, since ``x`` exists), else None: runtime/ never imports
    torch itself."""
    import sys

    return sys.modules.get("torch") if hasattr(x, "detach") else None


def keep(x):
    """What the session holds between stages: a device backend's tensor as it is (it stays on its device), any
    other array as float32 numpy (:func:`host`)."""
    return x if hasattr(x, "detach") else host(x)


def like(x, ref):
    """``x`` (numpy or a tensor) as ``ref``'s kind: a float32 tensor on ``ref``'s device, or float32 numpy."""
    torch = _torch_of(ref)
    if torch is None:
        return host(x)
    return torch.as_tensor(x).to(device=ref.device, dtype=torch.float32)


def concat_rows(rows: list, width: int):
    """Rows (numpy and/or tensors) stacked along axis 0; on the device of the first tensor among them (one copy of
    the numpy parts, none of the tensors), numpy when there is none; ``(0, width)`` float32 numpy for no rows."""
    ref = next((r for r in rows if hasattr(r, "detach")), None)
    if ref is None:
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, width), dtype=np.float32)
    torch = _torch_of(ref)
    return torch.cat([like(r, ref) for r in rows], dim=0)


def row_index(rows, x):
    """Row numbers as an index of ``x``: int64 numpy, or an int64 tensor on a tensor's device."""
    torch = _torch_of(x)
    rows = np.asarray(rows, dtype=np.int64)
    return rows if torch is None else torch.as_tensor(rows, device=x.device)


def take_rows(x, rows):
    """``x[rows]`` for numpy or a tensor (the index moved to the tensor's device)."""
    return x[row_index(rows, x)]


def editable(x):
    """A float32 copy the caller may write into, of the array's own kind (a tensor stays on its device)."""
    torch = _torch_of(x)
    if torch is None:
        return np.array(x, dtype=np.float32)
    return x.detach().to(torch.float32).clone()


def host(x) -> np.ndarray:
    """``x`` as a float32 numpy array: numpy as is, a tensor (duck-typed; torch is never imported) via ``numpy()``."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
