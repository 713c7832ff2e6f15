"""What every backend, the exporter and the Triton models know about a model: :class:`ModelInfo`.

Written into each export's manifest (``manifest.model``) and read back without the PyTorch model.
"""
from __future__ import annotations

from dataclasses import dataclass

# bytes per element of the dtype names ModelInfo.dtype takes (torch dtype names; numpy has no bfloat16)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
        item = itemsize or DTYPE_BYTES[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * item
