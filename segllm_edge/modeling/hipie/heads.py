"""Prediction heads: VL dot-product class head, box MLP, IoU head, encoder (two-stage) binary head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear -> ReLU -> ... -> Linear, keys ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class VLAlign(nn.Module):
    """GLIP-style token dot product (``VL_Align``): (B, Q, 256) x (B, T, 768) -> (B, Q, T) logits.

    tokens are L2-normalised; logit = q . proj(tok/2) / exp(log_scale) + tok . bias_lang + bias0, clamped to +-50000.
    """

    def __init__(self, hidden_dim: int = 256, lang_dim: int = 768):
        super().__init__()
        self.dot_product_projection_text = nn.Linear(lang_dim, hidden_dim)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
        self.bias0 = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(embedding, p=2, dim=-1)
        tokens = self.dot_product_projection_text(embedding / 2.0)                 # B,T,256
        tok_bias = torch.matmul(embedding, self.bias_lang) + self.bias0          # B,T
        logit = torch.matmul(x, tokens.transpose(-1, -2)) / self.log_scale.exp() + tok_bias.unsqueeze(1)
        return logit.clamp(min=-50000.0, max=50000.0)


class StillClassifier(nn.Module):
    """Encoder proposal head (STILL_CLS_FOR_ENCODER): Linear(256 -> 1), ignores the language."""

    def __init__(self, hidden_dim: int = 256):
        super().__init__()
        self.body = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HIPIE's ``inverse_sigmoid``: clamp to [0, 1], then log(max(x,eps) / max(1-x,eps))."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
