"""The small MLPs around the LLM: ``mm_projector``, ``segmentator_predictor``."""
from __future__ import annotations

import torch
from torch import nn

SEG_TOKENS = 8  # conditioning tokens per <seg>
SEG_TOKEN_DIM = 768  # their width (HIPIE's language dim)


class MLPProjector(nn.Sequential):
    """``Linear(in, hidden) → GELU → Linear(hidden, out)`` (``mlp2x_gelu``), keys ``0.*`` and ``2.*``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class SegHead(nn.Module):
    """``segmentator_predictor``: LLM hidden state (N, H) → (N, 8, 768) HIPIE conditioning."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = MLPProjector(hidden, hidden, SEG_TOKENS * SEG_TOKEN_DIM)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states).view(-1, SEG_TOKENS, SEG_TOKEN_DIM)
