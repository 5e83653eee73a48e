"""Building blocks shared by the backbones and the DeepLab heads: ConvBN(ReLU), atrous separable conv, ASPP, decoder."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# TF DeepLab's heads use epsilon 1e-5 (model.py); TF's MobileNetV2 and Xception use 1e-3.
HEAD_BN_EPS = 1e-5

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


# oneDNN's channels_last depthwise convolution is slow at large dilations (measured here at 1 thread on a
# 2048 x 33 x 33 map: 3 ms at dilation 2, 155 ms at 6, 114 ms at 18); from this dilation on, a depthwise 3x3 runs as
# nine shifted multiply-adds over the valid window of each tap instead (11 ms at 6, 6 ms at 18).
SHIFTED_DEPTHWISE_MIN_DILATION = 4


def depthwise_shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int]):
    """A 'same'-padded, stride-1 depthwise 3x3 conv as nine shifted multiply-adds on an NHWC view of `x`.

    Each tap touches only the output positions where it reads inside the map, so taps that read padding cost
    nothing. Equal to F.conv2d up to summation order. `x` must be channels_last; so is the result.
    """
    n, c, h, w = x.shape
    xn = x.permute(0, 2, 3, 1)  # (N, H, W, C), a view of the channels_last memory
    k = weight.to(x.dtype).reshape(c, 9).t()  # (9, C): tap-major
    out = xn * k[4] if bias is None else torch.addcmul(bias.to(x.dtype), xn, k[4])
    dh, dw = dilation
    for ky in (-1, 0, 1):
        for kx in (-1, 0, 1):
            oy, ox = ky * dh, kx * dw
            if (ky == 0 and kx == 0) or abs(oy) >= h or abs(ox) >= w:
                continue
            y0, y1, x0, x1 = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
            out[:, y0:y1, x0:x1].addcmul_(xn[:, y0 + oy : y1 + oy, x0 + ox : x1 + ox], k[(ky + 1) * 3 + kx + 1])
    return out.permute(0, 3, 1, 2)


class _DepthwiseConv3x3(torch.autograd.Function):
    """A stride-1 'same' depthwise 3x3 whose backward is built from forward-speed pieces.

    oneDNN's depthwise backward is far slower than its forward here (16 x 480 x 4 x 4 at dilation 2, one thread:
    0.14 ms forward, 12 ms backward; 8 x 960 x 21 x 21: 4 ms against 160 ms). The input gradient of a stride-1 'same'
    correlation is the correlation of the output gradient with the kernel turned 180 degrees, a forward depthwise
    conv; the weight gradient of each of the nine taps is one multiply-and-sum over the window where that tap reads
    inside the map. Equal to autograd through F.conv2d up to summation order (tests/test_models.py, float64).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        ctx.has_bias = bias is not None
        return _depthwise_forward(x, weight, bias, dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        dh, dw = ctx.dilation
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _depthwise_forward(grad, weight.flip((2, 3)), None, ctx.dilation)
        if ctx.needs_input_grad[1]:
            n, c, h, w = x.shape
            gn, xn = grad.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)  # NHWC views: free for channels_last
            taps = []
            for ky in (-1, 0, 1):
                for kx in (-1, 0, 1):
                    oy, ox = ky * dh, kx * dw
                    if abs(oy) >= h or abs(ox) >= w:  # this tap only ever multiplied padding
                        taps.append(grad.new_zeros(c))
                        continue
                    y0, y1, x0, x1 = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
                    window = gn[:, y0:y1, x0:x1] * xn[:, y0 + oy : y1 + oy, x0 + ox : x1 + ox]  # (N, h', w', C)
                    taps.append(window.sum((0, 1, 2)))
            grad_w = torch.stack(taps, 1).view(c, 1, 3, 3).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def runs_shifted(x: torch.Tensor, dilation: tuple[int, int]) -> bool:
    """Whether a depthwise 3x3 at this dilation on `x` runs as `depthwise_shifted` (see SHIFTED_DEPTHWISE_MIN_DILATION)."""
    return (x.device.type == "cpu" and min(dilation) >= SHIFTED_DEPTHWISE_MIN_DILATION
            and x.is_contiguous(memory_format=torch.channels_last))


def _depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int]):
    if runs_shifted(x, dilation):
        return depthwise_shifted(x, weight, bias, dilation)
    return F.conv2d(x, weight, bias, 1, dilation, dilation, x.shape[1])


