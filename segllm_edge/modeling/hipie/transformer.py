"""Deformable encoder (with VL fusion before layer 0), two-stage proposals, DINO-style decoder with box refinement.

Everything here is float32 and shape-static: spatial shapes are Python ints fixed by the 1024x1024 input.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import ms_deform_attn  # Triton kernel on CUDA, grid_sample reference elsewhere (and in ONNX export)
from .fusion import VLFuse
from .heads import MLP, inverse_sigmoid
from .position import query_sine_embedding


class MSDeformAttn(nn.Module):
    #: the sampling core; export-time variants (segllm_edge/export/hipie_fast.py) swap in the same maths in other ops
    core = staticmethod(ms_deform_attn)

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], offset_normalizer: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N or 1, Lq, L or 1, 2|4) normalised; value_in (N, S, C).

        offset_normalizer: (L, 2) float (W, H) per level, needed for 2-d reference points.
        """
        n, lq, _ = query.shape
        m, l, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(n, value_in.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, l, p, 2)
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, l * p), -1).view(n, lq, m, l, p)
        if reference_points.shape[-1] == 2:
            loc = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer[None, None, None, :, None, :]
        else:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        out = self.core(value, spatial_shapes, loc, weights)
        return self.output_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 2048, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, offset_normalizer):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, offset_normalizer))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src), inplace=True)))


class Encoder(nn.Module):
    """``vl_layers.0`` (fusion before layer 0; layers 1..5 have none) + 6 deformable layers. No language layers."""

    def __init__(self, num_layers: int = 6, use_stored_gammas: bool = False):
        super().__init__()
        self.vl_layers = nn.ModuleList([VLFuse(use_stored_gammas)])
        self.layers = nn.ModuleList([EncoderLayer() for _ in range(num_layers)])

    def forward(self, src, pos, lang, reference_points, spatial_shapes, offset_normalizer):
        v, lang = self.vl_layers[0](src, lang)
        for layer in self.layers:
            v = layer(v, pos, reference_points, spatial_shapes, offset_normalizer)
        return v, lang


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 2048, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=0.0)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes):
        q = (tgt + query_pos).transpose(0, 1)
        tgt2 = self.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + tgt2)
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt), inplace=True)))


class Decoder(nn.Module):
    """6 layers, query_pos from the sine embedding of the current box, iterative refinement with ``bbox_embed[lid]``.

    ``bbox_embed``/``class_embed`` are assigned by the owner (the same ModuleLists as ``detr.detr.*``).
    """

    def __init__(self, num_layers: int = 6, d_model: int = 256):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer() for _ in range(num_layers)])
        self.num_layers = num_layers
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, tgt, reference_points, memory, spatial_shapes):
        """Returns (last hidden state, reference boxes fed to the last layer, refined boxes after the last layer)."""
        output = tgt
        ref_in = reference_points
        for lid, layer in enumerate(self.layers):
            ref_in = reference_points
            query_pos = self.ref_point_head(query_sine_embedding(ref_in))
            output = layer(output, query_pos, ref_in[:, :, None], memory, spatial_shapes)
            reference_points = (self.bbox_embed[lid](output) + inverse_sigmoid(ref_in)).sigmoid()
        return output, ref_in, reference_points


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Pixel-centre reference points of all tokens, (1, S, 1, 2) as (x, y) in [0, 1] (valid ratios are 1)."""
    refs = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32),
                                      torch.linspace(0.5, w - 0.5, w, dtype=torch.float32), indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    return torch.cat(refs, 0)[None, :, None, :]


def encoder_output_proposals(spatial_shapes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage anchor boxes (S, 4) in logit space and their validity (S, 1).

    Anchor = (pixel centre, 0.05 * 2**lvl) normalised; an anchor with any coordinate outside (0.01, 0.99) is
    invalid: its logit is +inf and its memory row is zeroed before ``enc_output``. With no padding mask this marks
    the border rows/columns of the 128x128 and 64x64 levels; such a proposal, if picked, starts at box (1,1,1,1).
    """
    proposals = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32),
                                        torch.linspace(0, w - 1, w, dtype=torch.float32), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.tensor([w, h], dtype=torch.float32).view(1, 1, 2)
        grid = (grid + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(-1, 4))
    props = torch.cat(proposals, 0)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    props = props.masked_fill(~valid, float("inf"))
    return props, valid


class DeformableTransformer(nn.Module):
    def __init__(self, spatial_shapes: Sequence[tuple[int, int]], d_model: int = 256, num_proposals: int = 100,
                 num_bg: int = 10, use_stored_gammas: bool = False):
        super().__init__()
        self.spatial_shapes = [tuple(int(v) for v in s) for s in spatial_shapes]
        self.num_proposals = num_proposals
        self.encoder = Encoder(use_stored_gammas=use_stored_gammas)
        self.decoder = Decoder()
        self.level_embed = nn.Parameter(torch.zeros(len(spatial_shapes), d_model))
        self.tgt_embed = nn.Embedding(num_proposals, d_model)
        self.tgt_embed_bg = nn.Embedding(num_bg, d_model)
        self.bg_query_refs = nn.Embedding(num_bg, 4)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        props, valid = encoder_output_proposals(self.spatial_shapes)
        self.register_buffer("output_proposals", props, persistent=False)
        self.register_buffer("proposal_valid", valid, persistent=False)
        self.register_buffer("enc_reference_points", encoder_reference_points(self.spatial_shapes), persistent=False)
        self.register_buffer("offset_normalizer",
                             torch.tensor([[w, h] for h, w in self.spatial_shapes], dtype=torch.float32),
                             persistent=False)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, lang: torch.Tensor) -> dict[str, torch.Tensor]:
        """src: (1, S, 256) flattened projected levels; pos: (1, S, 256) position + level embedding;
        lang: (N, T, 768) conditioning tokens."""
        n = lang.shape[0]
        memory, lang = self.encoder(src, pos, lang, self.enc_reference_points, self.spatial_shapes,
                                    self.offset_normalizer)
        # Two-stage proposals. The research code also computes tgt + 0.0 * resizer(mean(lang)): exactly tgt.
        out_mem = self.enc_output_norm(self.enc_output(memory.masked_fill(~self.proposal_valid, 0.0)))
        enc_class = self.decoder.class_embed[self.decoder.num_layers](out_mem)            # N,S,1
        topk = torch.topk(enc_class[..., 0], self.num_proposals, dim=1)[1]                  # N,K
        sel_mem = torch.gather(out_mem, 1, topk.unsqueeze(-1).expand(-1, -1, out_mem.shape[-1]))
        coords = self.decoder.bbox_embed[self.decoder.num_layers](sel_mem) + self.output_proposals[topk]
        reference_points = torch.cat([self.bg_query_refs.weight[None].expand(n, -1, -1), coords.sigmoid()], 1)
        tgt = torch.cat([self.tgt_embed_bg.weight, self.tgt_embed.weight], 0)[None].expand(n, -1, -1)
        hs, ref_last_in, boxes = self.decoder(tgt, reference_points, memory, self.spatial_shapes)
        return {"hs": hs, "ref_last_in": ref_last_in, "boxes": boxes, "memory": memory, "lang": lang,
                "topk_proposals": topk}
