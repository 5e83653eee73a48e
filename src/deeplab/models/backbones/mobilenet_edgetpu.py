"""MobileNet-EdgeTPU (Gupta & Akin, 2019) as TF builds it: `mobilenet_v3.V3_EDGETPU` in tensorflow/models'
slim nets, the backbone of the official DeepLab EdgeTPU models.

The network is MobileNetV2's inverted residual with two changes made for the Edge TPU: the first nine blocks are
*fused* (one full kxk conv does expansion and spatial filtering at once, then a linear 1x1 projection: no depthwise
conv), and ReLU replaces ReLU6 everywhere. Blocks, as TF's spec lists them (expansion factor ef, output channels
n, kernel k, stride s):

    stem 3x3/2 conv, 32
    fused  ef1 n16 k3 s1                                  (ef 1: no expansion, so only the 1x1 projection)
    fused  ef8 n32 k3 s2, 3x fused ef4 n32 k3
    fused  ef8 n48 k3 s2, 3x fused ef4 n48 k3
    ef8 n96 k3 s2, 3x ef4 n96 k3, ef8 n96 k3 (no residual), 3x ef4 n96 k3
    ef8 n160 k5 s2, 3x ef4 n160 k5
    ef8 n192 k3
    1x1 conv, 1280

Channel rules are TF's: outputs and the stem scale with the depth multiplier and round with `make_divisible(c, 8)`
(the official "slim" DeepLab model has multiplier 0.75: 24, 16, 24, 40, 72, 120, 144), expansions are
`make_divisible(input * ef, 8)`; the last 1x1 conv keeps 1280 channels at any multiplier, as in the official file.
A block adds its input back when its stride is 1 and its input and output widths agree, except where the spec says
`residual=False`. BN epsilon 1e-3. Strides become dilations by TF's rule (`atrous_plan`): the official OS16 file
runs the k5 stride-2 block at stride 1, rate 1, and every later block at rate 2.

Features: `out` is the last 1x1 conv (1280 channels). `low_level`, for the DeepLabv3+ decoder, is the output of the
last stride-4 block (block 4, 32 * multiplier channels); TF DeepLab publishes no decoder model on this backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import conv_bn
from .common import Backbone, atrous_plan
from .mobilenet_v2 import make_divisible

BN_EPS = 1e-3
FINAL_CHANNELS = 1280
STEM_CHANNELS = 32

# (fused, expansion factor, output channels, kernel, stride, residual allowed), TF's V3_EDGETPU rows in order.
EDGETPU_BLOCKS: list[tuple[bool, int, int, int, int, bool]] = [
    (True, 1, 16, 3, 1, True),
    (True, 8, 32, 3, 2, True),
    (True, 4, 32, 3, 1, True),
    (True, 4, 32, 3, 1, True),
    (True, 4, 32, 3, 1, True),
    (True, 8, 48, 3, 2, True),
    (True, 4, 48, 3, 1, True),
    (True, 4, 48, 3, 1, True),
    (True, 4, 48, 3, 1, True),
    (False, 8, 96, 3, 2, True),
    (False, 4, 96, 3, 1, True),
    (False, 4, 96, 3, 1, True),
    (False, 4, 96, 3, 1, True),
    (False, 8, 96, 3, 1, False),
    (False, 4, 96, 3, 1, True),
    (False, 4, 96, 3, 1, True),
    (False, 4, 96, 3, 1, True),
    (False, 8, 160, 5, 2, True),
    (False, 4, 160, 5, 1, True),
    (False, 4, 160, 5, 1, True),
    (False, 4, 160, 5, 1, True),
    (False, 8, 192, 3, 1, True),
]
LOW_LEVEL_BLOCK = 4  # the last block at stride 4


class EdgeTPUBlock(nn.Module):
    """TF's `expanded_conv`. Fused: [kxk expand + BN + ReLU], 1x1 project + BN. Regular: 1x1 expand + BN + ReLU,
    depthwise kxk + BN + ReLU, 1x1 project + BN. Residual add when allowed and shapes agree."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        fused: bool,
        expansion: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        residual: bool,
    ) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expansion, 8)
        self.expand: nn.Module | None = None
        self.depthwise: nn.Module | None = None
        if fused:
            if hidden > in_channels:  # TF expands only to a wider tensor; ef 1 leaves the projection alone
                self.expand = conv_bn(
                    in_channels, hidden, kernel_size=kernel_size, stride=stride, dilation=dilation, activation="relu",
                    bn_eps=BN_EPS,
                )
            else:
                hidden = in_channels
                if stride != 1:
                    raise ValueError("a fused block without expansion has no spatial conv to carry stride 2")
        else:
            self.expand = conv_bn(in_channels, hidden, kernel_size=1, activation="relu", bn_eps=BN_EPS)
            self.depthwise = conv_bn(
                hidden, hidden, kernel_size=kernel_size, stride=stride, dilation=dilation, groups=hidden,
                activation="relu", bn_eps=BN_EPS,
            )
        self.project = conv_bn(hidden, out_channels, kernel_size=1, activation=None, bn_eps=BN_EPS)
        self.use_residual = residual and stride == 1 and in_channels == out_channels
        self.hidden_channels = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in (self.expand, self.depthwise, self.project):
            if layer is not None:
                y = layer(y)
        return x + y if self.use_residual else y


class MobileNetEdgeTPU(Backbone):
    """MobileNet-EdgeTPU returning the stride-4 feature and the output-stride feature (see the module docstring)."""

    def __init__(self, *, depth_multiplier: float = 1.0, output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()

        def depth(c: int) -> int:
            return make_divisible(c * depth_multiplier, 8)

        stem_channels = depth(STEM_CHANNELS)
        self.stem = conv_bn(in_channels, stem_channels, kernel_size=3, stride=2, activation="relu", bn_eps=BN_EPS)
        plan = atrous_plan([row[4] for row in EDGETPU_BLOCKS], output_stride=output_stride, current_stride=2)
        blocks = []
        in_channels = stem_channels
        for (fused, ef, n, k, _, residual), (stride, dilation) in zip(EDGETPU_BLOCKS, plan):
            blocks.append(
                EdgeTPUBlock(
                    in_channels, depth(n), fused=fused, expansion=ef, kernel_size=k, stride=stride,
                    dilation=dilation, residual=residual,
                )
            )
            in_channels = depth(n)
        self.blocks = nn.ModuleList(blocks)
        self.final = conv_bn(in_channels, FINAL_CHANNELS, kernel_size=1, activation="relu", bn_eps=BN_EPS)
        self.channels = {"low_level": depth(EDGETPU_BLOCKS[LOW_LEVEL_BLOCK][2]), "out": FINAL_CHANNELS}
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        low_level = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == LOW_LEVEL_BLOCK:
                low_level = x  # (N, 32*dm, H/4, W/4)
        return {"low_level": low_level, "out": self.final(x)}  # out: (N, 1280, H/os, W/os)


def mobilenet_edgetpu(
    *, output_stride: int = 16, depth_multiplier: float = 1.0, multi_grid: Sequence[int] | None = None,
    in_channels: int = 3,
) -> MobileNetEdgeTPU:
    if multi_grid is not None and tuple(multi_grid) != (1, 1, 1):
        raise ValueError(
            f"mobilenet_edgetpu has no multi-grid stage; got multi_grid={tuple(multi_grid)!r}, leave it unset"
        )
    return MobileNetEdgeTPU(depth_multiplier=depth_multiplier, output_stride=output_stride, in_channels=in_channels)
