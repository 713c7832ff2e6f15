"""Sine position embeddings used by HIPIE (DETR image embedding and DINO-style query embedding)."""
from __future__ import annotations

import math

import torch


def image_sine_embedding(h: int, w: int, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """``PositionEmbeddingSine(128, normalize=True)`` for an all-valid (no padding) map -> (2*num_pos_feats, h, w).

    Channels: first the y embedding, then x; within each, interleaved sin/cos of the same frequency.
    """
    scale = 2 * math.pi
    eps = 1e-6
    not_mask = torch.ones(1, h, w, dtype=torch.bool)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)[0]


def query_sine_embedding(pos: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """DINO ``get_sine_pos_embed`` with exchange_xy: (..., 4) boxes (cx, cy, w, h) -> (..., 4*128) in order y, x, w, h."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def sine(x: torch.Tensor) -> torch.Tensor:
        s = x * scale / dim_t
        return torch.stack((s[..., 0::2].sin(), s[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [sine(x) for x in pos.split(1, dim=-1)]
    parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)
