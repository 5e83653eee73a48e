"""The inference fast path: BatchNorm folded into convolutions, channels_last, no work for padding-only taps, prepacked
weights and fused activations.

`optimize_for_inference(model)` returns a new model (the argument is untouched) that computes the same function:

- **BatchNorm folding.** Every BatchNorm that directly follows a convolution is folded into that convolution's
  weight and bias (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaced by
  an identity. The outputs equal the unfolded model's up to float rounding (the products are associated
  differently): a relative difference of order 1e-6, checked per backbone in tests/test_fast.py.
- **Image pooling projected once.** With BatchNorm folded, ASPP's projection of its image-pooling branch (one
  vector per image, broadcast over the map) is computed once per image and added before the ReLU, instead of at
  every position of the concatenation (`PooledProjectionASPP`; export does the same).
- **channels_last.** Weights and the input are laid out NHWC, which oneDNN's CPU convolutions (and cuDNN's tensor
  cores) run faster; the logits come back in the same layout, with identical values.
- **Padding-only taps.** A 3x3 convolution with dilation d on a map of height h <= d reads padding with its top
  and bottom rows of taps at every output position, so it is computed with only its middle row (likewise
  columns when w <= d): a 3x1, 1x3 or 1x1 convolution that gives exactly the same numbers, since every dropped
  tap multiplied zero. This is decided per call from the input's size, so one model serves every size; at 513x513
  and output stride 16 no tap qualifies, at 257x257 ASPP's rate-18 branch does.
- **Prepacked weights.** On CPU, PyTorch hands oneDNN plain weights and oneDNN reorders them into its blocked
  layout on every call (0.28 ms of a 2.5 ms 728->728 1x1 conv on a 17x17 map). Each convolution here keeps the
  reordered weight per input shape (`PackedConv2d`; oneDNN picks the layout from the shape, so a weight packed for
  one shape can be the wrong one for another) and calls oneDNN's convolution on it directly, the op that
  ``torch.compile`` uses for frozen weights. The outputs equal F.conv2d's up to float rounding (bit-identical in
  most shapes). The last `prepacked_shapes` input shapes are kept per convolution, each costing one more copy of
  the weights.
- **Fused activations and residual sums.** On the prepacked path oneDNN applies a ReLU (ReLU6) that directly follows
  a convolution as it writes the output, instead of a second pass over the map (`fuse_activations`): in every
  Sequential, in Xception's ReLU before a separable conv, and in ResNet units, whose last conv also adds the
  shortcut. Never into the convs that produce the decoder's low-level feature, which is read before its ReLU.
  Bit-identical to the separate ops.

The folded model is for inference only: it has no BatchNorm left to train, and its state dict differs from the
checkpoint's. `eval`, `predict` and `benchmarks/latency.py` use it by default (``--no-fast`` turns it off); export
folds BatchNorm too but keeps the full 3x3 kernels and plain weights, since an exported graph must serve every
input size and use only standard ops.
"""

from __future__ import annotations

import copy
import ctypes
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _python_dispatch

