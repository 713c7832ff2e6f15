"""ResNet-50 in detectron2's layout (FrozenBN, STRIDE_IN_1X1=False) + HIPIE's 4-level input projection.

State-dict layout matches detectron2: ``stem.conv1.{weight,norm.*}``, ``res{2..5}.{i}.{conv1,conv2,conv3,shortcut}.{weight,norm.*}``.
The frozen BatchNorm is folded into the convolution on the fly (scale the weight, add a bias), which is the same
affine map as detectron2's ``FrozenBatchNorm2d`` and saves one full pass over every activation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FrozenBatchNorm2d(nn.Module):
    """Buffers only (weight, bias, running_mean, running_var), eps 1e-5, as detectron2."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # not used by ConvFrozenBN, kept for completeness
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class ConvFrozenBN(nn.Module):
    """detectron2 ``Conv2d(bias=False, norm=FrozenBN)``; BN folded into the conv at call time."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.norm.scale_shift()
        w = self.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, w, shift, stride=self.stride, padding=self.padding)


class BasicStem(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 64):
        super().__init__()
        self.conv1 = ConvFrozenBN(cin, cout, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """STRIDE_IN_1X1=False: the stride sits on the 3x3 conv."""

    def __init__(self, cin: int, cout: int, bottleneck: int, stride: int):
        super().__init__()
        self.shortcut = ConvFrozenBN(cin, cout, 1, stride=stride) if cin != cout else None
        self.conv1 = ConvFrozenBN(cin, bottleneck, 1)
        self.conv2 = ConvFrozenBN(bottleneck, bottleneck, 3, stride=stride, padding=1)
        self.conv3 = ConvFrozenBN(bottleneck, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class ResNet50(nn.Module):
    """Returns res3, res4, res5 (strides 8/16/32, 512/1024/2048 channels)."""

    def __init__(self):
        super().__init__()
        self.stem = BasicStem()
        cin = 64
        for name, n_blocks, bottleneck, cout, stride in (
            ("res2", 3, 64, 256, 1),
            ("res3", 4, 128, 512, 2),
            ("res4", 6, 256, 1024, 2),
            ("res5", 3, 512, 2048, 2),
        ):
            blocks = []
            for i in range(n_blocks):
                blocks.append(BottleneckBlock(cin, cout, bottleneck, stride if i == 0 else 1))
                cin = cout
            self.add_module(name, nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        x = self.res2(x)
        r3 = self.res3(x)
        r4 = self.res4(r3)
        r5 = self.res5(r4)
        return [r3, r4, r5]


class MaskedBackbone(nn.Module):
    """Holds the ResNet under ``.backbone`` so keys read ``backbone.0.backbone.*`` like HIPIE's ``MaskedBackbone``."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet50()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)


def build_input_proj(hidden_dim: int = 256) -> nn.ModuleList:
    """1x1 conv + GN(32) for res3/res4/res5, then a 3x3 stride-2 conv + GN(32) on res5 for the 4th level."""
    projs = []
    for cin in (512, 1024, 2048):
        projs.append(nn.Sequential(nn.Conv2d(cin, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)))
    projs.append(nn.Sequential(nn.Conv2d(2048, hidden_dim, kernel_size=3, stride=2, padding=1),
                               nn.GroupNorm(32, hidden_dim)))
    return nn.ModuleList(projs)


def project_levels(input_proj: nn.ModuleList, resnet_feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """HIPIE: level l<3 = input_proj[l](res_{l+3}); level 3 = input_proj[3](res5) (the raw res5, not level 2)."""
    out = [input_proj[i](f) for i, f in enumerate(resnet_feats)]
    out.append(input_proj[3](resnet_feats[-1]))
    return out
