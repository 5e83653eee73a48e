"""`deeplab convert`: an official TF DeepLab .tflite or torchvision / timm weights as a deeplab checkpoint."""

from __future__ import annotations

import argparse

from ..models.backbones import BACKBONES
from ..models.config import OUTPUT_STRIDES, ModelConfig
from .flags import FIELD_HELP, HEAD_CHOICES, apply_head_flags, number


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_file
    from ..data.palettes import PALETTES
    from ..models.checkpoint import save_checkpoint

    names = None
    if args.labels in PALETTES:
        names = list(PALETTES[args.labels].class_names)
    elif args.labels:
        with open(args.labels, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    # The head of a model built on backbone weights: --head and --decoder as `deeplab train` reads them.
    head = apply_head_flags(ModelConfig(head=args.head or "v3", decoder=args.decoder is not False), head=args.head,
                            decoder=args.decoder)
    model = convert_file(
        args.src, backbone=args.backbone, num_classes=args.num_classes, output_stride=args.output_stride,
        decoder=head.decoder, head=head.head, class_names=names, activation_rounding=not args.float_activations,
    )
    path = save_checkpoint(model, args.out, source=str(args.src))
    cfg = model.config
    rounding = model.activation_rounding
    print(f"{args.src} -> {path}: {cfg.backbone} (depth multiplier {cfg.depth_multiplier}), output stride "
          f"{cfg.output_stride}, head {cfg.head}, rates {cfg.rates}, {'decoder' if cfg.decoder else 'no decoder'}, "
          f"{cfg.num_classes} classes, align_corners={cfg.align_corners}, mean {model.preprocessing.mean}, "
          f"std {model.preprocessing.std}, input size {model.preprocessing.input_size}"
          + (f", activations rounded as the uint8 file rounds them ({len(rounding)} places)" if rounding else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import a TFLite model or torchvision/timm weights as a deeplab checkpoint")
    p.add_argument("src", help="official TF DeepLab .tflite, torchvision deeplabv3 .pth, or an ImageNet backbone .pth")
    p.add_argument("out", help="the deeplab checkpoint to write (.pt)")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="for ImageNet backbone files: which backbone")
    p.add_argument("--num-classes", type=number(int, 1, "a positive number of classes"), default=None,
                   help="ImageNet backbone files: classes of the new head (default 21)")
    p.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES,
                   help="ImageNet backbone files: output stride of the new model, 8, 16 or 32 (default %(default)s)")
    p.add_argument("--head", default=None, choices=HEAD_CHOICES,
                   help="ImageNet backbone files: the new head: " + FIELD_HELP["head"] + " (default v3 with the decoder)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet backbone files: the v3+ decoder on the v3 head (default on, off with --head v3)")
    p.add_argument(
        "--labels",
        help="class names: a text file, one per line, or a built-in dataset's (voc, cityscapes, ade20k, camvid); "
        "default: labelmap.txt beside a .tflite",
    )
    p.add_argument(
        "--float-activations",
        action="store_true",
        help="uint8 .tflite files: compute in plain float instead of rounding every activation as the file does "
        "(the default, which reproduces the official runtime's output)",
    )
    p.set_defaults(func=run)
