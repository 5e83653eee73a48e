"""The inference fast path: BatchNorm folded into convolutions, channels_last, and no work for padding-only taps.

`optimize_for_inference(model)` returns a new model (the argument is untouched) that computes the same function:

- **BatchNorm folding.** Every BatchNorm that directly follows a convolution is folded into that convolution's
  weight and bias (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaced by
  an identity. The outputs equal the unfolded model's up to float rounding (the products are associated
  differently): a relative difference of order 1e-6, checked per backbone in tests/test_fast.py.
- **channels_last.** Weights and the input are laid out NHWC, which oneDNN's CPU convolutions (and cuDNN's tensor
  cores) run faster; the logits come back in the same layout, with identical values.
- **Padding-only taps.** A 3x3 convolution with dilation d on a map of height h <= d reads padding with its top
  and bottom rows of taps at every output position, so it is computed with only its middle row (likewise
  columns when w <= d): a 3x1, 1x3 or 1x1 convolution that gives exactly the same numbers, since every dropped
  tap multiplied zero. This is decided per call from the input's size, so one model serves every size; at 513x513
  and output stride 16 no tap qualifies, at 257x257 ASPP's rate-18 branch does.

The folded model is for inference only: it has no BatchNorm left to train, and its state dict differs from the
checkpoint's. `eval`, `predict` and `benchmarks/latency.py` use it by default (``--no-fast`` turns it off); export
folds BatchNorm too but keeps the full 3x3 kernels, since an exported graph must serve every input size.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DepthwiseConv2d, depthwise_shifted, runs_shifted

# (convolution, batch norm) child-name pairs that are applied in that order, directly: conv_bn's Sequential
# ("conv", "bn"), ImagePooling ("conv", "bn"), torchvision's Bottleneck and stem ("convN", "bnN"), and a
# downsample/shortcut Sequential ("0", "1").
_PAIRS = (("conv", "bn"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("0", "1"))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` with `bn` in inference mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm of {bn.num_features} features after a conv of {conv.out_channels} channels")
    # skip_init: no random initialisation of weights that are overwritten next (a TapSkippingConv2d stays one).
    fused = nn.utils.skip_init(
        type(conv), conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        # Fold in float64, round once to the weight's dtype.
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean.double()) * scale + shift)
    return fused


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d (see `_PAIRS`); returns how many."""
    folded = 0
    for module in list(model.modules()):
        children = dict(module.named_children())
        for conv_name, bn_name in _PAIRS:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if type(conv) in (nn.Conv2d, DepthwiseConv2d, TapSkippingConv2d) and type(bn) is nn.BatchNorm2d:
                setattr(module, conv_name, fold_conv_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


class TapSkippingConv2d(nn.Conv2d):
    """A 3x3 dilated, stride-1, 'same'-padded Conv2d that does no work for taps that only read padding.

    Rows (columns) of taps that read only padding are dropped from the kernel; a depthwise conv at a large dilation
    on a channels_last input runs as shifted multiply-adds over each tap's valid window (`depthwise_shifted`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == self.in_channels == self.out_channels and runs_shifted(x, self.dilation):
            return depthwise_shifted(x, self.weight, self.bias, self.dilation)
        h, w = x.shape[-2:]
        dh, dw = self.dilation
        skip_rows, skip_cols = dh >= h, dw >= w
        if not (skip_rows or skip_cols):
            return super().forward(x)
        weight = self.weight[:, :, 1:2] if skip_rows else self.weight
        weight = weight[:, :, :, 1:2] if skip_cols else weight
        if x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        padding = (0 if skip_rows else dh, 0 if skip_cols else dw)
        return F.conv2d(x, weight, self.bias, 1, padding, self.dilation, self.groups)


def _skips_taps(conv: nn.Module) -> bool:
    return (
        type(conv) in (nn.Conv2d, DepthwiseConv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and max(conv.dilation) > 1 and conv.padding == conv.dilation and conv.padding_mode == "zeros"
    )


def skip_padding_taps(model: nn.Module) -> int:
    """Make every dilated 3x3 'same' conv a `TapSkippingConv2d` (same parameters), in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _skips_taps(child):
                child.__class__ = TapSkippingConv2d  # same parameters and state dict; only forward changes
                count += 1
    return count


def optimize_for_inference(
    model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True, skip_taps: bool = True
) -> nn.Module:
    """A copy of `model` in eval mode with the fast path applied (see the module docstring)."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if skip_taps:
        skip_padding_taps(fast)
    if fold_bn:
        fold_batchnorm(fast)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
        fast.register_forward_pre_hook(_channels_last_input)
    fast.fast_path = {"fold_bn": fold_bn, "channels_last": channels_last, "skip_taps": skip_taps}
    return fast


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def is_fast(model: nn.Module) -> bool:
    return bool(getattr(model, "fast_path", None))
