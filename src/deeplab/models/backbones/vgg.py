"""VGG-11/13/16/19, with and without BatchNorm, built for an output stride of 8, 16 or 32 (DeepLab v1/v2's backbone).

The layout and parameter names are torchvision's (`features.N`: conv, [BN,] ReLU, ..., max pool), so its ImageNet
files (`vgg16-397923af.pth`, `vgg16_bn-6c64b313.pth`, ...) load as they are; the classifier (fc6-fc8 of ImageNet) is
not built. Each of the five blocks is a unit for `atrous_plan`: its convs, then its pool, which carries the stride.

- A pool that strides is torchvision's 2x2 max pool, stride 2, with `ceil_mode=True`: at even sizes it is
  torchvision's pool exactly; at odd sizes it keeps the last row and column (Caffe's rounding, which the
  DeepLab-LargeFOV prototxt relies on), so a map of n rows becomes ceil(n / 2), as every other backbone's 'same'
  padding gives.
- A pool whose stride is removed becomes a 3x3 max pool, stride 1, padding 1: DeepLab-LargeFOV's pool4 and pool5
  (the official Caffe `train.prototxt`), and the convs after it are dilated. At output stride 8 this is the v1 paper's
  network: pool4 and pool5 at stride 1, conv5_1-conv5_3 at dilation 2.

DeepLab's Caffe network also widened pool1-pool3 to 3x3 (stride 2, padding 1) "to align responses"; those keep
torchvision's 2x2 here, so that ImageNet weights compute what they were trained to compute (docs/family.md).

Features: "low_level" is the output of the last ReLU of block 3 (conv3_3 for VGG-16; stride 4, 256 channels), "out"
the output of pool5 (512 channels), which DeepLab v1's fc6 reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Backbone, atrous_plan

# Convs per block (torchvision's configurations A, B, D, E) and each block's width.
VGG_BLOCKS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
VGG_WIDTHS = (64, 128, 256, 512, 512)


class VGG(Backbone):
    """VGG's `features` as a DeepLab backbone: {"low_level": block 3 (stride 4), "out": pool5 (output stride)}."""

    def __init__(self, *, depth: int = 16, batch_norm: bool = False, output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in VGG_BLOCKS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_BLOCKS)}, got {depth!r}")
        plan = atrous_plan([2] * 5, output_stride=output_stride, current_stride=1)
        layers: list[nn.Module] = []
        for block, (convs, width, (stride, dilation)) in enumerate(zip(VGG_BLOCKS[depth], VGG_WIDTHS, plan)):
            for _ in range(convs):
                layers.append(nn.Conv2d(in_channels, width, 3, padding=dilation, dilation=dilation))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                in_channels = width
            if block == 2:
                self.low_level_index = len(layers) - 1  # block 3's last ReLU, before pool3
            if stride == 2:
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers.append(nn.MaxPool2d(3, stride=1, padding=1))
        self.features = nn.Sequential(*layers)
        self.channels = {"low_level": 256, "out": 512}
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low_level = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.low_level_index:
                low_level = x  # (N, 256, H/4, W/4)
        return {"low_level": low_level, "out": x}  # out: (N, 512, H/os, W/os)


def vgg11(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=11, batch_norm=False, output_stride=output_stride, in_channels=in_channels)


def vgg13(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=13, batch_norm=False, output_stride=output_stride, in_channels=in_channels)


def vgg16(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=16, batch_norm=False, output_stride=output_stride, in_channels=in_channels)


def vgg19(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=19, batch_norm=False, output_stride=output_stride, in_channels=in_channels)


def vgg11_bn(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=11, batch_norm=True, output_stride=output_stride, in_channels=in_channels)


def vgg13_bn(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=13, batch_norm=True, output_stride=output_stride, in_channels=in_channels)


def vgg16_bn(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=16, batch_norm=True, output_stride=output_stride, in_channels=in_channels)


def vgg19_bn(*, output_stride: int = 16, in_channels: int = 3) -> VGG:
    return VGG(depth=19, batch_norm=True, output_stride=output_stride, in_channels=in_channels)
