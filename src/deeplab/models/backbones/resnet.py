"""ResNet v1 in two layouts, built for an output stride of 8, 16 or 32.

- torchvision's (`resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`): 7x7 stem, each stage's stride on its
  *first* unit, a strided 1x1 projection shortcut there. Parameter names match torchvision's, so its ImageNet state
  dicts load as they are. ResNet-18/34 are made of torchvision's `BasicBlock` (two 3x3 convs), the others of
  bottlenecks.
- TF DeepLab's resnet_v1_beta (`resnet50_beta`, `resnet101_beta`): a stem of three 3x3 convs (64-64-128) and each
  block's stride on its *last* unit, whose shortcut is then a parameter-free subsampling. This is the network of
  the DeepLabv3/v3+ papers: their multiply-add figures and TF checkpoints line up with it.

Both apply multi-grid (DeepLabv3 §3.2) to the last stage: its units' dilations are multiplied by (1, 2, 4); ResNet-18,
whose last stage has two units, by (1, 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import conv_bn, recomputed
from .common import Backbone, atrous_plan, check_multi_grid

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BASIC_DEPTHS = (18, 34)  # BasicBlock networks (expansion 1); the others are bottleneck networks (expansion 4)
BETA_DEPTHS = (50, 101)
DEFAULT_MULTI_GRID = (1, 2, 4)


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck (stride on the 3x3, as torchvision and TF do); torchvision's parameter names.

    `shortcut`: "identity", "conv" (1x1 conv + BN, strided) or "subsample" (TF's `subsample`: take every
    `stride`-th pixel, used by resnet_v1_beta where a strided unit keeps its channel count).
    """

    def __init__(
        self, in_channels: int, width: int, *, stride: int = 1, dilation: int = 1, shortcut: str = "identity"
    ) -> None:
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.shortcut = shortcut
        if shortcut == "conv":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        elif shortcut in ("identity", "subsample"):
            self.downsample = None
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose from 'identity', 'conv', 'subsample'")

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch up to conv3 + BN, before the addition (TF's `bottleneck_v1/conv3` end point)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.shortcut == "subsample" and self.stride > 1:
            return x[:, :, :: self.stride, :: self.stride]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        out += self.skip(x)  # in place: the residual branch's output is read by nothing else
        return self.relu(out)


class BasicBlock(nn.Module):
    """ResNet-18/34's unit, torchvision's `BasicBlock` and parameter names: 3x3 conv (strided) + BN + ReLU, 3x3 conv +
    BN, the shortcut added, ReLU.

    torchvision refuses dilation in this block. Here both convs are dilated, as Dilated Residual Networks (Yu et al.,
    2017) do: `dilation` for conv1, `dilation_after` for conv2. In a unit whose stride was removed, conv1 keeps the
    previous rate (it ran before the stride) and conv2 gets the rate of the units after it (it ran after the
    stride), so the dilated network computes the strided network's responses at the strided positions.
    """

    def __init__(
        self, in_channels: int, width: int, *, stride: int = 1, dilation: int = 1, dilation_after: int | None = None,
        shortcut: str = "identity",
    ) -> None:
        super().__init__()
        after = dilation if dilation_after is None else dilation_after
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=after, dilation=after, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        if shortcut == "conv":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
        elif shortcut == "identity":
            self.downsample = None
        else:
            raise ValueError(f"unknown shortcut {shortcut!r} for a BasicBlock; choose from 'identity', 'conv'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _stem_torchvision(in_channels: int = 3) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "conv1": nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            "bn1": nn.BatchNorm2d(64),
            "relu": nn.ReLU(inplace=True),
            "maxpool": nn.MaxPool2d(3, stride=2, padding=1),
        }
    )


