"""MobileNetV3-Large and -Small (Howard et al., 2019) in torchvision's layout, so its weights load as they are.

Module names are torchvision's `MobileNetV3.features`: `features.0` the stem (3x3 stride-2 conv + BN + hard-swish),
`features.1 ... features.N-1` inverted residuals (`block`: [1x1 expand], depthwise kxk, [squeeze-excitation
`fc1`/`fc2`], 1x1 project, each conv + BN (+ activation) a Sequential `0`/`1`/`2` as torchvision's
`Conv2dNormActivation`), `features.N` the last 1x1 conv to 6x the channels (960 / 576) + BN + hard-swish. The
classifier (avgpool, Linear 960->1280 / 576->1024, Linear ->1000) is not built. Channel counts, squeeze widths
(`_make_divisible(expanded // 4, 8)`), BN epsilon 1e-3 and the activations are torchvision's (width multiplier 1.0,
the only one with published weights).

Output stride. Strides follow our `atrous_plan` (TF's rule), with one difference taken from torchvision: where a
stride is removed, torchvision's `dilated=True` gives the whole stage, *including the unit whose stride was removed*,
the doubled rate (`stride = 1 if cnf.dilation > 1 else cnf.stride` with `dilation=2` on every unit of the last stage),
whereas `atrous_plan` (like TF and torchvision's own ResNet) keeps the previous rate on that unit. We follow
torchvision, so that `deeplabv3_mobilenet_v3_large` (output stride 16: the last stage at rate 2) computes exactly what
it was trained to compute. torchvision builds only output strides 32 and 16; at 8 the same rule is applied one stage
earlier too (the stage that would go from stride 8 to 16 runs at rate 2, its first unit included, and the last stage
at rate 4). `tests/test_mobilenet_v3.py` pins every depthwise conv's stride and rate at 32, 16 and 8.

Features. `out` is the last layer (960 / 576 channels, at the output stride): torchvision's DeepLabV3 `out`.
torchvision's `aux` (and LR-ASPP's `low`) feature is the first stride-8 block's output; our decoder takes the stride-4
feature, which is the output of the last stride-4 block (`features.3`, 24 channels, in Large; `features.1`, 16
channels, in Small).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DepthwiseConv2d
from .common import Backbone, atrous_plan
from .mobilenet_v2 import make_divisible

BN_EPS = 1e-3  # torchvision: partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)

# torchvision's `_mobilenet_v3_conf` rows: (kernel, expanded channels, output channels, squeeze-excitation,
# activation "RE" (ReLU) or "HS" (hard-swish), nominal stride). Every input is the previous row's output; the stem
# has 16 channels.
MOBILENET_V3_SETTINGS: dict[str, list[tuple[int, int, int, bool, str, int]]] = {
    "large": [
        (3, 16, 16, False, "RE", 1),
        (3, 64, 24, False, "RE", 2),  # C1
        (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2),  # C2
        (5, 120, 40, True, "RE", 1),
        (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2),  # C3
        (3, 200, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 480, 112, True, "HS", 1),
        (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2),  # C4
        (5, 960, 160, True, "HS", 1),
        (5, 960, 160, True, "HS", 1),
    ],
    "small": [
        (3, 16, 16, True, "RE", 2),  # C1
        (3, 72, 24, False, "RE", 2),  # C2
        (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2),  # C3
        (5, 240, 40, True, "HS", 1),
        (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1),
        (5, 144, 48, True, "HS", 1),
        (5, 288, 96, True, "HS", 2),  # C4
        (5, 576, 96, True, "HS", 1),
        (5, 576, 96, True, "HS", 1),
    ],
}
STEM_CHANNELS = 16
LAST_CONV_EXPANSION = 6  # torchvision: lastconv_output_channels = 6 * lastconv_input_channels

_ACTIVATIONS = {"RE": nn.ReLU, "HS": nn.Hardswish}


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    activation: str | None,
) -> nn.Sequential:
    """torchvision's `Conv2dNormActivation`: children `0` conv (no bias, padding (k - 1) // 2 * dilation), `1` BN,
    `2` activation (absent when None)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    # A dilated stride-1 depthwise 3x3 gets the faster backward (same parameters, same function), as in conv_bn.
    dilated_depthwise = groups == in_channels == out_channels and kernel_size == 3 and stride == 1 and dilation > 1
    layers["0"] = (DepthwiseConv2d if dilated_depthwise else nn.Conv2d)(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2 * dilation,
        dilation=dilation, groups=groups, bias=False,
    )
    layers["1"] = nn.BatchNorm2d(out_channels, eps=BN_EPS)
    if activation is not None:
        layers["2"] = _ACTIVATIONS[activation](inplace=True)
    return nn.Sequential(layers)


