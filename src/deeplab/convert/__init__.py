"""Importers: official TensorFlow DeepLab TFLite files, torchvision and timm state dicts.

`convert_file(src)` picks the importer from the file's content and returns a `DeepLab` in eval mode carrying its
config, class names and preprocessing; `deeplab convert SRC OUT.pt` saves that as a deeplab checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..models.checkpoint import CheckpointError, load_state_dict_strict
from ..models.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_MEAN,
    TF_STD,
    ModelConfig,
    Preprocessing,
)
from ..models.model import DeepLab, build_model


def is_tflite(path: Path) -> bool:
    """Whether `path` is a TF Lite flatbuffer (by its suffix or its "TFL3" identifier)."""
    with open(path, "rb") as f:
        head = f.read(8)
    return path.suffix.lower() == ".tflite" or head[4:8] == b"TFL3"


def convert_file(
    src: str | os.PathLike,
    *,
    backbone: str | None = None,
    num_classes: int | None = None,
    output_stride: int = 16,
    decoder: bool = True,
    head: str = "v3",
    class_names: Sequence[str] | None = None,
    activation_rounding: bool = True,
) -> DeepLab:
    """Import `src` as a DeepLab (eval mode).

    - an official TF DeepLab `.tflite` (float or quantized): the whole model, architecture read from the file; a
      uint8 file's activation rounding too unless `activation_rounding=False` (deeplab.models.activation_rounding);
    - torchvision's `deeplabv3_resnet50/101` or `deeplabv3_mobilenet_v3_large` state dict: the whole model;
    - an ImageNet backbone (torchvision / timm ResNet-18/34/50/101/152, torchvision VGG-11/13/16/19 with and without
      BN, torchvision DenseNet-121/161/169/201, timm aligned Xception-41/65/71, torchvision MobileNetV3-Large/Small):
      a DeepLab with that backbone and a freshly initialised `head` (v1-largefov, v2-aspp, v3; `decoder` for v3+);
      `backbone=` names which one, `num_classes=` the classes.

    torchvision segmentation models with other heads (`lraspp_mobilenet_v3_large`, `fcn_resnet50/101`) are refused
    with one line saying so.
    """
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a .tflite or a .pth/.pt weights file")
    if is_tflite(path):
        from .tflite import load_tflite

        return load_tflite(path, class_names=class_names, activation_rounding=activation_rounding)
    from .torch_weights import (
        BACKBONE_LAYOUTS,
        backbone_state_dict,
        load_torchvision_deeplabv3,
        read_state_dict,
        refuse_fcn,
        refuse_unsupported_torchvision_segmentation,
    )

    state, source = read_state_dict(path)
    refuse_unsupported_torchvision_segmentation(state, source=source)
    refuse_fcn(state, source=source)
    if any(k.startswith("classifier.0.convs.") for k in state):
        model = load_torchvision_deeplabv3(state, num_classes=num_classes)
        if class_names is not None:
            model.class_names = tuple(class_names)
        return model
    if backbone is None:
        raise CheckpointError(
            f"{source}: not a full DeepLab model; if it holds ImageNet backbone weights, pass --backbone (one of "
            f"{', '.join(sorted(BACKBONE_LAYOUTS))}) to build a DeepLab on them"
        )
    weights = backbone_state_dict(state, backbone=backbone)
    classes = num_classes or (len(class_names) if class_names else 21)
    cfg = ModelConfig(backbone=backbone, num_classes=classes, output_stride=output_stride, head=head, decoder=decoder)
    # timm's aligned Xception weights expect TF's (x - 127.5) / 127.5; the ResNets ImageNet mean/std.
    tf_style = backbone.startswith("xception")
    pre = Preprocessing(mean=TF_MEAN if tf_style else IMAGENET_MEAN, std=TF_STD if tf_style else IMAGENET_STD)
    model = build_model(cfg, class_names=class_names, preprocessing=pre)
    load_state_dict_strict(model.backbone, weights, source=source)
    return model.eval()


__all__ = ["convert_file", "is_tflite"]
