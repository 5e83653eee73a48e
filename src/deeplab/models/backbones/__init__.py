"""Backbones: a plain dict from name to builder. Each builder takes keyword-only `output_stride` (8, 16, 32) and
returns a `Backbone` whose forward gives {"low_level": stride-4 feature, "out": output-stride feature}."""

from .common import Backbone, atrous_plan
from .mobilenet_edgetpu import MobileNetEdgeTPU, mobilenet_edgetpu
from .mobilenet_v2 import MobileNetV2, mobilenet_v2
from .mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from .resnet import ResNet, resnet50, resnet50_beta, resnet101, resnet101_beta
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
}

__all__ = ["BACKBONES", "Backbone", "MobileNetEdgeTPU", "MobileNetV2", "MobileNetV3", "ResNet", "Xception", "atrous_plan"]