class DepthwiseConv2d(nn.Conv2d):
    """A dilated stride-1 'same' depthwise 3x3 Conv2d (same parameters and state dict) that trains faster on CPU.

    With gradients to compute it runs `_DepthwiseConv3x3`; otherwise (inference, export) it is a plain Conv2d.
    `conv_bn` uses it at dilation > 1 only: at dilation 1 oneDNN's own backward is the faster one (the synthetic
    default's training step, one thread: 185 ms with every stride-1 depthwise on this path, 140 ms with the dilated
    ones only, 200 ms with none).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU only: elsewhere (cuDNN) the library's own backward is the fast one.
        if (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and not torch.jit.is_tracing()):
            weight, bias = self.weight, self.bias
            if torch.is_autocast_enabled("cpu"):
                # An autograd Function's backward runs outside autocast, so the casts autocast would make inside
                # forward are made here, where autograd records them: the Function then works in one dtype forward
                # and backward, and the gradients reach the float32 parameters through the casts.
                dtype = torch.get_autocast_dtype("cpu")
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
                with torch.autocast("cpu", enabled=False):
                    return _DepthwiseConv3x3.apply(x, weight, bias, self.dilation)
            return _DepthwiseConv3x3.apply(x, weight, bias, self.dilation)
        return super().forward(x)


def conv_bn(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int = 1,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    activation: str | None = "relu",
    bn_eps: float = HEAD_BN_EPS,
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ activation), 'same' padding: the unit every DeepLab layer is made of.

    Padding is symmetric, dilation * (k - 1) / 2 on each side. TF's 'SAME' pads asymmetrically for even inputs
    to strided convs; at the 16k+1 crop sizes TF DeepLab uses (513, 257), every strided input is odd and the two agree.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    # A dilated stride-1 depthwise 3x3 gets the faster backward (same parameters, same function).
    dilated_depthwise = groups == in_channels == out_channels and kernel_size == 3 and stride == 1 and dilation > 1
    layers["conv"] = (DepthwiseConv2d if dilated_depthwise else nn.Conv2d)(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        groups=groups,
        bias=False,
    )
    layers["bn"] = nn.BatchNorm2d(out_channels, eps=bn_eps)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        layers["act"] = ACTIVATIONS[activation](inplace=True)
    return nn.Sequential(layers)


def separable_conv_bn_relu(
    in_channels: int, out_channels: int, *, dilation: int = 1, bn_eps: float = HEAD_BN_EPS
) -> nn.Sequential:
    """Atrous separable convolution (DeepLabv3+ §3.1): depthwise 3x3 with dilation + BN + ReLU, then 1x1 + BN + ReLU.

    TF DeepLab's `split_separable_conv2d`, used in ASPP and the decoder when separable convolution is on.
    """
    return nn.Sequential(
        OrderedDict(
            depthwise=conv_bn(in_channels, in_channels, kernel_size=3, dilation=dilation, groups=in_channels, bn_eps=bn_eps),
            pointwise=conv_bn(in_channels, out_channels, kernel_size=1, bn_eps=bn_eps),
        )
    )


def conv3x3_bn_relu(in_channels: int, out_channels: int, *, dilation: int = 1, separable: bool = False) -> nn.Sequential:
    """A 3x3 (atrous) conv + BN + ReLU, plain or atrous separable."""
    if separable:
        return separable_conv_bn_relu(in_channels, out_channels, dilation=dilation)
    return conv_bn(in_channels, out_channels, kernel_size=3, dilation=dilation)




def recomputed(fn: Callable[..., torch.Tensor], owner: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """`fn(*inputs)` whose activations are recomputed in the backward pass instead of kept (torch.utils.checkpoint,
    non-reentrant: autocast and the dropout RNG are replayed). The recomputation must not count a batch twice in the
    BatchNorm running statistics, so it runs every BN of `owner` with momentum 0 (statistics unchanged) and puts
    back its batch counter. Gradients equal those of `fn` run plainly (tests/test_models.py)."""
    from torch.utils.checkpoint import checkpoint

    first = [True]

    def run(*xs: torch.Tensor) -> torch.Tensor:
        if first[0]:
            first[0] = False
            return fn(*xs)
        bns = [m for m in owner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        kept = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            return fn(*xs)
        finally:
            for m, (momentum, count) in zip(bns, kept):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

    return checkpoint(run, *inputs, use_reentrant=False)
