"""MobileNetV2 (Sandler et al., 2018) as TF DeepLab builds it: `mobilenet_base` up to `layer_18`, no final 1x1.

Channel rules are TF's: with depth multiplier 1.0, channels round to multiples of 8 (minimum 8); with any other
multiplier DeepLab passes `divisible_by=1, min_depth=1`, so channels are rounded to the nearest integer (the official dm=0.5 model
has 16, 8, 12, 16, 32, 48, 80, 160). Expansion widths round to multiples of 8 as TF's `expand_input_by_factor` does.
ReLU6 after expansion and depthwise convs, linear projection, BN epsilon 1e-3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import conv_bn
from .common import Backbone, atrous_plan

BN_EPS = 1e-3

# (expansion t, output channels c, repeats n, stride s) of the 7 bottleneck groups (MobileNetV2 Table 2).
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """TF's `_make_divisible`: round to the nearest multiple of `divisor`, never more than 10% below `value`."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class InvertedResidual(nn.Module):
    """TF's `expanded_conv`: [1x1 expand + BN + ReLU6], depthwise 3x3 + BN + ReLU6, 1x1 project + BN, residual."""

    def __init__(self, in_channels: int, out_channels: int, *, expansion: int, stride: int, dilation: int) -> None:
        super().__init__()
        hidden = in_channels if expansion == 1 else make_divisible(in_channels * expansion, 8)
        self.expand = (
            None if expansion == 1 else conv_bn(in_channels, hidden, kernel_size=1, activation="relu6", bn_eps=BN_EPS)
        )
        self.depthwise = conv_bn(
            hidden, hidden, kernel_size=3, stride=stride, dilation=dilation, groups=hidden, activation="relu6",
            bn_eps=BN_EPS,
        )
        self.project = conv_bn(hidden, out_channels, kernel_size=1, activation=None, bn_eps=BN_EPS)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.hidden_channels = hidden

    def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its depthwise output (TF's `layer_k/depthwise_output`)."""
        y = x if self.expand is None else self.expand(x)
        tap = self.depthwise(y)
        y = self.project(tap)
        return (x + y if self.use_residual else y), tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x)[0]


class MobileNetV2(Backbone):
    """MobileNetV2 returning the stride-4 feature and the output-stride feature.

    Low-level feature: TF DeepLab's decoder end point `layer_4/depthwise_output`, the depthwise output of the
    third inverted residual (stride 4, 144 channels at depth multiplier 1).
    """

    def __init__(self, *, depth_multiplier: float = 1.0, output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        divisor, min_depth = (8, 8) if depth_multiplier == 1.0 else (1, 1)

        def depth(c: int) -> int:
            return make_divisible(c * depth_multiplier, divisor, min_depth)

        stem_channels = depth(32)
        self.stem = conv_bn(in_channels, stem_channels, kernel_size=3, stride=2, activation="relu6", bn_eps=BN_EPS)
        units = [(t, c, s if i == 0 else 1) for t, c, n, s in INVERTED_RESIDUAL_SETTING for i in range(n)]
        plan = atrous_plan([u[2] for u in units], output_stride=output_stride, current_stride=2)
        blocks = []
        in_channels = stem_channels
        for (t, c, _), (stride, dilation) in zip(units, plan):
            blocks.append(InvertedResidual(in_channels, depth(c), expansion=t, stride=stride, dilation=dilation))
            in_channels = depth(c)
        self.blocks = nn.ModuleList(blocks)
        self.low_level_index = 2  # TF's layer_4 = the stem (layer_1) + 3 blocks
        self.channels = {"low_level": self.blocks[self.low_level_index].hidden_channels, "out": in_channels}
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        low_level = x
        for i, block in enumerate(self.blocks):
            if i == self.low_level_index:
                x, low_level = block.forward_with_tap(x)  # low_level: (N, 144*dm, H/4, W/4)
            else:
                x = block(x)
        return {"low_level": low_level, "out": x}  # out: (N, 320*dm, H/os, W/os)


def mobilenet_v2(
    *, output_stride: int = 16, depth_multiplier: float = 1.0, multi_grid: Sequence[int] | None = None,
    in_channels: int = 3,
) -> MobileNetV2:
    if multi_grid is not None and tuple(multi_grid) != (1, 1, 1):
        raise ValueError(f"mobilenet_v2 has no multi-grid stage; got multi_grid={tuple(multi_grid)!r}, leave it unset")
    return MobileNetV2(depth_multiplier=depth_multiplier, output_stride=output_stride, in_channels=in_channels)
