"""CLIP vision tower (features of layer -2) and the two encoders built on it.

* :class:`VisionEncoder`: image → projected patch tokens (B, 256, H) — the 256 ``<video>`` rows of round 1.
* :class:`MaskEncoder`: masked crops + boxes → the 2 tokens per referenced mask (mask token, box token), × 0.5.

The CLIP blocks are transformers' own (``CLIPEncoder``); only the layers up to the
selected one run, since the released model never uses later layers or ``post_layernorm``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from .projectors import MLPProjector

CLIP_HEAD_DIM = 64  # every released CLIP ViT uses 64-wide heads
MASK_TOKEN_SCALE = 0.5  # eval-time scaling of mask and box tokens in the released model


def clip_config_from_weights(state: dict[str, torch.Tensor], prefix: str) -> CLIPVisionConfig:
    """Derive the CLIP vision config from the weights (the checkpoint only names a hub model)."""
    from ..errors import CheckpointError

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise CheckpointError(f"CLIP weight {key} is missing: cannot derive the vision tower's shape")
        return state[key]

    patch = get("embeddings.patch_embedding.weight")  # (hidden, 3, p, p)
    pos = get("embeddings.position_embedding.weight")  # (1 + (S/p)^2, hidden)
    hidden, _, p, _ = patch.shape
    side = round((pos.shape[0] - 1) ** 0.5)
    if side * side + 1 != pos.shape[0]:
        raise CheckpointError(f"CLIP position embedding has {pos.shape[0]} rows, not 1 + a square number")
    n_layers = 0
    while f"{prefix}encoder.layers.{n_layers}.self_attn.q_proj.weight" in state:
        n_layers += 1
    if n_layers == 0:
        raise CheckpointError(f"no CLIP encoder layers under {prefix}encoder.layers.*")
    inter = get("encoder.layers.0.mlp.fc1.weight").shape[0]
    if hidden % CLIP_HEAD_DIM:
        raise CheckpointError(f"CLIP hidden size {hidden} is not a multiple of the head dim {CLIP_HEAD_DIM}")
    return CLIPVisionConfig(
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        num_hidden_layers=n_layers,
        num_attention_heads=int(hidden) // CLIP_HEAD_DIM,
        patch_size=int(p),
        image_size=int(side * p),
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation="sdpa",
    )


class ClipVisionTower(nn.Module):
    """CLIP ViT returning ``hidden_states[select_layer]`` (default -2, before ``post_layernorm``)."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int = -2):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # loaded, never used
        n_states = config.num_hidden_layers + 1  # hidden_states[0] is the embedding output
        self.n_run = select_layer % n_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.encoder.layers[: self.n_run]:
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
        return h  # (B, 1 + patches, hidden)


class VisionEncoder(nn.Module):
    """CLIP-preprocessed image(s) (B,3,224,224) → projected patch tokens (B, patches, H)."""

    def __init__(self, tower: ClipVisionTower, projector: MLPProjector):
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values)[:, 1:])


class MaskEncoder(nn.Module):
    """Masked crops (K,3,224,224) + boxes (K,4) ``[y0,x0,y1,x1]/1024`` → (K, 2, H): mask token, box token, × 0.5."""

    def __init__(self, tower: ClipVisionTower, projector: MLPProjector, box_encoder: nn.Linear):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.box_encoder = box_encoder

    def forward(self, crops: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        mask_tok = self.projector(self.tower(crops)[:, :1]) * MASK_TOKEN_SCALE  # (K,1,H)
        box_tok = self.box_encoder(boxes.to(self.box_encoder.weight.dtype)).unsqueeze(1) * MASK_TOKEN_SCALE
        return torch.cat([mask_tok, box_tok], dim=1)
