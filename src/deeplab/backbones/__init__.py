"""Backbones: a plain dict from name to builder. Each builder takes keyword-only `output_stride` (8, 16, 32) and
returns a `Backbone` whose forward gives {"low_level": stride-4 feature, "out": output-stride feature}."""

from .common import Backbone, atrous_plan
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet50, resnet50_beta, resnet101, resnet101_beta
from .xception import Xception, xception65, xception71

BACKBONES = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet50_beta": resnet50_beta,
    "resnet101_beta": resnet101_beta,
    "xception65": xception65,
    "xception71": xception71,
    "mobilenet_v2": mobilenet_v2,
}

__all__ = ["BACKBONES", "Backbone", "MobileNetV2", "ResNet", "Xception", "atrous_plan"]
