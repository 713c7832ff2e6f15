"""CondInst-style mask head: shared mask branch on encoder memory + per-query dynamic 1x1 convs.

Mask branch (``MaskHeadSmallConv`` without FPN): levels are the encoder memory at strides 8/16/32 (128/64/32 px):
    x = relu(lay3(m32)); x = m16 + up_nearest(x); x = relu(lay4(x)); x = m8 + up_nearest(x)
    x = relu(jia_dcn(x)); x = relu(lay1(x)); x = relu(lay2(x))           -> (B, 8, 128, 128)
Dynamic head per query (169 params from ``controller``): input channels = [x_ref - x_loc, y_ref - y_loc, 8 feats]
in **pixels** of the 1024 frame (reference = the box centre fed to the last decoder layer, locations = 8*i + 4),
then 10->8 relu 8->8 relu 8->1, then ``aligned_bilinear`` x2 -> 256x256 logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_NUMS = (80, 64, 8)
BIAS_NUMS = (8, 8, 1)
NUM_GEN_PARAMS = sum(WEIGHT_NUMS) + sum(BIAS_NUMS)  # 169


class MaskHeadSmallConv(nn.Module):
    def __init__(self, dim: int = 256):
        super().__init__()
        self.lay1 = nn.Conv2d(dim, dim // 4, 3, padding=1)
        self.lay2 = nn.Conv2d(dim // 4, dim // 32, 3, padding=1)
        self.lay3 = nn.Conv2d(dim, dim, 3, padding=1)
        self.lay4 = nn.Conv2d(dim, dim, 3, padding=1)
        self.jia_dcn = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: memory maps at strides 8, 16, 32 -> (B, 8, H8, W8)."""
        x = F.relu(self.lay3(feats[2]))
        x = feats[1] + F.interpolate(x, size=feats[1].shape[-2:], mode="nearest")
        x = F.relu(self.lay4(x))
        x = feats[0] + F.interpolate(x, size=feats[0].shape[-2:], mode="nearest")
        x = F.relu(self.jia_dcn(x))
        x = F.relu(self.lay1(x))
        return F.relu(self.lay2(x))


def compute_locations(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """(H*W, 2) pixel (x, y) of each stride-``stride`` cell: stride*i + stride//2."""
    sx = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    sy = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1) + stride // 2


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """AdelaiDet's aligned bilinear upsampling (replicate pad, align_corners=True, shift by factor//2)."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, pad=(0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=True)
    x = F.pad(x, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, :oh - 1, :ow - 1]


def dynamic_mask_logits(mask_feats: torch.Tensor, ref_xy_px: torch.Tensor, params: torch.Tensor,
                        locations: torch.Tensor, out_factor: int = 2) -> torch.Tensor:
    """mask_feats (N, 8, H, W); ref_xy_px (N, Q, 2) instance centres in pixels; params (N, Q, 169);
    locations (H*W, 2). Returns (N, Q, factor*H, factor*W) logits.

    Same maths as the research code's grouped 1x1 convs, batched: the 8 feature channels are shared by all queries,
    so layer 0 is split into a (Q*8 x 8) x (8 x HW) matmul plus the 2 relative-coordinate channels.
    """
    n, c, h, w = mask_feats.shape
    q = params.shape[1]
    hw = h * w
    w0, w1, w2, b0, b1, b2 = torch.split(params, list(WEIGHT_NUMS) + list(BIAS_NUMS), dim=-1)
    w0 = w0.reshape(n, q, 8, c + 2)
    w1 = w1.reshape(n * q, 8, 8)
    w2 = w2.reshape(n * q, 1, 8)
    feats = mask_feats.reshape(n, c, hw)
    # layer 0: feature part (shared input) + relative coordinates (x first, then y)
    x = torch.matmul(w0[..., 2:].reshape(n, q * 8, c), feats).view(n, q, 8, hw)
    rel = ref_xy_px.reshape(n, q, 1, 2, 1) - locations.t().reshape(1, 1, 1, 2, hw)       # N,Q,1,2,HW
    x = x + w0[..., 0:1] * rel[:, :, :, 0] + w0[..., 1:2] * rel[:, :, :, 1] + b0.reshape(n, q, 8, 1)
    x = F.relu(x).reshape(n * q, 8, hw)
    x = F.relu(torch.baddbmm(b1.reshape(n * q, 8, 1), w1, x))
    x = torch.baddbmm(b2.reshape(n * q, 1, 1), w2, x)                                      # N*Q,1,HW
    x = aligned_bilinear(x.view(n * q, 1, h, w), out_factor)
    return x.view(n, q, h * out_factor, w * out_factor)
