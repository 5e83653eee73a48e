"""Import torchvision and timm state dicts: ImageNet backbones, and torchvision's COCO-trained DeepLabv3.

Every file is read with `torch.load(path, map_location="cpu", weights_only=True)`, so a checkpoint can never run
code; `.safetensors` files are read with the `safetensors` package when it is installed. Common containers are
unwrapped: `{"state_dict": ...}`, `{"model": ...}`, `{"model_state_dict": ...}`, and the `module.` (DDP) or
`_orig_mod.` (torch.compile) prefixes.

Names are matched one for one, from a rename table per source layout; anything left over on either side, or any
shape that differs, gives ONE `CheckpointError` naming the file and listing every unmatched key on both sides.
The only keys dropped on purpose are the classification heads the segmentation model has no use for:

- torchvision / timm ResNet-18/34/50/101/152: `fc.weight`, `fc.bias`.
- torchvision VGG-11/13/16/19 (with and without BN) and DenseNet-121/161/169/201: `classifier.*` (VGG's ImageNet
  fc6-fc8, DenseNet's Linear).
- timm aligned Xception-41/65/71: `head.fc.weight`, `head.fc.bias`. timm's Xception has no layers past the exit flow
  (no conv3/conv4 as in the original Xception), so nothing else is dropped.
- torchvision `deeplabv3_resnet50/101`: `aux_classifier.*` (the FCN head on layer3, used only for the training
  loss); `deeplabv3_mobilenet_v3_large`: `aux_classifier.*` (the FCN head on the first stride-8 block).
- torchvision MobileNetV3-Large/Small (ImageNet): `classifier.*` (avgpool -> Linear -> Linear).

Files of a torchvision architecture deeplab does not build (LR-ASPP, FCN, a MobileNetV3 of another width) are refused
with one line naming what they look like, not a list of mismatched keys.

torchvision's DeepLabHead has one layer deeplab's DeepLabv3 head lacks, a 3x3 conv + BN + ReLU between ASPP and the
classifier; `load_torchvision_deeplabv3` needs `ModelConfig.head_conv` for it (see there).

A missing `*.num_batches_tracked` (files saved before PyTorch 0.4.1, such as torchvision's first ResNet release) is
filled with 0, as `nn.BatchNorm2d` itself does when loading such files.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.backbones import BACKBONES
from ..models.checkpoint import (
    CheckpointError,
    load_state_dict_strict,
    unreadable_message,
)
from ..models.config import ModelConfig, Preprocessing
from ..models.model import DeepLab, build_model

StateDictSource = str | os.PathLike | Mapping[str, Tensor]

# Containers that training scripts wrap a state dict in (timm, torchvision references, Lightning-like loops).
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_state_dict(src: StateDictSource) -> tuple[dict[str, Tensor], str]:
    """(state dict, a name for error messages) from a path or an already loaded dict; containers unwrapped."""
    if isinstance(src, Mapping):
        return _unwrap(src, source="the given state dict"), "the given state dict"
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"expected a file path or a state dict (a mapping of names to tensors), got {type(src).__name__}")
    path = Path(src)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file; pass the path of a .pth/.pt (or .safetensors) weights file")
    if path.suffix == ".safetensors":
        return _unwrap(_read_safetensors(path), source=source), source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing on non-torch pickles
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors all mean "not a file we can read safely"
        raise CheckpointError(unreadable_message(e, source=source)) from None
    return _unwrap(data, source=source), source


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None


def _unwrap(data: object, *, source: str) -> dict[str, Tensor]:
    while isinstance(data, Mapping) and not _is_state_dict(data):
        inner = next((data[k] for k in CONTAINER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not _is_state_dict(data):
        if isinstance(data, Mapping):
            kind = f"a dict with keys {sorted(map(str, data))[:8]} and non-tensor values"
        else:
            kind = f"a {type(data).__name__}"
        raise CheckpointError(
            f"{source}: expected a state dict (parameter names -> tensors), found {kind}; "
            f"pass the model's state_dict, or a dict holding it under one of {list(CONTAINER_KEYS)}"
        )
    state = {str(k): v for k, v in data.items()}
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(data: Mapping) -> bool:
    return len(data) > 0 and all(isinstance(v, Tensor) for v in data.values())


# --------------------------------------------------------------------------------------------------------------
# Matching names and shapes, with one error for every mismatch
# --------------------------------------------------------------------------------------------------------------


def _match(
    state: Mapping[str, Tensor],
    target: Mapping[str, torch.Size],
    *,
    rename: Callable[[str], str],
    dropped: Sequence[str],
    source: str,
    layout: str,
) -> dict[str, Tensor]:
    """Our key -> tensor, taking each of our `target` keys from the file's `rename(key)`.

    `dropped` are file-key prefixes we leave out on purpose. Missing keys are listed in the file's names (what the
    file should have held); unexpected ones as the file has them.
    """
    wanted = {rename(k): k for k in target}
    out: dict[str, Tensor] = {}
    missing, shapes = [], []
    for src_key, our_key in wanted.items():
        if src_key not in state:
            if our_key.endswith("num_batches_tracked"):
                out[our_key] = torch.tensor(0, dtype=torch.long)  # pre-0.4.1 files have no counter
            else:
                missing.append(src_key)
            continue
        value = state[src_key]
        if tuple(value.shape) != tuple(target[our_key]):
            shapes.append(f"{src_key}: file {tuple(value.shape)} vs model {tuple(target[our_key])}")
        out[our_key] = value
    unexpected = sorted(k for k in state if k not in wanted and not k.startswith(tuple(dropped)))
    if missing or unexpected or shapes:
        parts = [f"{source}: the weights do not fit (expected {layout})"]
        if missing:
            parts.append(f"missing in the file ({len(missing)}): {_first_20(sorted(missing))}")
        if unexpected:
            parts.append(f"not in the model ({len(unexpected)}): {_first_20(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(sorted(shapes)[:20])}")
        raise CheckpointError("\n  ".join(parts))
    return out


def _first_20(keys: Sequence[str]) -> str:
    return ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# ImageNet backbones
# --------------------------------------------------------------------------------------------------------------

_TIMM_SEPARABLE = re.compile(r"^blocks\.(\d+)\.convs\.(\d+)\.(depthwise|pointwise)\.(conv|bn)\.(.+)$")


def _same_name(key: str) -> str:
    return key


def _timm_xception_name(key: str) -> str:
    """Our Xception key -> timm's `xception_aligned` key.

    Ours `blocks.{i}.convs.{k}.depthwise|pointwise.conv|bn.*` is timm's `blocks.{i}.stack.conv{k+1}.conv_dw|bn_dw|
    conv_pw|bn_pw.*`; `stem.{0,1}.conv|bn.*` and `blocks.{i}.shortcut.conv|bn.*` have the same names in both.
    """
    m = _TIMM_SEPARABLE.match(key)
    if m is None:
        return key
    block, k, part, layer, rest = m.groups()
    suffix = "dw" if part == "depthwise" else "pw"
    return f"blocks.{block}.stack.conv{int(k) + 1}.{layer}_{suffix}.{rest}"


_DENSE_LAYER = re.compile(r"^(.*\.denselayer\d+\.)(norm|conv)([12])\.(.+)$")


def _densenet_dotted_name(key: str) -> str:
    """Our DenseNet key -> the dotted name of torchvision's first DenseNet files (`denselayerJ.norm.1.weight` for
    `denselayerJ.norm1.weight`), which torchvision's own loader renames the same way."""
    m = _DENSE_LAYER.match(key)
    return key if m is None else f"{m.group(1)}{m.group(2)}.{m.group(3)}.{m.group(4)}"


# Per backbone: (description of the file layout, our key -> file key, file-key prefixes dropped on purpose).
# torchvision's and timm's plain ResNets share torchvision's names, which ours use as they are; so do torchvision's
# VGG and DenseNet `features`. An Xception file may also carry our own names (a saved `model.backbone.state_dict()`).
_Layout = tuple[str, Callable[[str], str], tuple[str, ...]]
_RESNET_LAYOUTS: list[_Layout] = [("torchvision/timm ResNet names", _same_name, ("fc.",))]
_VGG_LAYOUTS: list[_Layout] = [("torchvision VGG names", _same_name, ("classifier.",))]
_DENSENET_LAYOUTS: list[_Layout] = [
    ("torchvision DenseNet names", _same_name, ("classifier.",)),
    ("torchvision DenseNet dotted names (norm.1, conv.1, ...)", _densenet_dotted_name, ("classifier.",)),
]
_XCEPTION_LAYOUTS: list[_Layout] = [
    ("timm xception_aligned names", _timm_xception_name, ("head.",)),
    ("deeplab Xception names", _same_name, ()),
]
# torchvision's MobileNetV3 ImageNet files: our backbone is its `features` under the same names.
_MOBILENET_V3_LAYOUTS: list[_Layout] = [("torchvision MobileNetV3 names", _same_name, ("classifier.",))]
BACKBONE_LAYOUTS: dict[str, list[_Layout]] = {
    "mobilenet_v3_large": _MOBILENET_V3_LAYOUTS,
    "mobilenet_v3_small": _MOBILENET_V3_LAYOUTS,
    **{f"resnet{d}": _RESNET_LAYOUTS for d in (18, 34, 50, 101, 152)},
    **{f"vgg{d}{bn}": _VGG_LAYOUTS for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"densenet{d}": _DENSENET_LAYOUTS for d in (121, 161, 169, 201)},
    "xception41": _XCEPTION_LAYOUTS,
    "xception65": _XCEPTION_LAYOUTS,
    "xception71": _XCEPTION_LAYOUTS,
}


def backbone_state_dict(src: StateDictSource, *, backbone: str) -> dict[str, Tensor]:
    """ImageNet weights from torchvision or timm, renamed to deeplab's `backbone` (keys without `backbone.`).

    Load them with `model.backbone.load_state_dict(backbone_state_dict(FILE, backbone=model.config.backbone))`;
    strides and dilations hold no parameters, so the weights fit every output stride and multi-grid.

    - `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`: torchvision's ImageNet ResNets and timm's plain
      ones (the same names: conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1). `fc.*` is dropped. timm's
      deep-stem variants (`resnet50c/d/s/t`, keys `conv1.0.weight` ...) are refused: their 3-conv stem and
      average-pool shortcuts have no counterpart here.
    - `vgg11` ... `vgg19_bn`: torchvision's ImageNet VGGs (`features.N.*`, the same names as ours); `classifier.*`
      (ImageNet's fc6-fc8) is dropped. A VGG of another depth, or with/without BN, is named in the error.
    - `densenet121/161/169/201`: torchvision's ImageNet DenseNets (`features.*`), also with the dotted names of its
      first files (`denselayer1.norm.1.weight` for `norm1.weight`); `classifier.*` is dropped.
    - `xception41`, `xception65`, `xception71`: timm's aligned Xception (`timm/models/xception_aligned.py`,
      ImageNet weights converted from TF DeepLab). The structures agree module for module: timm's
      `start_with_relu=True` modules (ReLU before each separable conv, none inside) are our
      `SeparableConv(relu_inside=False)`; its last exit-flow module (`start_with_relu=False`, `no_skip=True`: ReLU
      after each BN, no shortcut) is ours with `relu_inside=True`, `skip="none"`; a 1x1 conv + BN `shortcut` where
      channels or stride change is our `skip="conv"`, and the identity of the middle flow our `skip="sum"`. Both use
      BN epsilon 1e-3 and symmetric padding. `head.fc.*` is dropped. timm's pre-activation variants (`xception41p`,
      `xception65p`) are refused.
    - `mobilenet_v3_large`, `mobilenet_v3_small`: torchvision's ImageNet MobileNetV3 (`features.*`, the same names
      as ours); `classifier.*` is dropped.

    Raises `CheckpointError` (naming the file) for anything that is not such a file, with every unmatched key on
    both sides and every shape mismatch in one message.
    """
    if backbone not in BACKBONE_LAYOUTS:
        raise ValueError(
            f"no torchvision/timm ImageNet layout for backbone {backbone!r}; backbone weights can be imported for "
            f"{sorted(BACKBONE_LAYOUTS)} (the TF-layout backbones take weights from the TF/TFLite converters)"
        )
    state, source = read_state_dict(src)
    _refuse_known_variants(state, backbone=backbone, source=source)
    with torch.device("meta"):
        target = _shapes(BACKBONES[backbone]())
    layouts = BACKBONE_LAYOUTS[backbone]
    # The layout whose names the file shares most; a file of another architecture then fails on the first one.
    description, rename, dropped = max(layouts, key=lambda lay: sum(lay[1](k) in state for k in target))
    return _match(
        state, target, rename=rename, dropped=dropped, source=source, layout=f"{description} for deeplab {backbone}"
    )


def _refuse_known_variants(state: Mapping[str, Tensor], *, backbone: str, source: str) -> None:
    """Clear errors for well-known relatives that share most names but compute something else."""
    if backbone.startswith("resnet") and "conv1.0.weight" in state:
        raise CheckpointError(
            f"{source}: a deep-stem ResNet (timm's resnet*c/d/s/t: key 'conv1.0.weight', a stem of three 3x3 convs"
            f"{', average-pool shortcuts downsample.1/2' if any('.downsample.2.' in k for k in state) else ''}); "
            f"deeplab's {backbone} has torchvision's 7x7 stem, so these weights cannot be loaded. Use a torchvision "
            "or timm plain resnet50/resnet101 file"
        )
    if backbone.startswith("xception") and any(re.match(r"^blocks\.\d+\.(norm|stack\.conv\d\.norm)\.", k) for k in state):
        raise CheckpointError(
            f"{source}: a pre-activation Xception (timm's xception41p/xception65p: keys 'blocks.N.norm.*', no bn_dw/bn_pw);"
            f" deeplab's {backbone} is TF's post-BN aligned Xception. Use timm's xception41/65/71 weights"
        )
    # A sibling of another depth or size shares every name up to where it ends: say which one the file is.
    for family, pattern, first, by_count, unit in _SIBLINGS:
        if not backbone.startswith(family):
            continue
        indices = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
        count = max(indices) + 1 - first if indices else 0
        other = by_count.get(count)
        if other is not None and other != backbone:
            raise CheckpointError(
                f"{source}: looks like {other} ({count} {unit}), not {backbone}; pass --backbone {other}"
            )


    if backbone.startswith("vgg"):
        other = _torchvision_vgg_name(state)
        if other is not None and other != backbone:
            raise CheckpointError(f"{source}: looks like torchvision's {other}, not {backbone}; pass --backbone {other}")


# (backbone name prefix, file-key pattern numbering units, the first unit's number, unit count -> backbone, what a
# unit is)
_SIBLINGS = (
    ("xception", r"^blocks\.(\d+)\.", 0, {13: "xception41", 21: "xception65", 23: "xception71"}, "Xception modules"),
    ("mobilenet_v3", r"^features\.(\d+)\.", 0, {17: "mobilenet_v3_large", 13: "mobilenet_v3_small"}, "feature layers"),
    ("densenet", r"^features\.denseblock3\.denselayer(\d+)\.", 1,
     {24: "densenet121", 36: "densenet161", 32: "densenet169", 48: "densenet201"}, "layers in dense block 3"),
)
# torchvision's VGG `features`: (index of the last conv + 1, with BN) -> name.
_TORCHVISION_VGGS = {(19, False): "vgg11", (23, False): "vgg13", (29, False): "vgg16", (35, False): "vgg19",
                     (26, True): "vgg11_bn", (32, True): "vgg13_bn", (41, True): "vgg16_bn", (50, True): "vgg19_bn"}


def _torchvision_vgg_name(state: Mapping[str, Tensor]) -> str | None:
    """Which torchvision VGG a file's `features.N.weight` keys are, or None."""
    convs = [int(m.group(1)) for k, v in state.items() if (m := re.match(r"^features\.(\d+)\.weight$", k)) and v.ndim == 4]
    with_bn = any(re.match(r"^features\.\d+\.running_mean$", k) for k in state)
    return _TORCHVISION_VGGS.get((max(convs) + 1, with_bn)) if convs else None


# --------------------------------------------------------------------------------------------------------------
# torchvision deeplabv3_resnet50 / deeplabv3_resnet101 / deeplabv3_mobilenet_v3_large
# --------------------------------------------------------------------------------------------------------------

# torchvision's DeepLabHead hard-codes these rates, for the ResNets at output stride 8 and for MobileNetV3-Large at
# output stride 16 alike (their issue 7956); a converted model keeps them, to compute what was trained.
TORCHVISION_ASPP_RATES = (12, 24, 36)
TORCHVISION_DROPOUT = 0.5  # torchvision's ASPP projection
TORCHVISION_BN_MOMENTUM = 0.1  # PyTorch's default, which torchvision trained with
# torchvision's MobileNetV3 BatchNorms use momentum 0.01 (the head's keep 0.1); the backbone's value, which holds
# most of the model's BatchNorms, is the one kept for fine-tuning a converted model.
TORCHVISION_MOBILENET_V3_BN_MOMENTUM = 0.01
# Layers in torchvision's MobileNetV3 `features` (stem, inverted residuals, last 1x1 conv) -> our backbone.
_TORCHVISION_MOBILENET_V3_LAYERS = {17: "mobilenet_v3_large", 13: "mobilenet_v3_small"}

# Our key prefix -> torchvision's, first match wins. torchvision's ASPP is `classifier.0`: convs.0 the 1x1 branch,
# convs.1-3 the atrous 3x3 branches (Sequential conv, bn, relu), convs.4 the pooling branch (Sequential pool, conv,
# bn, relu), project (conv, bn, relu, dropout). Then classifier.1/2/3 = 3x3 conv, BN, ReLU; classifier.4 = 1x1.
_TORCHVISION_DEEPLABV3_PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    *((f"aspp.branches.{i}.conv.", f"classifier.0.convs.{i}.0.") for i in range(4)),
    *((f"aspp.branches.{i}.bn.", f"classifier.0.convs.{i}.1.") for i in range(4)),
    ("aspp.pooling.conv.", "classifier.0.convs.4.1."),
    ("aspp.pooling.bn.", "classifier.0.convs.4.2."),
    ("aspp.project.conv.", "classifier.0.project.0."),
    ("aspp.project.bn.", "classifier.0.project.1."),
    ("head_conv.conv.", "classifier.1."),
    ("head_conv.bn.", "classifier.2."),
    ("classifier.", "classifier.4."),
)
# torchvision's MobileNetV3 DeepLabV3 wraps `features` itself in IntermediateLayerGetter: `backbone.{i}.*` there is
# our `backbone.features.{i}.*`.
_TORCHVISION_DEEPLABV3_MOBILENET_PREFIXES = (("backbone.features.", "backbone."), *_TORCHVISION_DEEPLABV3_PREFIXES[1:])
_TORCHVISION_DEPTHS = {6: 50, 23: 101}  # units in layer3 -> ResNet depth


def _renamer(prefixes: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for ours, theirs in prefixes:
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key

    return rename


_torchvision_deeplabv3_name = _renamer(_TORCHVISION_DEEPLABV3_PREFIXES)
_torchvision_deeplabv3_mobilenet_name = _renamer(_TORCHVISION_DEEPLABV3_MOBILENET_PREFIXES)


# torchvision's DeepLabHead as ModelConfig fields: ASPP (12, 24, 36) with image pooling, its extra 3x3 conv, dropout
# 0.5, no decoder, align_corners=False.
_TORCHVISION_HEAD = dict(
    atrous_rates=TORCHVISION_ASPP_RATES,
    decoder=False,
    separable=False,
    image_pooling=True,
    dropout=TORCHVISION_DROPOUT,
    align_corners=False,
    head_conv=True,
)


def torchvision_deeplabv3_config(*, depth: int = 50, num_classes: int = 21) -> ModelConfig:
    """The deeplab config that computes what torchvision's `deeplabv3_resnet{depth}` computes.

    ResNet in torchvision's layout at output stride 8 (layer3 and layer4 dilated, each stage's first unit keeping the
    previous rate, as ours does), no multi-grid (torchvision has none), ASPP rates (12, 24, 36), no decoder,
    dropout 0.5, PyTorch's BN momentum 0.1, `align_corners=False`, and `head_conv` (torchvision's extra 3x3 conv).
    """
    if depth not in (50, 101):
        raise ValueError(f"torchvision's DeepLabv3 ResNets have depth 50 or 101, got {depth!r}")
    return ModelConfig(
        backbone=f"resnet{depth}",
        num_classes=num_classes,
        output_stride=8,
        multi_grid=(1, 1, 1),
        bn_momentum=TORCHVISION_BN_MOMENTUM,
        **_TORCHVISION_HEAD,
    )


def torchvision_deeplabv3_mobilenet_v3_config(
    *, backbone: str = "mobilenet_v3_large", num_classes: int = 21, aspp_channels: int = 256
) -> ModelConfig:
    """The deeplab config that computes what torchvision's `deeplabv3_mobilenet_v3_large` computes.

    MobileNetV3 in torchvision's layout at output stride 16 (`dilated=True`: the last stage at rate 2), ASPP rates
    (12, 24, 36) as torchvision's DeepLabHead has them at every output stride, no decoder, dropout 0.5,
    `align_corners=False`, and `head_conv` (torchvision's extra 3x3 conv). torchvision builds DeepLabV3 on the Large
    network only; `backbone="mobilenet_v3_small"` gives the same head on the Small one (576 channels in).
    """
    if backbone not in _TORCHVISION_MOBILENET_V3_LAYERS.values():
        choices = sorted(_TORCHVISION_MOBILENET_V3_LAYERS.values())
        raise ValueError(f"backbone must be one of {choices}, got {backbone!r}")
    return ModelConfig(
        backbone=backbone,
        num_classes=num_classes,
        output_stride=16,
        aspp_channels=aspp_channels,
        bn_momentum=TORCHVISION_MOBILENET_V3_BN_MOMENTUM,
        **_TORCHVISION_HEAD,
    )


def torchvision_deeplabv3_state_dict(src: StateDictSource) -> tuple[dict[str, Tensor], ModelConfig]:
    """torchvision `deeplabv3_resnet50/101` or `deeplabv3_mobilenet_v3_large` weights in deeplab's names, and the
    config they belong to.

    Keys come back as `backbone.*`, `aspp.*`, `head_conv.conv.weight`, `head_conv.bn.*` (torchvision's
    classifier.1/classifier.2) and `classifier.{weight,bias}`; `aux_classifier.*` is dropped. The ASPP projection
    weight has its input channels permuted: torchvision concatenates the pooling branch LAST
    ([1x1, r12, r24, r36, pool]), ours FIRST ([pool, 1x1, r12, r24, r36], TF's order).
    """
    state, source = read_state_dict(src)
    return _convert_torchvision_deeplabv3(state, source=source)


def _convert_torchvision_deeplabv3(
    state: Mapping[str, Tensor], *, source: str
) -> tuple[dict[str, Tensor], ModelConfig]:
    refuse_unsupported_torchvision_segmentation(state, source=source)
    head = state.get("classifier.4.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 4 else 21
    layers = _mobilenet_v3_feature_layers(state)
    if layers:
        backbone = _torchvision_mobilenet_v3_backbone(state, layers=layers, source=source)
        branch = state.get("classifier.0.convs.0.0.weight")
        aspp_channels = int(branch.shape[0]) if branch is not None and branch.ndim == 4 else 256
        cfg = torchvision_deeplabv3_mobilenet_v3_config(
            backbone=backbone, num_classes=num_classes, aspp_channels=aspp_channels
        )
        rename, layout = _torchvision_deeplabv3_mobilenet_name, f"torchvision deeplabv3_{backbone} names"
    else:
        units = {m.group(1) for k in state if (m := re.match(r"^backbone\.layer3\.(\d+)\.", k))}
        depth = _TORCHVISION_DEPTHS.get(len(units), 50)  # anything else fails the match below, with the key lists
        cfg = torchvision_deeplabv3_config(depth=depth, num_classes=num_classes)
        rename, layout = _torchvision_deeplabv3_name, f"torchvision deeplabv3_resnet{depth} names"
    with torch.device("meta"):
        model = build_model(cfg)
        target = _shapes(model)
    out = _match(state, target, rename=rename, dropped=("aux_classifier.",), source=source, layout=layout)
    # Pooling last (torchvision) -> pooling first (ours): move the last branch's input channels to the front.
    w = out["aspp.project.conv.weight"]
    c = out["aspp.pooling.conv.weight"].shape[0]
    out["aspp.project.conv.weight"] = torch.cat([w[:, -c:], w[:, :-c]], dim=1)
    return out, cfg


def _mobilenet_v3_feature_layers(state: Mapping[str, Tensor]) -> int:
    """How many `backbone.{i}` layers the file has (torchvision's MobileNetV3 DeepLabV3 layout); 0 for none."""
    indices = {int(m.group(1)) for k in state if (m := re.match(r"^backbone\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _torchvision_mobilenet_v3_backbone(state: Mapping[str, Tensor], *, layers: int, source: str) -> str:
    """Which of our MobileNetV3s the file's `backbone.{i}.*` layers are (by their count), or one line saying what the
    file looks like when a tensor of both has another shape (another width multiplier, the reduced tail, a
    MobileNetV2). Keys missing on either side are left to `_match`, which lists them."""
    file_shapes = {k[len("backbone."):]: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.")}
    name = _TORCHVISION_MOBILENET_V3_LAYERS.get(layers)
    if name is not None:
        with torch.device("meta"):
            ours = BACKBONES[name]().features.state_dict()
        if all(tuple(v.shape) == file_shapes[k] for k, v in ours.items() if k in file_shapes):
            return name
    last = state.get(f"backbone.{layers - 1}.0.weight")
    last_channels = f", the last with {int(last.shape[0])} channels" if last is not None else ""
    kind = "MobileNetV3" if any(".block." in k for k in file_shapes) else "MobileNet (not V3: no '.block.' modules)"
    raise CheckpointError(
        f"{source}: looks like a torchvision DeepLabV3 on a {kind} backbone with {layers} feature layers"
        f"{last_channels}, which is not torchvision's mobilenet_v3_large (17 layers, 960) or mobilenet_v3_small (13 "
        "layers, 576) at width 1.0 (another width_mult or reduced_tail?); that architecture is not supported"
    )


def refuse_unsupported_torchvision_segmentation(state: Mapping[str, Tensor], *, source: str) -> None:
    """One `CheckpointError` line for torchvision segmentation models whose heads deeplab does not build."""
    lraspp = ("classifier.cbr.", "classifier.low_classifier.", "classifier.high_classifier.")
    if any(k.startswith(lraspp) for k in state):
        raise CheckpointError(
            f"{source}: looks like torchvision's lraspp_mobilenet_v3_large (an LR-ASPP head: classifier.cbr, "
            "classifier.scale, low_classifier, high_classifier); deeplab builds DeepLabv3/v3+ heads only, so that "
            "architecture is not supported (torchvision's deeplabv3_mobilenet_v3_large is)"
        )


def refuse_fcn(state: Mapping[str, Tensor], *, source: str) -> None:
    """One line for torchvision's `fcn_resnet50/101` (for `convert_file`, which routes every other file by its keys)."""
    if "classifier.0.weight" in state and any(k.startswith("backbone.layer4.") for k in state):
        raise CheckpointError(
            f"{source}: looks like torchvision's fcn_resnet50/101 (an FCN head: classifier.0 is a 3x3 conv, no ASPP); "
            "deeplab builds DeepLabv3/v3+ heads only, so that architecture is not supported (torchvision's "
            "deeplabv3_resnet50/101 are)"
        )


def load_torchvision_deeplabv3(src: StateDictSource, *, num_classes: int | None = None) -> DeepLab:
    """A deeplab `DeepLab` computing what torchvision's `deeplabv3_resnet50/101` or `deeplabv3_mobilenet_v3_large`
    (COCO with VOC labels) computes.

    Input: RGB normalised with ImageNet mean/std (the model's `preprocessing`); logits upsampled with
    `align_corners=False`, as torchvision does. The config is `torchvision_deeplabv3_config` for the ResNets (output
    stride 8, rates (12, 24, 36), no multi-grid, no decoder, dropout 0.5) and
    `torchvision_deeplabv3_mobilenet_v3_config` for MobileNetV3 (output stride 16, the same rates and head), picked
    from the file's keys (`backbone.layerN.*` or `backbone.{i}.*`); the ASPP width is read from the file's shapes.

    torchvision's head has a 3x3 conv + BN + ReLU between ASPP and the 1x1 classifier (`classifier.1/2/3`), which
    cannot be folded into anything else (the ReLU sits between it and the classifier): it is `DeepLab.head_conv`
    (`ModelConfig.head_conv=True`).

    `num_classes`: None (or the file's) keeps the file's classifier; another number keeps everything else and gives
    a freshly initialised classifier, for fine-tuning on another label set. Returned in eval mode.
    """
    raw, source = read_state_dict(src)
    state, cfg = _convert_torchvision_deeplabv3(raw, source=source)
    file_classes = cfg.num_classes
    if num_classes is not None and num_classes != file_classes:
        cfg = cfg.replace(num_classes=num_classes)
    class_names = _voc_class_names() if cfg.num_classes == 21 and cfg.num_classes == file_classes else None
    model = build_model(cfg, class_names=class_names, preprocessing=Preprocessing())
    if cfg.num_classes != file_classes:
        state["classifier.weight"] = model.classifier.weight.detach().clone()
        state["classifier.bias"] = model.classifier.bias.detach().clone()
    load_state_dict_strict(model, state, source=source)
    return model.eval()


def _voc_class_names() -> tuple[str, ...]:
    # torchvision's COCO-with-VOC-labels models predict the 21 PASCAL VOC classes, background first.
    from ..data.palettes import VOC_CLASSES

    return VOC_CLASSES


__all__ = [
    "BACKBONE_LAYOUTS",
    "StateDictSource",
    "backbone_state_dict",
    "load_torchvision_deeplabv3",
    "read_state_dict",
    "refuse_fcn",
    "refuse_unsupported_torchvision_segmentation",
    "torchvision_deeplabv3_config",
    "torchvision_deeplabv3_mobilenet_v3_config",
    "torchvision_deeplabv3_state_dict",
]
