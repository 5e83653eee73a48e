"""DeepLab's heads: v1's LargeFOV, v2's ASPP-L, ASPP with image-level pooling (v3) and the v3+ decoder.

Which published model each matches, and where its description comes from, is in docs/family.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import HEAD_BN_EPS, conv3x3_bn_relu, conv_bn


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pooling, 1x1 conv + BN + ReLU, broadcast back to the feature size.

    The mean over H and W (not AdaptiveAvgPool2d) exports to ONNX with dynamic height and width. TF pools with a
    kernel of the crop's feature size, which equals the global mean at the crop size. Upsampling a 1x1 map bilinearly
    (with or without align_corners) is a broadcast, so it is done with `expand`.

    BatchNorm over a (N, C, 1, 1) map has one value per channel when N == 1, where PyTorch's batch statistics are
    undefined (it raises). With a single image per batch in training, this branch normalises with its running
    statistics and leaves them untouched; with N > 1 (or under SyncBatchNorm) it is ordinary batch norm.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=HEAD_BN_EPS)
        self.act = nn.ReLU(inplace=True)

    broadcast = True  # False: return the (N, C, 1, 1) value itself (`deeplab.deploy.fast.PooledProjectionASPP`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))  # (N, C, 1, 1)
        if self.bn.training and y.shape[0] == 1 and type(self.bn) is nn.BatchNorm2d:
            bn = self.bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        else:
            y = self.bn(y)
        y = self.act(y)
        return y.expand(-1, -1, h, w) if self.broadcast else y


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3 §3.3), branch order as TF DeepLab (so TF weights line up):
    [image pooling], 1x1, one 3x3 atrous branch per rate; concatenated, projected by 1x1 + BN + ReLU, dropout.

    `rates=()` keeps only the 1x1 branch (and pooling): the official MobileNetV2 models.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        *,
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        image_pooling: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.pooling = ImagePooling(in_channels, out_channels) if image_pooling else None
        branches = [conv_bn(in_channels, out_channels, kernel_size=1)]
        branches += [conv3x3_bn_relu(in_channels, out_channels, dilation=r, separable=separable) for r in self.rates]
        self.branches = nn.ModuleList(branches)
        num_branches = len(branches) + (1 if image_pooling else 0)
        self.project = conv_bn(num_branches * out_channels, out_channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [] if self.pooling is None else [self.pooling(x)]
        outs += [branch(x) for branch in self.branches]  # each (N, 256, H/os, W/os)
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class Decoder(nn.Module):
    """DeepLabv3+ decoder (§3.1, the paper's best of Tables 1-2): project the stride-4 feature to 48 channels,
    upsample the encoder output bilinearly to its size (x4 up to rounding), concatenate [encoder, low-level] as TF
    does, refine with two 3x3 convs of 256 channels.
    """

    def __init__(
        self,
        low_level_in: int,
        encoder_channels: int = 256,
        *,
        low_level_channels: int = 48,
        channels: int = 256,
        separable: bool = False,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.project = conv_bn(low_level_in, low_level_channels, kernel_size=1)
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(encoder_channels + low_level_channels, channels, separable=separable),
            conv3x3_bn_relu(channels, channels, separable=separable),
        )

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.project(low_level)  # (N, 48, H/4, W/4)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.fuse(torch.cat([x, low], dim=1))  # (N, 256, H/4, W/4)


# DeepLab v1/v2's fc6/fc7 width (1024 of VGG's 4096 filters: the v1 paper's LargeFOV) and their dropout.
FC_CHANNELS = 1024
FC_DROPOUT = 0.5


def fc_layers(in_channels: int, *, rate: int) -> OrderedDict[str, nn.Module]:
    """fc6 (3x3, dilation `rate`, 1024 channels) + ReLU + dropout 0.5, fc7 (1x1, 1024) + ReLU + dropout 0.5: DeepLab v1/v2's
    convolutionalised VGG-16 fully connected layers, with biases and no BatchNorm, as in their Caffe prototxts."""
    return OrderedDict(
        fc6=nn.Conv2d(in_channels, FC_CHANNELS, 3, padding=rate, dilation=rate),
        relu6=nn.ReLU(inplace=True),
        drop6=nn.Dropout(FC_DROPOUT),
        fc7=nn.Conv2d(FC_CHANNELS, FC_CHANNELS, 1),
        relu7=nn.ReLU(inplace=True),
        drop7=nn.Dropout(FC_DROPOUT),
    )


class LargeFOV(nn.Sequential):
    """DeepLab v1's LargeFOV head up to fc7 (the v1 paper, Table 2: "DeepLab-LargeFOV", kernel 3x3, input stride 12,
    1024 channels): fc6, fc7 of `fc_layers`. Its fc8, the 1x1 conv to the classes, is `DeepLab.classifier`.

    On VGG-16 at output stride 8 (rate 12) this is the published DeepLab-LargeFOV: 20.5 M parameters with 21 classes.
    """

    def __init__(self, in_channels: int, *, rate: int = 12) -> None:
        super().__init__(fc_layers(in_channels, rate=rate))
        self.rate = int(rate)


class ASPPL(nn.Module):
    """DeepLab v2's ASPP-L (the v2 paper, §3.3 and Fig. 4): one branch per rate (6, 12, 18, 24 at output stride 8), each
    ending in its own logits, summed.

    - `fc=True` (DeepLab-ASPP on VGG-16): each branch is fc6 (3x3 at its rate, 1024) -> fc7 (1x1, 1024) -> fc8 (1x1,
      classes), with ReLU and dropout 0.5 after fc6 and fc7 (`fc_layers`).
    - `fc=False` (DeepLab v2 on ResNet-101): each branch is a single 3x3 conv at its rate from the backbone's output
      straight to the classes, with a bias, no BatchNorm, no dropout (`conv`; Caffe's `fc1_voc12_c0..c3`).

    The logits layers (`logits_layers`) start as the prototxts' fc8: Gaussian weights of std 0.01, zero bias.
    """

    def __init__(self, in_channels: int, num_classes: int, *, rates: Sequence[int] = (6, 12, 18, 24), fc: bool = True) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        branches = []
        for r in self.rates:
            if fc:
                layers = fc_layers(in_channels, rate=r)
                layers["fc8"] = nn.Conv2d(FC_CHANNELS, num_classes, 1)
            else:
                layers = OrderedDict(conv=nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r))
            branches.append(nn.Sequential(layers))
        self.branches = nn.ModuleList(branches)

    def logits_layers(self) -> list[nn.Conv2d]:
        return [branch[-1] for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)  # (N, K, H/os, W/os)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
