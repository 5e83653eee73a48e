"""Typed, frozen configuration. `build_model` in model.py is the one place a ModelConfig becomes modules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The DeepLabv3 paper's ASPP rates at output stride 16; every other stride scales them (derived in one place).
ASPP_RATES_AT_OS16 = (6, 12, 18)
OUTPUT_STRIDES = (8, 16, 32)
# The heads of the DeepLab family (docs/family.md): DeepLab v1's LargeFOV, v2's ASPP-L, v3's ASPP (on which
# `decoder` adds the v3+ decoder). "v3plus" is accepted as a name for head "v3" with the decoder.
HEADS = ("v1-largefov", "v2-aspp", "v3")
# v1 and v2 were published at output stride 8: LargeFOV's fc6 at rate 12, ASPP-L's four branches at 6, 12, 18, 24.
LARGEFOV_RATE_AT_OS8 = 12
ASPP_L_RATES_AT_OS8 = (6, 12, 18, 24)


def default_atrous_rates(output_stride: int, *, head: str = "v3") -> tuple[int, ...]:
    """Rates that follow the output stride. v3's ASPP: (6, 12, 18) at 16, doubled at 8, halved at 32. v1's fc6 (12)
    and v2's ASPP-L (6, 12, 18, 24) are the papers' rates at 8, halved at 16 and quartered at 32 (rounded down, at
    least 1: ASPP-L at 32 is (1, 3, 4, 6))."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if head == "v1-largefov":
        return (max(1, LARGEFOV_RATE_AT_OS8 * 8 // output_stride),)
    if head == "v2-aspp":
        return tuple(max(1, r * 8 // output_stride) for r in ASPP_L_RATES_AT_OS8)
    return tuple(r * 16 // output_stride for r in ASPP_RATES_AT_OS16)


# The valid range of each numeric ModelConfig field (None always passes): checked when a config is made, and by
# `deeplab train` where the flag is parsed. The message names the flag.
MODEL_RANGES = {
    "atrous_rates": (lambda v: all(int(r) >= 1 for r in v), "positive integers, e.g. 6,12,18 ('' for none)"),
    "multi_grid": (lambda v: len(v) > 0 and all(int(r) >= 1 for r in v), "positive integers, e.g. 1,2,4"),
    "num_classes": (lambda v: v >= 1, "a positive number of classes"),
    "in_channels": (lambda v: int(v) >= 1, "a positive number of input bands (3 for RGB; --bands N)"),
    "aspp_channels": (lambda v: v >= 1, "a positive number of channels (the papers use 256)"),
    "decoder_channels": (lambda v: v >= 1, "a positive number of channels (the papers use 256)"),
    "low_level_channels": (lambda v: v >= 1, "a positive number of channels (the paper uses 48)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.1)"),
    "depth_multiplier": (lambda v: v > 0, "positive (e.g. 0.5)"),
    "bn_momentum": (lambda v: 0 <= v <= 1, "in [0, 1] (PyTorch's convention: TF's decay 0.9997 is 0.0003)"),
    "pointrend_train_points": (lambda v: v >= 1, "a positive number of points"),
    "pointrend_points": (lambda v: v >= 1, "a positive number of points"),
    "pointrend_steps": (lambda v: v >= 0, "0 or a positive number of steps"),
}


def check_ranges(config: Any, ranges: dict[str, tuple[Any, str]]) -> None:
    """Raise, naming the flag, for the first field of `config` outside its range in `ranges`."""
    for name, (ok, expected) in ranges.items():
        value = getattr(config, name)
        if value is not None and not ok(value):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, (tuple, list)) else value
            raise ValueError(f"--{name.replace('_', '-')} {shown}: must be {expected}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the architecture of a DeepLab model (weights excluded)."""

    backbone: str = "resnet101_beta"  # a key of deeplab.models.backbones.BACKBONES
    num_classes: int = 21
    output_stride: int = 16  # 8, 16 or 32; backbone strides past this become dilations
    atrous_rates: tuple[int, ...] | None = None  # None: derived from output_stride; () keeps only the 1x1 branch
    multi_grid: tuple[int, ...] | None = None  # unit rates of the last stage; None: the backbone's default
    # The head on the backbone: "v1-largefov", "v2-aspp" or "v3" (ASPP with image pooling; "v3plus" is "v3" with the
    # decoder). The fields from `decoder` to `dropout` below belong to the v3 head; v1/v2 record decoder and
    # separable as False.
    head: str = "v3"
    decoder: bool = True  # DeepLabv3+ decoder on the v3 head; False gives DeepLabv3
    separable: bool = False  # atrous separable convolution in ASPP and decoder (the paper's Xception setting)
    image_pooling: bool = True  # the ASPP image-level branch (the paper drops it for Cityscapes)
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_level_channels: int = 48  # the paper's best projection of the stride-4 feature (Table 1)
    head_conv: bool = False  # a 3x3 conv + BN + ReLU before the classifier (torchvision's DeepLabHead has one)
    dropout: float = 0.1  # after the ASPP projection; TF keep_prob 0.9
    align_corners: bool = False  # TF-converted models need True
    depth_multiplier: float = 1.0  # mobilenet_v2 and mobilenet_edgetpu only
    bn_momentum: float = 0.0003  # PyTorch convention for TF's decay 0.9997 (epsilon is each block's TF value)
    pointrend: bool = False  # a PointRend point head on the stride-4 features (deeplab.models.pointrend)
    pointrend_train_points: int = 2048  # points per image in training (detectron2's semantic PointRend)
    pointrend_points: int = 8192  # points refined per subdivision step at inference
    pointrend_steps: int | None = None  # subdivision steps at inference; None: up to the input resolution
    in_channels: int = 3  # bands of the input image: 3 for RGB, 4 or more for multispectral imagery

    def __post_init__(self) -> None:
        self._check_head()
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r} (--output-stride)")
        check_ranges(self, MODEL_RANGES)
        # Tuples survive a JSON round trip as lists; normalise so equal configs compare equal.
        for name in ("atrous_rates", "multi_grid"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))

    def _check_head(self) -> None:
        if self.head == "v3plus":  # the v3 head with the decoder, under the name the papers give the model
            object.__setattr__(self, "head", "v3")
            object.__setattr__(self, "decoder", True)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS} (or v3plus), got {self.head!r}")
        if self.head == "v3":
            return
        # v1's and v2's heads end in their own logits layers: there is nothing for a decoder or a head conv to read,
        # and their convolutions are plain (the papers'). decoder and separable default to the v3+ setting, so they
        # are recorded False here rather than refused; head_conv (default False) is refused.
        object.__setattr__(self, "decoder", False)
        object.__setattr__(self, "separable", False)
        if self.head_conv:
            raise ValueError(f"head_conv belongs to the v3 head; head {self.head!r} has none")
        if self.atrous_rates is not None:
            if self.head == "v1-largefov" and len(self.atrous_rates) != 1:
                raise ValueError(f"head v1-largefov takes one rate (fc6's dilation), got atrous_rates={self.atrous_rates!r}")
            if self.head == "v2-aspp" and not self.atrous_rates:
                raise ValueError("head v2-aspp needs at least one rate (one branch per rate), got atrous_rates=()")

    @property
    def variant(self) -> str:
        """The published model this head is: "DeepLab v1 LargeFOV", "DeepLab v2 ASPP-L", "DeepLabv3" or "DeepLabv3+"."""
        if self.head == "v3":
            return "DeepLabv3+" if self.decoder else "DeepLabv3"
        return {"v1-largefov": "DeepLab v1 LargeFOV", "v2-aspp": "DeepLab v2 ASPP-L"}[self.head]

    @property
    def rates(self) -> tuple[int, ...]:
        """The head's atrous rates in force: the explicit override or the output-stride default of the head."""
        if self.atrous_rates is not None:
            return self.atrous_rates
        return default_atrous_rates(self.output_stride, head=self.head)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("atrous_rates", "multi_grid"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


# Pixel values are in 0-255 units everywhere: x_normalized = (x - mean) / std.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
TF_MEAN = (127.5, 127.5, 127.5)  # TF DeepLab: (x - 127.5) / 127.5
TF_STD = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input, (x - mean) / std per band; travels with every checkpoint.

    RGB models hold 3 values in 0..255 units (ImageNet's by default); a model of N bands holds N, in the units its
    imagery is stored in (16-bit counts, reflectance, ...), measured from the training data (`deeplab data`)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int] | None = None  # (H, W) the model was exported/trained at, if fixed

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per band (3 for RGB), got mean={self.mean!r} std={self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std!r}")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    @property
    def bands(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": list(self.input_size) if self.input_size else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(mean=tuple(data["mean"]), std=tuple(data["std"]), input_size=data.get("input_size"))


__all__ = [
    "ASPP_L_RATES_AT_OS8",
    "ASPP_RATES_AT_OS16",
    "HEADS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LARGEFOV_RATE_AT_OS8",
    "ModelConfig",
    "OUTPUT_STRIDES",
    "Preprocessing",
    "TF_MEAN",
    "TF_STD",
    "default_atrous_rates",
]


# ---- dataclass <-> command-line flags ---------------------------------------------------------------------------
# One flag per field (`output_stride` -> `--output-stride`), typed from the annotation; defaults are None so the
# caller can tell an explicit flag from a preset's value.


