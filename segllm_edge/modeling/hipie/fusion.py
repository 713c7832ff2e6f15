"""Bidirectional vision-language fusion block (GLIP ``BiAttentionBlockForCheckpoint``) run before encoder layer 0.

Maths of the research code (per head h, visual tokens v after LayerNorm, language tokens l after LayerNorm):
    logits_h = (v Wq_h + bq_h) * d^-0.5 . (l Wk_h + bk_h)^T               (S x T), clamped to +-50000
    delta_v  = out_v( softmax_T(logits_h) (l Wvl_h + bvl_h) )              visual attends to the T text tokens
    delta_l  = out_l( softmax_S(logits_h^T) (v Wvv_h + bvv_h) )            text attends to all S visual tokens
    v' = v + gamma_v * delta_v ;  l' = l + gamma_l * delta_l
(The released call passes an all-ones text mask, which only adds the constant 1 to every logit: a no-op for softmax.)

Because T=8 and the visual projections are shared by every conditioning row, the big (S x 2048) projections are
folded into small per-row matrices (exact same linear maps, different summation order):
    logits_h = v (Wq_h^T k_h^T) + bq_h k_h^T        delta_v = sum_h P_h (vl_h Wout_h^T) + b_out
    softmax_S(...)  (v Wvv_h^T + bvv_h) = (P_l_h v) Wvv_h^T + bvv_h      (rows of P_l sum to 1)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BiMultiHeadAttention(nn.Module):
    def __init__(self, v_dim: int = 256, l_dim: int = 768, embed_dim: int = 2048, num_heads: int = 8):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)

    def forward(self, v: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v: (Bv, S, v_dim) with Bv in {1, N} (shared visual tokens broadcast); l: (N, T, l_dim).

        Returns delta_v (N, S, v_dim), delta_l (N, T, l_dim).
        """
        n, t, _ = l.shape
        m, dh = self.num_heads, self.head_dim
        s = v.shape[1]
        key = self.l_proj(l).view(n, t, m, dh)                       # N,T,M,dh
        val_l = self.values_l_proj(l).view(n, t, m, dh)              # N,T,M,dh
        wq = self.v_proj.weight.view(m, dh, -1)                       # M,dh,Cv
        bq = self.v_proj.bias.view(m, dh)
        # logits = ((v Wq^T + bq) * scale) k^T  ->  v (Wq^T k^T) * scale + (bq k^T) * scale
        kq = torch.einsum("mdc,ntmd->ncmt", wq, key) * self.scale     # N,Cv,M,T
        kb = torch.einsum("md,ntmd->nmt", bq, key) * self.scale        # N,M,T
        logits = torch.matmul(v, kq.reshape(n, -1, m * t)).view(n, s, m, t) + kb.unsqueeze(1)  # N,S,M,T
        logits = logits.clamp(min=-50000.0, max=50000.0)

        # visual <- text
        p_v = logits.softmax(dim=-1)                                  # N,S,M,T
        wo = self.out_v_proj.weight.view(-1, m, dh)                   # Cv,M,dh
        vo = torch.einsum("ntmd,cmd->nmtc", val_l, wo)                 # N,M,T,Cv
        delta_v = torch.matmul(p_v.reshape(n, s, m * t), vo.reshape(n, m * t, -1)) + self.out_v_proj.bias

        # text <- visual (softmax over the S visual tokens; the research code subtracts the max first: same softmax)
        p_l = logits.softmax(dim=1)                                   # N,S,M,T
        pooled = torch.einsum("nsmt,bsc->nmtc", p_l, v) if v.shape[0] == 1 else torch.einsum("nsmt,nsc->nmtc", p_l, v)
        wvv = self.values_v_proj.weight.view(m, dh, -1)               # M,dh,Cv
        out_l = torch.einsum("nmtc,mdc->ntmd", pooled, wvv) + self.values_v_proj.bias.view(1, 1, m, dh)
        delta_l = self.out_l_proj(out_l.reshape(n, t, m * dh))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    """Pre-LN bidirectional attention with layer-scale gammas.

    The research constructor sets gamma_v = gamma_l = init_values = 1 / ENC_LAYERS = 1/6. The checkpoint stores
    trained gammas, but the released loader never loads them (transformers renames keys containing ``gamma``), so
    the released model runs with 1/6. ``use_stored_gammas=True`` registers them as parameters to be loaded instead.
    """

    def __init__(self, v_dim: int = 256, l_dim: int = 768, embed_dim: int = 2048, num_heads: int = 8,
                 init_values: float = 1.0 / 6.0, use_stored_gammas: bool = False):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads)
        gv = init_values * torch.ones(v_dim)
        gl = init_values * torch.ones(l_dim)
        if use_stored_gammas:
            self.gamma_v = nn.Parameter(gv)
            self.gamma_l = nn.Parameter(gl)
        else:
            self.register_buffer("gamma_v", gv, persistent=False)
            self.register_buffer("gamma_l", gl, persistent=False)

    def forward(self, v: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l)
        return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l


class VLFuse(nn.Module):
    """Key holder: ``vl_layers.0.b_attn.*``."""

    def __init__(self, use_stored_gammas: bool = False):
        super().__init__()
        self.b_attn = BiAttentionBlock(use_stored_gammas=use_stored_gammas)

    def forward(self, v: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b_attn(v, l)
