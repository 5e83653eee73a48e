"""Modified Aligned Xception-41/65/71 (DeepLabv3+ §3.2, Fig. 4), laid out as TF DeepLab's `core/xception.py`.

Entry flow / middle flow (repeats of a 728-channel module: 8 in Xception-41, 16 in Xception-65/71) / exit flow.
TF's `xception_41` is `xception_65` with half the middle flow: the same entry and exit flows. Every max pooling of
the original Xception is a depthwise separable conv with stride 2, so any stride can become a dilation.

Where the ReLU sits. The paper says "extra batch normalization and ReLU are added after each 3x3 depthwise
convolution". The TF reference, whose code produced the paper's checkpoints, puts BN after every depthwise conv,
but applies the ReLU *before* each separable conv (`activation_fn_in_separable_conv=False`) in all modules except
the last exit-flow module, where BN + ReLU follow both the depthwise and the pointwise conv. We follow the TF
reference so that its weights compute what they were trained to compute; `tests/test_backbones.py` pins it.
BatchNorm epsilon is TF xception's 1e-3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv_bn
from .common import Backbone, atrous_plan, check_multi_grid

BN_EPS = 1e-3
DEFAULT_MULTI_GRID = (1, 1, 1)  # TF xception's default unit rates for the last module

# (depth_list, skip connection, nominal stride) of each entry-flow module.
_ENTRY_FLOW_65 = [((128, 128, 128), "conv", 2), ((256, 256, 256), "conv", 2), ((728, 728, 728), "conv", 2)]
ENTRY_FLOWS = {
    41: _ENTRY_FLOW_65,
    65: _ENTRY_FLOW_65,
    71: [
        ((128, 128, 128), "conv", 2),
        ((256, 256, 256), "conv", 1),
        ((256, 256, 256), "conv", 2),
        ((728, 728, 728), "conv", 1),
        ((728, 728, 728), "conv", 2),
    ],
}
MIDDLE_FLOW_UNIT = ((728, 728, 728), "sum", 1)
MIDDLE_FLOW_REPEATS = {41: 8, 65: 16, 71: 16}  # TF's middle_flow/block1 num_units
EXIT_FLOW = [((728, 1024, 1024), "conv", 2), ((1536, 1536, 2048), "none", 1)]


class SeparableConv(nn.Module):
    """TF xception's `separable_conv2d_same`: depthwise 3x3 + BN, then pointwise 1x1 + BN.

    `relu_inside=False`: ReLU on the input, none inside (TF's `activation_fn_in_separable_conv=False`).
    `relu_inside=True`: ReLU after each BN.
    `relu_on_input` is False where the inference fast path has fused that ReLU into the previous conv.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dilation: int, relu_inside: bool) -> None:
        super().__init__()
        act = "relu" if relu_inside else None
        self.relu_inside = relu_inside
        self.relu_on_input = not relu_inside  # the inference fast path may fuse it into the previous conv
        self.depthwise = conv_bn(
            in_channels, in_channels, kernel_size=3, stride=stride, dilation=dilation, groups=in_channels,
            activation=act, bn_eps=BN_EPS,
        )
        self.pointwise = conv_bn(in_channels, out_channels, kernel_size=1, activation=act, bn_eps=BN_EPS)

    def forward(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        if self.relu_on_input:
            # In place only when nothing else reads x (a module's input also feeds its shortcut).
            x = F.relu(x, inplace=inplace)
        return self.pointwise(self.depthwise(x))


class XceptionModule(nn.Module):
    """Three separable convs (the stride on the third) plus a shortcut: "conv" (1x1 + BN), "sum" or "none"."""

    def __init__(
        self,
        in_channels: int,
        depths: Sequence[int],
        *,
        skip: str,
        stride: int,
        dilations: Sequence[int],
        relu_inside: bool,
    ) -> None:
        super().__init__()
        if skip not in ("conv", "sum", "none"):
            raise ValueError(f"unknown skip connection {skip!r}; choose from 'conv', 'sum', 'none'")
        channels = [in_channels, *depths]
        self.convs = nn.ModuleList(
            SeparableConv(
                channels[i], channels[i + 1], stride=stride if i == 2 else 1, dilation=dilations[i],
                relu_inside=relu_inside,
            )
            for i in range(3)
        )
        self.skip = skip
        self.shortcut = (
            conv_bn(in_channels, depths[-1], kernel_size=1, stride=stride, activation=None, bn_eps=BN_EPS)
            if skip == "conv"
            else None
        )

    def forward_with_tap(self, x: torch.Tensor, *, keep_tap: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's output and its second separable conv's output (TF's `separable_conv2_pointwise`).

        Intermediate ReLUs run in place (a BN output that nothing else reads), saving a full-size copy each; the
        tap is kept intact only when asked for.
        """
        y = self.convs[0](x)
        tap = self.convs[1](y, inplace=True)
        y = self.convs[2](tap, inplace=not keep_tap)
        if self.skip == "conv":
            y = y + self.shortcut(x)
        elif self.skip == "sum":
            y = y + x
        return y, (tap if keep_tap else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x, keep_tap=False)[0]


class Xception(Backbone):
    """Aligned Xception returning the stride-4 feature and the output-stride feature.

    The low-level feature is TF's decoder end point: the second separable conv of the entry-flow module that goes
    from stride 4 to 8 (`entry_flow/block2` in Xception-41/65, `block3` in Xception-71), 256 channels, before its ReLU.
    """

    def __init__(
        self, *, depth: int = 65, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in ENTRY_FLOWS:
            raise ValueError(f"Xception depth must be one of {sorted(ENTRY_FLOWS)}, got {depth!r}")
        grid = check_multi_grid(multi_grid, expected=3, backbone=f"xception{depth}")
        self.stem = nn.Sequential(
            conv_bn(in_channels, 32, kernel_size=3, stride=2, bn_eps=BN_EPS),
            conv_bn(32, 64, kernel_size=3, bn_eps=BN_EPS),
        )
        units = ENTRY_FLOWS[depth] + [MIDDLE_FLOW_UNIT] * MIDDLE_FLOW_REPEATS[depth] + EXIT_FLOW
        plan = atrous_plan([u[2] for u in units], output_stride=output_stride, current_stride=2)
        modules = []
        in_channels = 64
        nominal_stride = 2
        self.low_level_index = -1
        for i, ((depths, skip, _), (stride, dilation)) in enumerate(zip(units, plan)):
            last = i == len(units) - 1
            if nominal_stride == 4 and units[i][2] == 2:
                self.low_level_index = i
            nominal_stride *= units[i][2]
            rates = [dilation * g for g in grid] if last else [dilation] * 3
            modules.append(
                XceptionModule(in_channels, depths, skip=skip, stride=stride, dilations=rates, relu_inside=last)
            )
            in_channels = depths[-1]
        self.blocks = nn.ModuleList(modules)
        self.channels = {"low_level": units[self.low_level_index][0][1], "out": 2048}
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        low_level = x
        for i, block in enumerate(self.blocks):
            if i == self.low_level_index:
                x, low_level = block.forward_with_tap(x)  # low_level: (N, 256, H/4, W/4)
            else:
                x = block(x)
        return {"low_level": low_level, "out": x}  # out: (N, 2048, H/os, W/os)


def xception41(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> Xception:
    return Xception(depth=41, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def xception65(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> Xception:
    return Xception(depth=65, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def xception71(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> Xception:
    return Xception(depth=71, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)
