"""The DeepLab model. `build_model(cfg)` is the one place a ModelConfig becomes modules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import pointrend
from .backbones import BACKBONES, Backbone
from .config import ModelConfig, Preprocessing
from .heads import ASPP, ASPPL, FC_CHANNELS, Decoder, LargeFOV
from .layers import conv_bn
from .pointrend import PointHead


class DeepLab(nn.Module):
    """DeepLab v1 (backbone + LargeFOV), v2 (backbone + ASPP-L), v3 (backbone + ASPP) or v3+ (v3 plus the decoder)
    returning logits at input size.

    `aspp` is the head on the backbone's output (`ASPP`, `LargeFOV` or `ASPPL`) and `classifier` the 1x1 conv to the
    classes after it (v1's fc8); ASPP-L's branches end in their own logits layers, so its classifier is an identity.

    No loss, softmax or argmax inside: `forward` maps a normalised (N, C, H, W) batch (C = `config.in_channels`, 3 for
    RGB) to (N, num_classes, H, W). The model carries its `config`, `class_names` and `preprocessing`, so a checkpoint
    needs nothing else; `class_colors` (RGB per class, e.g. an ArcGIS export's) and `class_values` (the value each
    class has in the training labels, e.g. an ArcGIS class Value) when its data defined them, else None.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        backbone: Backbone,
        aspp: nn.Module,
        decoder: Decoder | None,
        classifier: nn.Module,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        head_conv: nn.Module | None = None,
        point_head: PointHead | None = None,
        class_colors: Sequence[Sequence[int]] | None = None,
        class_values: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.class_names = tuple(class_names)
        self.class_colors = None if class_colors is None else tuple(tuple(int(v) for v in c) for c in class_colors)
        self.class_values = None if class_values is None else tuple(int(v) for v in class_values)
        self.preprocessing = preprocessing
        self.backbone = backbone
        self.aspp = aspp
        self.decoder = decoder
        self.head_conv = head_conv
        self.classifier = classifier
        self.point_head = point_head
        # A converted uint8 model's activation rounding ({site: (scale, zero point)}), or None: see
        # deeplab.models.activation_rounding, which installs it.
        self.activation_rounding: dict[str, tuple[float, int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (N, K, H, W). With PointRend in training mode, a dict: `logits` (the coarse prediction at input
        size), `point_logits` (N, K, P) and `point_coords` (N, P, 2) for the point loss (`deeplab.models.pointrend`)."""
        features = self.backbone(x)
        y = self.aspp(features["out"])  # (N, 256, H/os, W/os); LargeFOV (N, 1024, ...), ASPP-L the logits
        if self.decoder is not None:
            y = self.decoder(y, features["low_level"])  # (N, 256, H/4, W/4)
        if self.head_conv is not None:
            y = self.head_conv(y)
        y = self.classifier(y)  # (N, K, H/os or H/4, ...): with PointRend, the coarse prediction
        cfg = self.config
        if self.point_head is None:
            # x.shape[-2:] (not ints) keeps height and width symbolic when the model is traced for export.
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=cfg.align_corners)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        fine = features["low_level"]
        if self.training:
            coords = pointrend.training_points(y, cfg.pointrend_train_points)
            point_logits = self.point_head(pointrend.point_sample(fine, coords), pointrend.point_sample(y, coords))
            logits = F.interpolate(y, size=size, mode="bilinear", align_corners=cfg.align_corners)
            return {"logits": logits, "point_logits": point_logits, "point_coords": coords}
        return pointrend.subdivide(
            self.point_head, y, fine, size, num_points=cfg.pointrend_points, steps=cfg.pointrend_steps,
            align_corners=cfg.align_corners,
        )

    def save_pretrained(self, directory: str | os.PathLike, *, run: str | os.PathLike | None = None,
                        license: str | None = None) -> Path:
        """Write this model as a model folder: config.json, model.safetensors and a README.md model card
        (`deeplab.models.hub`); `deeplab.from_pretrained(directory)` reads it back. `run`: the training run folder
        it came from, whose metrics and data report the card then shows."""
        from .hub import save_pretrained

        return save_pretrained(self, directory, run=run, license=license)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    license: str | None = None) -> str:
        """Publish this model as the Hugging Face Hub repo `repo_id` (a model folder; needs `deeplab[hub]`)."""
        import tempfile

        from .hub import push_to_hub, save_pretrained

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_pretrained(self, Path(tmp) / repo_id.rsplit("/", 1)[-1], license=license)
            return push_to_hub(folder, repo_id, private=private, token=token)

    def with_output_stride(self, output_stride: int) -> "DeepLab":
        """The same weights at another output stride (the paper's train-at-16, evaluate-at-8 protocol).

        The backbone is re-dilated and the head's rates rescaled (an explicit override scales with them); no weight
        changes, since strides and dilations hold no parameters.
        """
        cfg = self.config
        rates = None if cfg.atrous_rates is None else tuple(r * cfg.output_stride // output_stride for r in cfg.atrous_rates)
        new = build_model(
            cfg.replace(output_stride=output_stride, atrous_rates=rates),
            class_names=self.class_names,
            preprocessing=self.preprocessing,
            class_colors=self.class_colors,
            class_values=self.class_values,
        )
        new.load_state_dict(self.state_dict())
        return new.train(self.training).to(next(self.parameters()).device)


DEPTH_MULTIPLIER_BACKBONES = ("mobilenet_v2", "mobilenet_edgetpu")


def build_backbone(cfg: ModelConfig) -> Backbone:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {sorted(BACKBONES)}")
    kwargs: dict = {"output_stride": cfg.output_stride}
    if cfg.in_channels != 3:
        kwargs["in_channels"] = cfg.in_channels
    if cfg.multi_grid is not None:
        kwargs["multi_grid"] = cfg.multi_grid
    if cfg.depth_multiplier != 1.0:
        if cfg.backbone not in DEPTH_MULTIPLIER_BACKBONES:
            raise ValueError(
                f"depth_multiplier={cfg.depth_multiplier} applies to {' and '.join(DEPTH_MULTIPLIER_BACKBONES)} only, "
                f"not {cfg.backbone!r}"
            )
        kwargs["depth_multiplier"] = cfg.depth_multiplier
    return BACKBONES[cfg.backbone](**kwargs)


def build_model(
    cfg: ModelConfig, *, class_names: Sequence[str] | None = None, preprocessing: Preprocessing | None = None,
    class_colors: Sequence[Sequence[int]] | None = None, class_values: Sequence[int] | None = None,
) -> DeepLab:
    """Build a randomly initialised DeepLab for `cfg` (weights come from a checkpoint or `deeplab convert`).

    `preprocessing` defaults to ImageNet's RGB statistics for 3 bands and to (x - 0) / 1 for any other number, so a
    model of `cfg.in_channels` bands always carries one mean and std per band."""
    if class_names is None:
        class_names = [f"class_{i}" for i in range(cfg.num_classes)]
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names given for num_classes={cfg.num_classes}; give one per class")
    for what, given in (("class colours", class_colors), ("class values", class_values)):
        if given is not None and len(given) != cfg.num_classes:
            raise ValueError(f"{len(given)} {what} given for num_classes={cfg.num_classes}; give one per class")
    if preprocessing is None:
        preprocessing = Preprocessing() if cfg.in_channels == 3 else Preprocessing(
            mean=(0.0,) * cfg.in_channels, std=(1.0,) * cfg.in_channels)
    if preprocessing.bands != cfg.in_channels:
        raise ValueError(f"the preprocessing has a mean and std for {preprocessing.bands} bands but the model reads "
                         f"{cfg.in_channels} (in_channels); give one per band")
    backbone = build_backbone(cfg)
    if cfg.head == "v3":
        aspp, decoder, head_conv, classifier = _v3_head(cfg, backbone)
    elif cfg.head == "v1-largefov":
        aspp, decoder, head_conv = LargeFOV(backbone.channels["out"], rate=cfg.rates[0]), None, None
        classifier = nn.Conv2d(FC_CHANNELS, cfg.num_classes, 1)  # fc8
    else:
        # VGG gets the v2 paper's VGG-16 branches (fc6, fc7, fc8); every other backbone its ResNet-101 branches.
        fc = cfg.backbone.startswith("vgg")
        aspp = ASPPL(backbone.channels["out"], cfg.num_classes, rates=cfg.rates, fc=fc)
        decoder, head_conv, classifier = None, None, nn.Identity()
    point_head = PointHead(backbone.channels["low_level"], cfg.num_classes) if cfg.pointrend else None
    model = DeepLab(
        config=cfg,
        backbone=backbone,
        aspp=aspp,
        decoder=decoder,
        classifier=classifier,
        class_names=class_names,
        preprocessing=preprocessing,
        head_conv=head_conv,
        point_head=point_head,
        class_colors=class_colors,
        class_values=class_values,
    )
    _initialize(model, bn_momentum=cfg.bn_momentum)
    return model


def _v3_head(cfg: ModelConfig, backbone: Backbone) -> tuple[ASPP, Decoder | None, nn.Module | None, nn.Conv2d]:
    """ASPP, the decoder (v3+), torchvision's extra 3x3 conv (`head_conv`) and the 1x1 classifier."""
    aspp = ASPP(
        backbone.channels["out"],
        cfg.aspp_channels,
        rates=cfg.rates,
        separable=cfg.separable,
        image_pooling=cfg.image_pooling,
        dropout=cfg.dropout,
    )
    decoder = None
    if cfg.decoder:
        decoder = Decoder(
            backbone.channels["low_level"],
            cfg.aspp_channels,
            low_level_channels=cfg.low_level_channels,
            channels=cfg.decoder_channels,
            separable=cfg.separable,
            align_corners=cfg.align_corners,
        )
    head_channels = cfg.decoder_channels if cfg.decoder else cfg.aspp_channels
    head_conv = conv_bn(head_channels, head_channels, kernel_size=3) if cfg.head_conv else None
    return aspp, decoder, head_conv, nn.Conv2d(head_channels, cfg.num_classes, 1)


def _initialize(model: nn.Module, *, bn_momentum: float) -> None:
    """He-normal convs (TF's resnet/xception scopes use variance scaling), unit BN, TF's BN decay everywhere, and
    TF's small-normal logits layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.weight.device.type != "meta":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = bn_momentum
            if m.weight is not None and m.weight.device.type != "meta":
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    # TF's get_branch_logits: the logits layer starts from truncated_normal(stddev=0.01), so the first loss is
    # about log(num_classes) instead of the several nats a He-initialised classifier gives.
    classifier = getattr(model, "classifier", None)
    aspp = getattr(model, "aspp", None)
    if isinstance(aspp, (LargeFOV, ASPPL)):
        # DeepLab v1/v2's Caffe prototxts: fc8 (and v2's ResNet branches) from a Gaussian of std 0.01, zero bias.
        logits = aspp.logits_layers() if isinstance(aspp, ASPPL) else [classifier]
        for conv in logits:
            if conv.weight.device.type != "meta":
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
    elif isinstance(classifier, nn.Conv2d) and classifier.weight.device.type != "meta":
        nn.init.trunc_normal_(classifier.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(classifier.bias)


def with_pointrend_options(
    model: nn.Module, *, pointrend: bool | None = None, points: int | None = None, steps: int | None = None
) -> nn.Module:
    """`model` with PointRend's inference options applied (its config replaced): `pointrend=False` keeps the coarse
    prediction (no subdivision), `points` / `steps` set the subdivision; None leaves the checkpoint's. Refuses them
    for a model without a point head."""
    changes = {k: v for k, v in (("pointrend_points", points), ("pointrend_steps", steps)) if v is not None}
    if pointrend is False:
        changes["pointrend_steps"] = 0  # no subdivision: the coarse prediction, resized
    if not (changes or pointrend):
        return model
    if not getattr(getattr(model, "config", None), "pointrend", False):
        raise ValueError("--pointrend options apply to checkpoints trained with --pointrend; this one has no point head")
    if changes:
        model.config = model.config.replace(**changes)
    return model
