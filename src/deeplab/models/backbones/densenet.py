"""DenseNet-121/161/169/201 built for an output stride of 8, 16 or 32.

The layout and parameter names are torchvision's (`features.conv0/norm0`, `features.denseblockK.denselayerJ.norm1/
conv1/norm2/conv2`, `features.transitionK.norm/conv`, `features.norm5`), so its ImageNet files
(`densenet121-a639ec97.pth`, ...) load as they are; the classifier is not built. Files with the old dotted names
(`norm.1`, `conv.1`, ...) are renamed by `deeplab.convert.torch_weights`.

Each dense block with the transition after it is a unit for `atrous_plan`; the transition's 2x2 average pool carries
the stride. A transition that strides pools with `ceil_mode=True` (torchvision's pool at even sizes; at odd sizes
the last row and column are kept, averaged over the pixels that exist, so n rows become ceil(n / 2)). A transition
whose stride is removed averages the same windows at stride 1 (`DenseAveragePool`, its taps as far apart as the
block's dilation), and the 3x3 convs of the dense layers after it are dilated. No DeepLab paper uses DenseNet; this
keeps the rule the DeepLab papers dilate by, exactly: the dilated network computes, on the strided network's
positions, what the strided network computes (tests/test_family.py; docs/family.md).

Features: "low_level" is the output of dense block 1 (stride 4; 256 channels, 384 for DenseNet-161), "out" the
final BatchNorm + ReLU (torchvision's `forward` applies that ReLU after `features`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .common import Backbone, atrous_plan

# depth -> (growth rate, dense layers per block, stem width); torchvision's bn_size 4 and compression 0.5 throughout.
DENSENETS = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}
BN_SIZE = 4


class DenseAveragePool(nn.Module):
    """The 2x2 average pool with its stride removed: the same windows at stride 1, their taps `dilation` apart (the rate
    of the dense block it follows), so its outputs on the strided network's positions are that pool's outputs.

    A window reaching past the map averages the pixels that exist, as the strided ceil-mode pool's partial windows
    do; the size is kept.
    """

    def __init__(self, *, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = int(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        h, w = x.shape[-2:]

        def window_sum(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t, (0, d, 0, d))
            return t[..., :h, :w] + t[..., d:, :w] + t[..., :h, d:] + t[..., d:, d:]

        # The number of taps inside the map at each position: 4 inside, 2 along the last rows or columns, 1 in the corner.
        return window_sum(x) / window_sum(torch.ones_like(x[:, :1]))


def dense_layer(in_channels: int, growth_rate: int, *, dilation: int) -> nn.Sequential:
    """torchvision's `_DenseLayer` (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv), applied to the concatenated features."""
    return nn.Sequential(OrderedDict(
        norm1=nn.BatchNorm2d(in_channels),
        relu1=nn.ReLU(inplace=True),
        conv1=nn.Conv2d(in_channels, BN_SIZE * growth_rate, 1, bias=False),
        norm2=nn.BatchNorm2d(BN_SIZE * growth_rate),
        relu2=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(BN_SIZE * growth_rate, growth_rate, 3, padding=dilation, dilation=dilation, bias=False),
    ))


class DenseBlock(nn.ModuleDict):
    """torchvision's `_DenseBlock`: each layer reads the concatenation of the block's input and every earlier output."""

    def __init__(self, in_channels: int, layers: int, growth_rate: int, *, dilation: int) -> None:
        super().__init__({
            f"denselayer{j + 1}": dense_layer(in_channels + j * growth_rate, growth_rate, dilation=dilation)
            for j in range(layers)
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def transition(in_channels: int, out_channels: int, *, stride: int, dilation: int) -> nn.Sequential:
    """torchvision's `_Transition`: BN, ReLU, 1x1 conv, then the 2x2 average pool (at stride 1 when dilated)."""
    pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride == 2 else DenseAveragePool(dilation=dilation)
    return nn.Sequential(OrderedDict(
        norm=nn.BatchNorm2d(in_channels),
        relu=nn.ReLU(inplace=True),
        conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
        pool=pool,
    ))


class DenseNet(Backbone):
    """DenseNet's `features` as a DeepLab backbone: {"low_level": dense block 1, "out": norm5 + ReLU}."""

    def __init__(self, *, depth: int = 121, output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in DENSENETS:
            raise ValueError(f"DenseNet depth must be one of {sorted(DENSENETS)}, got {depth!r}")
        growth, blocks, width = DENSENETS[depth]
        # Blocks 1-3 end in a strided transition; block 4 has none.
        plan = atrous_plan([2, 2, 2, 1], output_stride=output_stride, current_stride=4)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(width),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = width
        for k, (count, (stride, dilation)) in enumerate(zip(blocks, plan), start=1):
            layers[f"denseblock{k}"] = DenseBlock(channels, count, growth, dilation=dilation)
            channels += count * growth
            if k == 1:
                low_level_channels = channels
            if k < 4:
                layers[f"transition{k}"] = transition(channels, channels // 2, stride=stride, dilation=dilation)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        layers["relu5"] = nn.ReLU(inplace=True)
        self.features = nn.Sequential(layers)
        self.channels = {"low_level": low_level_channels, "out": channels}
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low_level = None
        for name, layer in self.features.named_children():
            x = layer(x)
            if name == "denseblock1":
                low_level = x  # (N, 256 or 384, H/4, W/4)
        return {"low_level": low_level, "out": x}  # out: (N, 1024..2208, H/os, W/os)


def densenet121(*, output_stride: int = 16, in_channels: int = 3) -> DenseNet:
    return DenseNet(depth=121, output_stride=output_stride, in_channels=in_channels)


def densenet161(*, output_stride: int = 16, in_channels: int = 3) -> DenseNet:
    return DenseNet(depth=161, output_stride=output_stride, in_channels=in_channels)


def densenet169(*, output_stride: int = 16, in_channels: int = 3) -> DenseNet:
    return DenseNet(depth=169, output_stride=output_stride, in_channels=in_channels)


def densenet201(*, output_stride: int = 16, in_channels: int = 3) -> DenseNet:
    return DenseNet(depth=201, output_stride=output_stride, in_channels=in_channels)
