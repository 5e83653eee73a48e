"""Backbones: a plain dict from name to builder. Each builder takes keyword-only `output_stride` (8, 16, 32) and
returns a `Backbone` whose forward gives {"low_level": stride-4 feature, "out": output-stride feature}."""

from .common import Backbone, atrous_plan
from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .mobilenet_edgetpu import MobileNetEdgeTPU, mobilenet_edgetpu
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from .resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet50_beta,
    resnet101,
    resnet101_beta,
    resnet152,
)
from .vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn
from .xception import Xception, xception41, xception65, xception71

BACKBONES = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet50_beta": resnet50_beta,
    "resnet101_beta": resnet101_beta,
    "xception41": xception41,
    "xception65": xception65,
    "xception71": xception71,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_edgetpu": mobilenet_edgetpu,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet152": resnet152,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
}

__all__ = [
    "BACKBONES", "Backbone", "DenseNet", "MobileNetEdgeTPU", "MobileNetV2", "MobileNetV3", "ResNet", "VGG", "Xception",
    "atrous_plan",
]