class SqueezeExcitation(nn.Module):
    """torchvision's `SqueezeExcitation` with MobileNetV3's hard-sigmoid gate: x * hsigmoid(fc2(relu(fc1(mean(x))))).

    The global mean is taken with `mean` rather than AdaptiveAvgPool2d, which exports to ONNX at any input size.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU(inplace=True)
        self.scale_activation = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(x.mean(dim=(2, 3), keepdim=True))))  # (N, C, 1, 1)
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 `InvertedResidual`: `block` = [expand], depthwise, [SE], project; residual when the
    nominal stride is 1 and the channels agree."""

    def __init__(
        self,
        in_channels: int,
        *,
        kernel_size: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        activation: str,
        stride: int,
        dilation: int,
        nominal_stride: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded_channels != in_channels:
            layers.append(conv_norm_act(in_channels, expanded_channels, kernel_size=1, activation=activation))
        layers.append(
            conv_norm_act(
                expanded_channels, expanded_channels, kernel_size=kernel_size, stride=stride, dilation=dilation,
                groups=expanded_channels, activation=activation,
            )
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded_channels, make_divisible(expanded_channels // 4, 8)))
        layers.append(conv_norm_act(expanded_channels, out_channels, kernel_size=1, activation=None))
        self.block = nn.Sequential(*layers)
        # torchvision decides from the configured stride, before dilation removes it (no case here where that differs).
        self.use_res_connect = nominal_stride == 1 and in_channels == out_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(Backbone):
    """MobileNetV3 features (`features.0 ... features.N`) returning the stride-4 and the output-stride feature."""

    def __init__(self, *, size: str = "large", output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if size not in MOBILENET_V3_SETTINGS:
            raise ValueError(f"MobileNetV3 size must be one of {sorted(MOBILENET_V3_SETTINGS)}, got {size!r}")
        setting = MOBILENET_V3_SETTINGS[size]
        plan = atrous_plan([row[5] for row in setting], output_stride=output_stride, current_stride=2)
        layers: list[nn.Module] = [conv_norm_act(in_channels, STEM_CHANNELS, kernel_size=3, stride=2, activation="HS")]
        in_channels = STEM_CHANNELS
        nominal = 2  # the stride each layer's output would have without dilation
        self.low_level_index = 0
        for (kernel, expanded, out, use_se, act, nominal_stride), (stride, dilation) in zip(setting, plan):
            if nominal_stride > 1 and stride == 1:
                dilation *= nominal_stride  # torchvision dilates the unit whose stride was removed (module docstring)
            layers.append(
                InvertedResidual(
                    in_channels, kernel_size=kernel, expanded_channels=expanded, out_channels=out, use_se=use_se,
                    activation=act, stride=stride, dilation=dilation, nominal_stride=nominal_stride,
                )
            )
            nominal *= nominal_stride
            if nominal == 4:
                self.low_level_index = len(layers) - 1  # the last block whose output is at stride 4
            in_channels = out
        layers.append(conv_norm_act(in_channels, LAST_CONV_EXPANSION * in_channels, kernel_size=1, activation="HS"))
        self.features = nn.Sequential(*layers)
        self.channels = {
            "low_level": self.features[self.low_level_index].out_channels,
            "out": LAST_CONV_EXPANSION * in_channels,
        }
        self.reductions = {"low_level": 4, "out": output_stride}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low_level = x
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.low_level_index:
                low_level = x  # (N, 24 or 16, H/4, W/4)
        return {"low_level": low_level, "out": x}  # out: (N, 960 or 576, H/os, W/os)


def _check_no_multi_grid(name: str, multi_grid: Sequence[int] | None) -> None:
    if multi_grid is not None and tuple(multi_grid) != (1, 1, 1):
        raise ValueError(f"{name} has no multi-grid stage; got multi_grid={tuple(multi_grid)!r}, leave it unset")


def mobilenet_v3_large(
    *, output_stride: int = 16, multi_grid: Sequence[int] | None = None, in_channels: int = 3
) -> MobileNetV3:
    _check_no_multi_grid("mobilenet_v3_large", multi_grid)
    return MobileNetV3(size="large", output_stride=output_stride, in_channels=in_channels)


def mobilenet_v3_small(
    *, output_stride: int = 16, multi_grid: Sequence[int] | None = None, in_channels: int = 3
) -> MobileNetV3:
    _check_no_multi_grid("mobilenet_v3_small", multi_grid)
    return MobileNetV3(size="small", output_stride=output_stride, in_channels=in_channels)
