"""`deeplab convert`: an official TF DeepLab .tflite or torchvision / timm weights as a deeplab checkpoint."""

from __future__ import annotations

import argparse

from ..models.backbones import BACKBONES
from ..models.config import OUTPUT_STRIDES, ModelConfig
from .flags import FIELD_HELP, HEAD_CHOICES, apply_head_flags, number


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..convert import convert_file, is_tflite
    from ..data.palettes import PALETTES
    from ..models.checkpoint import save_checkpoint

    tflite = Path(args.src).is_file() and is_tflite(Path(args.src))
    if args.check_image and not tflite:
        raise ValueError(f"--check-image: {args.src} is not a .tflite file; the agreement is measured against the TF "
                         "Lite runtime running the original .tflite only")
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
    conversion = None
    if tflite:
        from ..convert.tflite_check import measure_agreement

        conversion = measure_agreement(model, args.src, images=args.check_image)
    path = save_checkpoint(model, args.out, source=str(args.src),
                           **({"conversion": conversion} if conversion else {}))
    cfg = model.config
    rounding = model.activation_rounding
    print(f"{args.src} -> {path}: {cfg.backbone} (depth multiplier {cfg.depth_multiplier}), output stride "
          f"{cfg.output_stride}, head {cfg.head}, rates {cfg.rates}, {'decoder' if cfg.decoder else 'no decoder'}, "
          f"{cfg.num_classes} classes, align_corners={cfg.align_corners}, mean {model.preprocessing.mean}, "
          f"std {model.preprocessing.std}, input size {model.preprocessing.input_size}"
          + (f", activations rounded as the uint8 file rounds them ({len(rounding)} places)" if rounding else "")
          + (f"; {agreement_line(conversion)}" if conversion else ""))
    return 0


def agreement_line(conversion: dict) -> str:
    """The measured agreement with the official runtime (or why it was not measured), as the convert line ends."""
    if conversion.get("agreement") is None:
        return f"agreement with the official runtime {conversion['detail']}"
    one_class = len(conversion.get("runtime_classes") or {}) <= 1
    return (f"agreement with the official runtime {100 * conversion['agreement']:.2f}% ({conversion['detail']})"
            + ("; one class only, so this says little: pass --check-image PHOTO, a photo of what the model knows"
               if one_class else ""))


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
    p.add_argument(
        "--check-image", action="append", default=None, metavar="PATH",
        help=".tflite files: an image to measure the argmax agreement with the official TF Lite runtime on (resized "
        "to the file's input size; repeat for several). Default: a synthetic image. Measured when ai-edge-litert is "
        "installed (pip install 'deeplab[litert]') and recorded in the checkpoint, its model folder and card",
    )
    p.set_defaults(func=run)