from ..models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from ..models.backbones.xception import Xception
from ..models.heads import ASPP
from ..models.layers import DepthwiseConv2d, depthwise_shifted, runs_shifted

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
    # Built on the meta device, its parameters then replaced: no random initialisation of weights that are
    # overwritten next (a TapSkippingConv2d stays one). Not nn.utils.skip_init, whose `to_empty` of meta tensors
    # imports torch's Python reference ops and sympy on first use (half a second of every start-up).
    fused = type(conv)(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode, device="meta",
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        # Fold in float64, round once to the weight's dtype.
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = (bias - bn.running_mean.double()) * scale + shift
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype).contiguous())
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype))
    return fused


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d (see `_PAIRS`, and any two neighbours in a
    Sequential, as torchvision's VGG `features` and DenseNet layers have them); returns how many."""
    folded = 0
    for module in list(model.modules()):
        children = dict(module.named_children())
        pairs = list(_PAIRS)
        if isinstance(module, nn.Sequential):
            pairs += [pair for pair in zip(children, list(children)[1:]) if pair not in _PAIRS]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if type(conv) in (nn.Conv2d, DepthwiseConv2d, TapSkippingConv2d) and type(bn) is nn.BatchNorm2d:
                folded_conv = fold_conv_bn(conv, bn)
                # Hooks on the conv (a converted uint8 model's activation rounding) stay with its replacement.
                folded_conv._forward_hooks.update(conv._forward_hooks)
                folded_conv._forward_pre_hooks.update(conv._forward_pre_hooks)
                setattr(module, conv_name, folded_conv)
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


class PooledProjectionASPP(nn.Module):
    """ASPP with BatchNorm folded (same function) whose image-pooling branch is projected once per image.

    The pooling branch is constant over the map, so its share of the 1x1 projection of the concatenation, W_pool p,
    is one vector per image: added to the projection of the other branches before the ReLU, it gives the same
    numbers (up to float rounding) without projecting the broadcast copy at every position, nor concatenating it.
    This saves C_pool x C_out multiply-adds per position: 10% of MobileNetV2 dm0.5's work at 257x257, 20% of the
    projection of a five-branch ASPP.
    """

    def __init__(self, aspp: ASPP) -> None:
        super().__init__()
        conv = aspp.project.conv
        n = aspp.pooling.conv.out_channels
        self.pooling = aspp.pooling
        self.pooling.broadcast = False
        self.branches = aspp.branches
        self.project = nn.Conv2d(conv.in_channels - n, conv.out_channels, 1, bias=True)
        self.project_pool = nn.Conv2d(n, conv.out_channels, 1, bias=False)
        with torch.no_grad():
            self.project.weight.copy_(conv.weight[:, n:])
            self.project.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
            self.project_pool.weight.copy_(conv.weight[:, :n])
        self.act = aspp.project.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        y = self.project(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        return self.act(y + self.project_pool(self.pooling(x)))


def pool_projection(model: nn.Module) -> int:
    """Make every ASPP with image pooling and a folded projection a `PooledProjectionASPP`, in place; returns how
    many. An ASPP with hooks on any of its modules (a converted uint8 model's activation rounding reads the
    concatenation) is left as it is."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not (isinstance(child, ASPP) and child.pooling is not None and type(child.project.bn) is nn.Identity):
                continue
            if any(m._forward_hooks or m._forward_pre_hooks for m in child.modules()):
                continue
            replacement = PooledProjectionASPP(child).to(child.project.conv.weight)
            setattr(module, name, replacement)
            count += 1
    return count


def _prepackable(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether `conv` may run on a prepacked weight for `x`: CPU inference in eager mode, fp32 (or bf16, where oneDNN
    runs it: a model made with ``dtype=torch.bfloat16``).

    Not under a dispatch mode either (FlopCounterMode, FakeTensorMode), which would not know the oneDNN op.
    """
    return (
        conv.prepacked_shapes > 0 and x.device.type == "cpu" and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        and x.dim() == 4 and conv.padding_mode == "zeros"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available()
        and _python_dispatch._get_current_dispatch_mode() is None
    )


class PackedConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state dict) that, on CPU, keeps oneDNN's reordered copy of its weight.

    For the last `prepacked_shapes` input shapes it keeps ``torch.ops.mkldnn._reorder_convolution_weight``'s result
    and calls ``torch.ops.mkldnn._convolution_pointwise`` on it, with the input in channels_last; anywhere else (GPU,
    bf16 autocast, gradients, tracing, export, `prepacked_shapes` 0) it is a plain Conv2d. A weight changed in
    place or replaced is packed again (the cache key holds its storage pointer and version counter).

    `activation` ("none", "relu" or "hardtanh" with `activation_scalars` (min, max), ReLU6's) is applied to the
    output: by oneDNN as a post-op on the prepacked path, in place after F.conv2d otherwise (`fuse_activations`).

    `variant` names a kernel derived from the weight (`TapSkippingConv2d`'s cropped taps): `make_weight()` builds
    it, and only when it is needed, on a plain call or a cache miss.
    """

    prepacked_shapes = 0
    activation = "none"
    activation_scalars: tuple[float, ...] = ()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(conv(x) + residual)``; without `residual`, ``activation(conv(x))``."""
        return self._conv(x, lambda: self.weight, self.padding, variant=None, residual=residual)

    def _activate(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            y += residual
        if self.activation == "relu":
            return F.relu(y, inplace=True)
        if self.activation == "hardtanh":
            return F.hardtanh(y, *self.activation_scalars, inplace=True)
        return y

    def _conv(self, x: torch.Tensor, make_weight, padding, *, variant, residual=None) -> torch.Tensor:
        weight = self.weight
        if not _prepackable(x, weight, self) or (residual is not None and residual.dtype != x.dtype):
            y = F.conv2d(x, make_weight(), self.bias, self.stride, padding, self.dilation, self.groups)
            return self._activate(y, residual)
        # NHWC, as F.conv2d would make it for a channels_last weight (ASPP's concatenation of a broadcast pooling
        # branch comes out NCHW)
        x = x.contiguous(memory_format=torch.channels_last)
        cache = self.__dict__.setdefault("_packed", {})
        # (inference tensors have no version counter: a weight made under inference_mode is taken as fixed)
        version = None if weight.is_inference() else weight._version
        key = (tuple(x.shape), variant, weight.data_ptr(), version)
        packed = cache.pop(key, None)  # re-inserted below: the dict's order is least recently used first
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                make_weight(), list(padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)
            )
            while len(cache) >= self.prepacked_shapes:
                del cache[next(iter(cache))]
        cache[key] = packed
        # The OpOverloads themselves: calling the packet re-resolves the overload on every call (~16 us here).
        args = (list(padding), list(self.stride), list(self.dilation), self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise.default(
                x, packed, self.bias, *args, self.activation, list(self.activation_scalars), None
            )
        # oneDNN's binary post-op: the sum as the conv writes its output, then a ReLU (bit-equal to the separate
        # ops); it takes no other activation after a sum.
        residual = residual.contiguous(memory_format=torch.channels_last)
        unary = "relu" if self.activation == "relu" else None
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, packed, self.bias, *args, "add", None, unary, [], None
        )
        return y if unary == "relu" else self._activate(y)

    def __getstate__(self):  # deepcopy and pickle: the packed weights are a cache, rebuilt on demand
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class TapSkippingConv2d(PackedConv2d):
    """A 3x3 dilated, stride-1, 'same'-padded Conv2d that does no work for taps that only read padding.

    Rows (columns) of taps that read only padding are dropped from the kernel; a depthwise conv at a large dilation
    on a channels_last input runs as shifted multiply-adds over each tap's valid window (`depthwise_shifted`).
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.groups == self.in_channels == self.out_channels and runs_shifted(x, self.dilation):
            return self._activate(depthwise_shifted(x, self.weight, self.bias, self.dilation), residual)
        h, w = x.shape[-2:]
        dh, dw = self.dilation
        skip_rows, skip_cols = dh >= h, dw >= w
        if not (skip_rows or skip_cols):
            return super().forward(x, residual)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)

        def cropped_weight() -> torch.Tensor:  # built on a plain call or a cache miss only
            weight = self.weight[:, :, 1:2] if skip_rows else self.weight
            weight = weight[:, :, :, 1:2] if skip_cols else weight
            return weight.contiguous(memory_format=torch.channels_last) if channels_last else weight

        padding = (0 if skip_rows else dh, 0 if skip_cols else dw)
        return self._conv(x, cropped_weight, padding, variant=(skip_rows, skip_cols), residual=residual)


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


def prepack_weights(model: nn.Module, *, shapes: int) -> int:
    """Make every Conv2d a `PackedConv2d` keeping `shapes` input shapes (0: plain convs), in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        if type(module) in (nn.Conv2d, DepthwiseConv2d):
            module.__class__ = PackedConv2d  # same parameters and state dict; only forward changes
        if isinstance(module, PackedConv2d):
            module.prepacked_shapes = shapes
            module.__dict__.pop("_packed", None)
            count += 1
    return count


# Activation modules a PackedConv2d can apply as a oneDNN post-op: (attribute, its scalars from the module).
_POST_OPS = {nn.ReLU: lambda act: ("relu", ()), nn.ReLU6: lambda act: ("hardtanh", (act.min_val, act.max_val))}


def fuse_activations(model: nn.Module) -> int:
    """Fold, in place, every ReLU/ReLU6 that follows a `PackedConv2d` in a Sequential (identities between them, as
    folded BatchNorms leave) into that conv's `activation`; the activation becomes an identity. Returns how many.

    A Sequential hands each child's output to the next child only, so nothing reads the conv's output before the
    activation. oneDNN applies it to the output as it writes it, saving a pass over the map; the values are the
    same (max(y, 0) and min(max(y, 0), 6) are exact). Activations applied inside a backbone's forward are fused
    where the backbone's structure allows: Xception's ReLU before a separable conv (`_fuse_xception_relus`) and
    ResNet's bottleneck ReLUs and residual sum (`_fuse_bottlenecks`).
    """
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for i, (_, conv) in enumerate(children):
                if not isinstance(conv, PackedConv2d) or conv.activation != "none":
                    continue
                j = i + 1
                while j < len(children) and type(children[j][1]) is nn.Identity:
                    j += 1
                if j < len(children) and type(children[j][1]) in _POST_OPS:
                    conv.activation, conv.activation_scalars = _POST_OPS[type(children[j][1])](children[j][1])
                    setattr(module, children[j][0], nn.Identity())
                    fused += 1
        if isinstance(module, Xception):
            fused += _fuse_xception_relus(module)
        if isinstance(module, ResNet):
            fused += _fuse_bottlenecks(module)
    return fused


class FusedBottleneck(Bottleneck):
    """A ResNet bottleneck whose three ReLUs and residual addition run inside its convolutions (same parameters):
    conv1 and conv2 apply their ReLU, conv3 adds the shortcut and applies the last one. Built by
    `fuse_activations` from a bottleneck whose BatchNorms are folded (identities) and convs are `PackedConv2d`s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)), residual=self.skip(x))


class FusedBasicBlock(BasicBlock):
    """ResNet-18/34's unit with its ReLUs and residual addition inside its convolutions (as `FusedBottleneck`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=skip)


def _fuse_bottlenecks(backbone: ResNet) -> int:
    """Every folded bottleneck (or basic block) but the one whose residual branch is the low-level tap (read before
    the addition)."""
    fused = 0
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for index, unit in enumerate(getattr(backbone, name)):
            if type(unit) is Bottleneck:
                convs, bns, kind = (unit.conv1, unit.conv2, unit.conv3), (unit.bn1, unit.bn2, unit.bn3), FusedBottleneck
            elif type(unit) is BasicBlock:
                convs, bns, kind = (unit.conv1, unit.conv2), (unit.bn1, unit.bn2), FusedBasicBlock
            else:
                continue
            if (
                not (name == "layer1" and index == backbone.low_level_unit)
                and all(type(bn) is nn.Identity for bn in bns)
                and all(isinstance(c, PackedConv2d) and c.activation == "none" for c in convs)
                and type(unit.relu) is nn.ReLU
            ):
                for conv in convs:
                    conv.activation = "relu"
                unit.__class__ = kind
                fused += len(convs)
    return fused


def _fuse_xception_relus(backbone: Xception) -> int:
    """Xception's ReLU before a separable conv (TF's ``activation_fn_in_separable_conv=False``) into the previous
    separable conv's pointwise conv, when that output feeds nothing else: not the first conv of a module (its
    input also feeds the shortcut), nor the third of the module whose second conv's output is the low-level tap
    (the decoder reads it before the ReLU)."""
    fused = 0
    for index, block in enumerate(backbone.blocks):
        for j in (1, 2):
            separable, previous = block.convs[j], block.convs[j - 1]
            conv, *rest = previous.pointwise
            if (
                separable.relu_on_input and not (index == backbone.low_level_index and j == 2)
                and isinstance(conv, PackedConv2d) and conv.activation == "none"
                and all(type(m) is nn.Identity for m in rest)
            ):
                conv.activation, separable.relu_on_input = "relu", False
                fused += 1
    return fused


def optimize_for_inference(
    model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True, skip_taps: bool = True,
    prepacked_shapes: int = 4, dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A copy of `model` in eval mode with the fast path applied (see the module docstring).

    `prepacked_shapes`: how many input shapes each convolution keeps oneDNN's packed weights for (CPU, fp32 or bf16,
    channels_last only; 0 turns it off). Multi-scale evaluation with more scales than this repacks per call,
    which costs what the plain path's per-call reorder does.

    `dtype` torch.bfloat16: the network's weights and activations in bf16 (BatchNorm folded in float64 first, then
    rounded once), prepacked for oneDNN's bf16 kernels (AMX or AVX512_BF16 where the CPU has them); the classifier
    and the upsampling to the input size stay float32, so the logits come back float32 and are not rounded to bf16's
    8 bits before the argmax. The logits differ from float32's: `deeplab.deploy.precision` checks the argmax.
    """
    if prepacked_shapes < 0:
        raise ValueError(f"prepacked_shapes={prepacked_shapes}: use 0 (off) or a positive number of input shapes")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: the fast path runs torch.float32 or torch.bfloat16")
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if skip_taps:
        skip_padding_taps(fast)
    if fold_bn:
        fold_batchnorm(fast)
        pool_projection(fast)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
        fast.register_forward_pre_hook(_channels_last_input)
    shapes = prepacked_shapes if channels_last else 0
    prepack_weights(fast, shapes=shapes)
    if shapes:
        fuse_activations(fast)
    if dtype == torch.bfloat16:
        _in_bfloat16(fast)
    fast.fast_path = {
        "fold_bn": fold_bn, "channels_last": channels_last, "skip_taps": skip_taps, "prepacked_shapes": shapes,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return fast


def _in_bfloat16(fast: nn.Module) -> None:
    """`fast`'s network in bf16, its classifier float32: the input is cast to bf16 on the way in, the classifier's
    input back to float32."""
    if getattr(fast, "point_head", None) is not None:
        raise ValueError("PointRend's subdivision reads backbone features at points: the bf16 fast path does not run it")
    classifier = getattr(fast, "classifier", None)
    fast.to(torch.bfloat16)
    fast.register_forward_pre_hook(_cast_input(torch.bfloat16))
    if classifier is not None:
        classifier.float()
        classifier.register_forward_pre_hook(_cast_input(torch.float32))


def _cast_input(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x.to(dtype), *args[1:]) if isinstance(x, torch.Tensor) and x.is_floating_point() else args

    return hook


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def is_fast(model: nn.Module) -> bool:
    return bool(getattr(model, "fast_path", None))


# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process for reuse; returns False where that is not glibc.

    PyTorch's CPU tensors come from malloc, and glibc serves blocks above its mmap threshold (at most 32 MiB) with a
    fresh mmap() that free() hands back to the kernel: every forward pass then page-faults its large activations in
    again, and the kernel zeroes each page. This sets ``M_MMAP_MAX=0`` (every block from the heap) and the largest
    ``M_TRIM_THRESHOLD`` (the heap is not shrunk), as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.
    trim_threshold=2147483647`` would at start-up. Measured on 2 threads: Xception-65 DeepLabv3+ at 1025x1025
    about 20% faster, a MobileNetV2 training step at batch 2, crop 513 about 15% faster; peak resident memory
    15-18% higher, since the heap stays at its high-water mark.

    It changes the whole process, so the library never calls it on import: the `deeplab` command and the
    benchmarks call it at start-up, and a program using the Python API may do the same.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Have glibc's malloc use at most `arenas` arenas (as ``MALLOC_ARENA_MAX`` would); returns False where that is not
    glibc. A server decodes, runs and encodes on many threads, and glibc gives each thread that contends an arena of
    its own, which keeps its freed memory (`retain_freed_memory`): resident memory then climbs with every new thread.
    `deeplab serve` calls both at start-up; with 2 arenas its memory levels off after about 1,500 requests
    (`benchmarks/serve_load.py`, docs/serve.md).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, int(arenas)))