class ResNet(Backbone):
    """ResNet-18/34/50/101/152 returning the stride-4 feature and the output-stride feature.

    Low-level feature: torchvision layout, the output of `layer1` (stride 4; 64 channels for ResNet-18/34, 256 for
    the bottleneck networks); beta layout, TF's decoder end point `block1/unit_2/bottleneck_v1/conv3` (the residual
    branch of the last stride-4 unit before the add).
    """

    def __init__(
        self,
        *,
        depth: int = 101,
        beta: bool = False,
        output_stride: int = 16,
        multi_grid: Sequence[int] = DEFAULT_MULTI_GRID,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth!r}")
        if beta and depth not in BETA_DEPTHS:
            raise ValueError(f"TF's resnet_v1_beta layout exists for depths {BETA_DEPTHS}, got {depth!r}")
        expansion = 1 if depth in BASIC_DEPTHS else 4
        name = f"resnet{depth}{'_beta' if beta else ''}"
        grid = check_multi_grid(multi_grid, expected=BLOCKS[depth][3], backbone=name)
        self.beta = beta
        if beta:
            # Three 3x3 convs replace the 7x7 (TF's resnet_v1_beta root block), then 'SAME' max pooling.
            self.stem = nn.Sequential(
                conv_bn(in_channels, 64, kernel_size=3, stride=2),
                conv_bn(64, 64, kernel_size=3),
                conv_bn(64, 128, kernel_size=3),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            stem_channels = 128
        else:
            stem = _stem_torchvision(in_channels)
            self.conv1, self.bn1, self.relu, self.maxpool = stem["conv1"], stem["bn1"], stem["relu"], stem["maxpool"]
            stem_channels = 64

        # Nominal stride of every unit, stage by stage: beta strides the last unit of stages 1-3, torchvision the
        # first unit of stages 2-4.
        unit_strides: list[list[int]] = []
        for stage, n in enumerate(BLOCKS[depth]):
            strides = [1] * n
            if beta and stage < 3:
                strides[-1] = 2
            elif not beta and stage > 0:
                strides[0] = 2
            unit_strides.append(strides)
        plan = atrous_plan([s for st in unit_strides for s in st], output_stride=output_stride, current_stride=4)

        in_channels = stem_channels
        layers = []
        k = 0
        for stage, n in enumerate(BLOCKS[depth]):
            width = 64 * 2**stage
            units: list[nn.Module] = []
            for i in range(n):
                stride, dilation = plan[k]
                k += 1
                strided = unit_strides[stage][i] == 2  # nominally; at this output stride it may be dilated
                # The rate after this unit's (removed) stride: what a BasicBlock's second conv runs at.
                after = dilation * 2 if strided and stride == 1 else dilation
                if stage == 3:
                    dilation *= grid[i]  # multi-grid: unit rates (1, 2, 4) times the stage's rate
                    after *= grid[i]
                if in_channels != width * expansion or (strided and not beta):
                    shortcut = "conv"  # torchvision projects at every strided unit
                else:
                    shortcut = "subsample" if strided else "identity"
                if expansion == 1:
                    units.append(BasicBlock(in_channels, width, stride=stride, dilation=dilation, dilation_after=after,
                                            shortcut=shortcut))
                else:
                    units.append(Bottleneck(in_channels, width, stride=stride, dilation=dilation, shortcut=shortcut))
                in_channels = width * expansion
            layers.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        # Beta taps the residual branch of block1's second unit; torchvision layout taps layer1's output.
        self.low_level_unit = BLOCKS[depth][0] - 2 if beta else None
        self.channels = {"low_level": 64 * expansion, "out": 512 * expansion}
        self.reductions = {"low_level": 4, "out": output_stride}

    # True: in training, the stem, layer1 and layer2 are recomputed in the backward pass instead of kept (see
    # `recomputed`). They are recomputed last, when the memory of the later stages is free again: the peak falls by
    # their activations (about 0.6 GB for ResNet-101 at batch 2, 512x512) for about 12% more forward work.
    recompute = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recompute and torch.is_grad_enabled():
            low_level, x = recomputed(self._to_stride8, self, x)
        else:
            low_level, x = self._to_stride8(x)
        x = self.layer4(self.layer3(x))  # (N, 2048, H/os, W/os)
        return {"low_level": low_level, "out": x}

    def _to_stride8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the low-level feature, layer2's output): the stages whose activations are largest."""
        if self.beta:
            x = self.stem(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.low_level_unit is None:
            x = self.layer1(x)
            low_level = x
        else:
            for i, unit in enumerate(self.layer1):
                if i == self.low_level_unit:
                    residual = unit.residual(x)
                    low_level = residual  # (N, 256, H/4, W/4)
                    x = unit.relu(residual + unit.skip(x))
                else:
                    x = unit(x)
        return low_level, self.layer2(x)


def resnet18(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID[:2], in_channels: int = 3
) -> ResNet:
    return ResNet(depth=18, beta=False, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet34(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=34, beta=False, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet50(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=50, beta=False, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet101(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=101, beta=False, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet152(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=152, beta=False, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet50_beta(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=50, beta=True, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)


def resnet101_beta(
    *, output_stride: int = 16, multi_grid: Sequence[int] = DEFAULT_MULTI_GRID, in_channels: int = 3
) -> ResNet:
    return ResNet(depth=101, beta=True, output_stride=output_stride, multi_grid=multi_grid, in_channels=in_channels)
