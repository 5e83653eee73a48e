"""Flags several commands share: dataclass fields as flags, model flags, inference flags, folder-dataset flags, and
range-checked argument types."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..models.backbones import BACKBONES
from ..models.config import HEADS, OUTPUT_STRIDES, ModelConfig

# What --head accepts: the ModelConfig heads, and v3plus (the v3 head with the decoder).
HEAD_CHOICES = (*HEADS, "v3plus")


def _flag_parser(annotation: Any):
    import types
    import typing

    base = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None`: parse as X
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = options[0]
        if len(options) > 1 and str in options:  # `X | str`: X when the text parses as one, else the text
            first = _flag_parser(base)

            def parse_or_text(text: str):
                try:
                    return first(text)
                except (argparse.ArgumentTypeError, ValueError):
                    return text

            return parse_or_text
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        example = "a,b,c" if item is str else "1,2,4"

        def parse_tuple(text: str) -> tuple:
            try:
                return tuple(item(v.strip()) for v in text.split(",") if v.strip())
            except ValueError:
                raise _argparse_error(f"expected comma-separated {item.__name__} values like {example}, got {text!r}") from None

        return parse_tuple
    return base


def _argparse_error(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def add_dataclass_flags(
    parser: Any, cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
    helps: dict[str, str] | None = None, choices: dict[str, tuple] | None = None, preset: Any = None,
    preset_name: str = "", ranges: dict[str, tuple[Any, str]] | None = None,
) -> None:
    """Add `--field-name` for every field of dataclass `cls` (or the fields in `only`; booleans get --x/--no-x),
    default None, so a given flag can be told from a default. The help shows the field's default and, where a
    `preset` (an instance of `cls`) differs, the preset's value too."""
    import typing

    hints = typing.get_type_hints(cls)
    helps, choices, ranges = helps or {}, choices or {}, ranges or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name) or f.name.replace("_", " ")
        notes = []
        if f.default is not None and f.default is not dataclasses.MISSING and "(default" not in text:
            notes.append(f"default {_shown(f.default)}")
        if preset is not None and getattr(preset, f.name) != f.default:
            notes.append(f"{preset_name}: {_shown(getattr(preset, f.name))}")
        if notes:
            text += f" ({'; '.join(notes)})"
        if f.name in choices:
            text += f"; one of {', '.join(str(c) for c in choices[f.name])}"
        if hints[f.name] in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parse = _flag_parser(hints[f.name])
            if f.name in ranges:
                parse = _in_range(parse, *ranges[f.name])
            parser.add_argument(flag, type=parse, default=None, help=text, metavar=f.name.upper(),
                                choices=choices.get(f.name))


def _in_range(parse, ok, expected: str):
    """`parse`, then the field's range check: a value out of range is refused where the flag is parsed."""
    def checked(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {expected}")
        return value

    return checked


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "''"
    return str(value)


def dataclass_from_flags(cls: type, base: Any, args: Any) -> Any:
    """`base` with every field whose flag was given on the command line replaced."""
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **changes)


def add_model_flags(p: argparse.ArgumentParser, *, backbone: str = "resnet101_beta") -> None:
    """The architecture flags of `deeplab profile` (a subset of `deeplab train`'s, with the same help)."""
    h = FIELD_HELP
    p.add_argument("--backbone", default=backbone, choices=sorted(BACKBONES), help=f"{h['backbone']} (default %(default)s)")
    p.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES,
                   help=f"{h['output_stride']} (default %(default)s)")
    p.add_argument("--head", default=None, choices=HEAD_CHOICES, help=f"{h['head']} (default v3 with the decoder)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="the DeepLabv3+ decoder on the v3 head (default on, off with --head v3)")
    p.add_argument("--separable", action="store_true", help=h["separable"])
    p.add_argument("--num-classes", type=number(int, 1, "a positive number of classes"), default=21,
                   help="number of classes (default %(default)s)")
    p.add_argument("--atrous-rates", type=int_tuple, default=None, help=h["atrous_rates"])
    p.add_argument("--multi-grid", type=int_tuple, default=None, help=h["multi_grid"])
    p.add_argument("--no-image-pooling", dest="image_pooling", action="store_false", help="drop the ASPP image pooling branch")
    p.add_argument("--depth-multiplier", type=number(float, 0, "positive, e.g. 0.5", strict=True), default=1.0,
                   help=f"{h['depth_multiplier']} (default %(default)s)")


def int_tuple(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers ('' is the empty tuple)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 6,12,18, got {text!r}")
    return values


def model_config_from_flags(args: argparse.Namespace) -> ModelConfig:
    cfg = ModelConfig(
        backbone=args.backbone,
        num_classes=args.num_classes,
        output_stride=args.output_stride,
        atrous_rates=args.atrous_rates,
        multi_grid=args.multi_grid,
        head=args.head or "v3",
        decoder=True if args.decoder is None else args.decoder,
        separable=args.separable,
        image_pooling=args.image_pooling,
        depth_multiplier=args.depth_multiplier,
    )
    return apply_head_flags(cfg, head=args.head, decoder=args.decoder)


def apply_head_flags(cfg: ModelConfig, *, head: str | None, decoder: bool | None) -> ModelConfig:
    """`cfg` as `--head` and `--decoder` (None: not given) ask together: `--head v3` alone is DeepLabv3 (no decoder),
    `--head v3plus` DeepLabv3+; the decoder belongs to the v3 head, so `--decoder` with v1/v2 is refused."""
    if decoder and cfg.head != "v3":
        raise ValueError(f"--decoder: --head {cfg.head} has no decoder (the v3+ decoder sits on --head v3); "
                         "leave --decoder out")
    if head == "v3plus" and decoder is False:
        raise ValueError("--head v3plus is --head v3 with the decoder; use --head v3 for DeepLabv3 without it")
    if head == "v3" and decoder is None:
        return cfg.replace(decoder=False)
    return cfg


FIELD_HELP = {
    # ModelConfig
    "backbone": "backbone network",
    "num_classes": "number of classes (the dataset's, when training on one)",
    "output_stride": "input size / feature size of the backbone's output, 8, 16 or 32; strides past it become "
                     "dilations and the ASPP rates follow it",
    "atrous_rates": "ASPP rates, comma-separated, e.g. 6,12,18 ('' keeps only the 1x1 branch; default: 6,12,18 at "
                    "output stride 16, doubled at 8, halved at 32)",
    "multi_grid": "unit rates of the last ResNet / Xception stage, e.g. 1,2,4 (default: the backbone's)",
    "decoder": "the DeepLabv3+ decoder on the stride-4 features (--no-decoder: DeepLabv3)",
    "separable": "atrous separable convolution (depthwise + pointwise) in ASPP and the decoder",
    "image_pooling": "the ASPP image-level pooling branch (the paper drops it for Cityscapes)",
    "aspp_channels": "channels of every ASPP branch and its projection",
    "decoder_channels": "channels of the decoder's two 3x3 convs",
    "low_level_channels": "channels the stride-4 feature is projected to before the decoder (the paper's 48)",
    "head_conv": "a 3x3 conv + BN + ReLU before the classifier (torchvision's DeepLabHead has one)",
    "dropout": "dropout probability after the ASPP projection, in [0, 1)",
    "align_corners": "bilinear resizing with align_corners=True, as TF models do (crops of the form 16k+1, e.g. 513)",
    "depth_multiplier": "width multiplier of mobilenet_v2 and mobilenet_edgetpu, e.g. 0.5 (1.0 for every other "
                        "backbone)",
    "bn_momentum": "BatchNorm momentum in PyTorch's convention, in [0, 1] (TF's decay 0.9997 is 0.0003)",
    "pointrend": "a PointRend point head refining the prediction at uncertain points",
    "pointrend_train_points": "PointRend: points per image in training",
    "pointrend_points": "PointRend: points refined per subdivision step at inference",
    "pointrend_steps": "PointRend: subdivision steps at inference (default: up to the input resolution)",
    # TrainConfig
    "dataset": "the dataset (synthetic is built in: no download; folder reads your own, see --data-root; "
               "classified-tiles reads an ArcGIS Pro Classified Tiles export)",
    "data_root": "the dataset's folder",
    "dataset_options": "extra dataset arguments NAME=VALUE,..., e.g. image_size=96,length=64 for synthetic",
    "train_split": "the split to train on",
    "val_split": "the split to validate on",
    "crop_size": "training crop side in pixels, at least 17 (the papers use 513)",
    "min_scale": "smallest random rescaling of a training image, e.g. 0.5",
    "max_scale": "largest random rescaling of a training image, e.g. 2.0",
    "scale_step": "rescalings are drawn in steps of this (TF's 0.25); 0 draws them continuously",
    "flip": "random left-right flips in training",
    "batch_size": "images per step, global: split across torchrun processes",
    "steps": "training steps (SGD updates)",
    "lr": "initial learning rate of the poly schedule",
    "lr_power": "power of the poly schedule: lr * (1 - step / steps) ** power",
    "momentum": "SGD momentum, in [0, 1)",
    "weight_decay": "L2 weight decay on conv kernels, in [0, 1) (default: TF's 1e-4 for ResNet, 4e-5 for "
                    "Xception and the MobileNets)",
    "ignore_index": "mask value that is never counted, 0..255",
    "hard_pixel_fraction": "train on only this fraction of each image's hardest pixels, in (0, 1] (TF's "
                           "top_k_percent_pixels)",
    "freeze_bn": "BatchNorm in inference mode and not trained (fine-tuning at output stride 8)",
    "amp": "mixed precision: auto (bf16 autocast on a CUDA GPU with bf16, fp16 with a gradient scaler on one "
           "without; on a CPU bf16 with AMX, bf16 with AVX512_BF16 but for the MobileNets, else off; the start-up "
           "line says which and why), off, bf16 (CPU or CUDA) or fp16 (CUDA)",
    "channels_last": "NHWC memory for the model and batches (faster on CPU and GPU; --no-channels-last: NCHW)",
    "recompute": "recompute the backbone's early stages (ResNet: stem, layer1, layer2) in the backward pass instead "
                 "of keeping their activations: the same gradients, less peak memory, a little more time "
                 "(--no-recompute: fastest)",
    "compile": "torch.compile the model for training (the first steps compile; pays on GPUs, not on CPUs)",
    "val_every": "validate every N steps (0: only at the end)",
    "val_limit": "validate on the first N validation images only (default: all)",
    "head": "v1-largefov (DeepLab v1's LargeFOV: fc6 3x3 rate 12 at output stride 8, fc7, fc8), v2-aspp (DeepLab v2's "
            "ASPP-L: four branches at rates 6, 12, 18, 24 at output stride 8, summed), v3 (DeepLabv3's ASPP; "
            "--decoder adds the v3+ decoder) or v3plus (v3 with the decoder); the papers use --output-stride 8 for "
            "v1 and v2",
    "msc": "DeepLab v2's multi-scale training: the batch also at 0.75 and 0.5 size, logits fused by element-wise max, "
           "the loss summed over the three scales and the fusion",
    "val_scales": "validate with these image scales, softmax averaged, e.g. 1.5 for thin structures (deeplab eval "
                  "of the checkpoint uses them too)",
    "val_flip": "validate with the mirrored image averaged in (deeplab eval of the checkpoint does too)",
    "checkpoint_every": "write last.pt every N steps",
    "eval_output_stride": "validate at this output stride, 8, 16 or 32 (e.g. 8 for a model trained at 16)",
    "seed": "seed of the batch order, the augmentation and the initialisation, 0 or more",
    "workers": "data-loading processes, 0 or more (default: 0 on CPU; on CUDA one per spare core, up to 8)",
    "skip_bad": "warn about and skip unreadable or invalid samples instead of stopping",
    "backbone_weights": "ImageNet backbone weights to start from: a torchvision or timm .pth file",
    "init_checkpoint": "start from a deeplab checkpoint (.pt, model folder or Hub repo id owner/name), e.g. one "
                       "written by `deeplab convert`",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "val_images": "validation images drawn in predictions.png, 0 or more",
    "precise_bn_images": "re-measure BatchNorm statistics on N training images before each validation (0: off)",
    "ignore_data_warnings": "train although the data report says the masks look read wrong",
    "image_dir": "folder dataset: images folder under --data-root (default images)",
    "mask_dir": "folder dataset: masks folder under --data-root (default masks)",
    "image_suffix": "folder dataset: image file name ending when images and masks share a folder, e.g. _image.png",
    "mask_suffix": "folder dataset: mask file name ending (default .png)",
    "palette": "folder dataset: colour masks read with voc, cityscapes, ade20k, camvid, or a file of 'R G B' lines",
    "mask_mode": "folder dataset: auto (by the PNG's mode), index or color",
    "classes": "folder dataset: class names NAME,NAME,... (default classes.txt)",
    "label_map": "folder dataset: stored mask value -> class, STORED:CLASS,... e.g. 0:0,255:1 (CLASS may be ignore)",
    "val_fraction": "folder and classified-tiles datasets: held-out validation fraction when there is no "
                    "splits/val.txt (default 0.2)",
    "class_weights": "loss weight per class, W,W,... in class order, or auto: the square root of median-frequency "
                     "balancing of the data report's pixel shares, sqrt(median(f) / f_c)",
    "loss": "pixel loss: ce (cross-entropy), focal (Lin et al., --focal-gamma), dice (soft Dice), ce+dice (their "
            "sum), lovasz (Lovasz-softmax, Berman et al.)",
    "focal_gamma": "focal loss exponent gamma (default 2, Lin et al.); 0 is cross-entropy",
    "bands": "input bands the model reads, a count >= 1 (default: the data's: 3 for photos, NumBands of an ArcGIS "
             "export); must match the data",
    "rgb_bands": "0-based positions of the red, green and blue bands among --bands, e.g. 2,1,0; their RGB filters "
                 "start the first conv from RGB weights (default: the export's band names, else 0,1,2)",
    "in_channels": "model input bands (deeplab train sets it from the data; --bands)",
}


def field_choices() -> dict[str, tuple]:
    """The fixed sets some ModelConfig / TrainConfig fields choose from: argparse refuses anything else by name."""
    from ..data import DATASETS
    from ..training.config import AMP_CHOICES, LOSSES

    return {"backbone": tuple(sorted(BACKBONES)), "head": HEAD_CHOICES, "output_stride": OUTPUT_STRIDES,
            "eval_output_stride": OUTPUT_STRIDES, "amp": AMP_CHOICES, "dataset": tuple(sorted(DATASETS)),
            "mask_mode": ("auto", "index", "color"), "loss": LOSSES}


def number(kind: type, low: float, expected: str, *, below: float | None = None, below_inclusive: bool = False,
            strict: bool = False):
    """An argparse type: `kind` (int or float) >= `low` (> with `strict`) and < `below` (<= with `below_inclusive`);
    argparse names the flag in its error."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; must be {expected}") from None
        ok = math.isfinite(value) and (value > low if strict else value >= low)
        if below is not None:
            ok = ok and (value <= below if below_inclusive else value < below)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} must be {expected}")
        return value

    return parse


def float_tuple(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers like 0.5,0.75,1.0, got {text!r}")
    return values


def size_arg(text: str) -> tuple[int, int] | str | None:
    """'model' (the checkpoint's input size, if any), 'native' (the image's own size), 'H' or 'HxW'."""
    if text in ("model", "native"):
        return None if text == "native" else "model"
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected 'model', 'native', a size like 513 or HxW like 257x385, got {text!r}")
    return parts  # type: ignore[return-value]


def sizes_arg(text: str) -> tuple[tuple[int, int], ...]:
    sizes = tuple(size_arg(t) for t in text.split(",") if t.strip())
    if len(sizes) < 2 or not all(isinstance(s, tuple) for s in sizes):
        raise argparse.ArgumentTypeError(f"expected two or more sizes like 257x257,193x321, got {text!r}")
    return sizes  # type: ignore[return-value]


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (softmax probabilities are averaged over scales and flips, as TF DeepLab does)")
    g.add_argument("--scales", type=float_tuple, default=None,
                   help="image scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default 1.0; eval: the scales the checkpoint "
                   "was validated at in training, --val-scales)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the mirrored image and mirror its output back (default off; eval: as the checkpoint "
                   "was validated in training, --val-flip)")
    g.add_argument("--window", type=number(int, 17, "at least 17 pixels, e.g. 513"), default=None, help="sliding-window tile size in pixels, e.g. 513 (default: whole image)")
    g.add_argument("--overlap", type=number(float, 0, "in [0, 1), e.g. 0.33", below=1), default=0.33, help="sliding-window overlap as a fraction of the window (default %(default)s)")
    g.add_argument(
        "--input-size", type=size_arg, default="model",
        help="'model' (default): resize images to the checkpoint's fixed input size if it has one (converted TFLite "
        "models: 257x257 / 513x513) and the logits back; 'native': the image's own size; or HxW",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_runtime_flags(g)
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-fast is --runtime eager (the model as built, no fast path)")
    g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="run the network under autocast: bf16 (CPU or CUDA) or fp16 (CUDA); default off")
    g.add_argument("--crf", action="store_true",
                   help="refine with DeepLab v1/v2's dense CRF (defaults: 10 iterations, bilateral w 4, xy 67, rgb 3; "
                   "Gaussian w 3, xy 1)")
    g.add_argument("--crf-params", default=None,
                   help="override CRF settings, e.g. iterations=5,bi_w=5,bi_xy_std=50,bi_rgb_std=3,pos_w=3,pos_xy_std=1")
    g.add_argument("--crf-backend", default="torch", choices=["torch", "pydensecrf"],
                   help="torch (built in) or pydensecrf (pip install 'deeplab[crf]'); default torch")
    g.add_argument("--pointrend", action=argparse.BooleanOptionalAction, default=None,
                   help="PointRend checkpoints refine by adaptive subdivision by default; --no-pointrend uses the "
                   "coarse prediction alone (for comparison)")
    g.add_argument("--pointrend-points", type=number(int, 1, "a positive number of points"), default=None,
                   help="PointRend checkpoints: points refined per subdivision step (default: the checkpoint's, 8192)")
    g.add_argument("--pointrend-steps", type=number(int, 0, "0 or a positive number of steps"), default=None,
                   help="PointRend checkpoints: subdivision steps (default: up to the input resolution)")


def add_runtime_flags(g) -> None:
    from ..deploy.precision import PRECISIONS
    from ..deploy.runtimes import RUNTIME_CHOICES

    g.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                   help="auto (default): the fastest installed runtime, measured on the first image; torch: the PyTorch "
                   "fast path; eager: the model as built; onnxruntime / openvino / tflite: the exported graph (pip install "
                   "'deeplab[onnx]' / 'deeplab[openvino]' / 'deeplab[litert]'). Each is checked against the eager model "
                   "when built")
    g.add_argument("--threads", type=number(int, 1, "a positive number of threads"), default=None,
                   help="CPU threads for the network (default: PyTorch's, i.e. OMP_NUM_THREADS or the core count)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): with --runtime auto, float32 plus bf16 on CPUs with AMX or AVX512_BF16 and "
                   "int8 when deeplab quantize wrote CKPT_NAME.int8.onnx beside the checkpoint (DIR/model.int8.onnx in "
                   "a model folder), each reduced one kept only if its argmax agrees with float32 on 99.5%% of the "
                   "first image's pixels; with a named runtime, "
                   "fp32. fp32: float32 only, equal to the eager model to 1e-4. bf16 / int8: that precision")
    g.add_argument("--retime", action="store_true",
                   help="time the runtimes again instead of taking the choice cached for this machine and model")


def inference_options(args: argparse.Namespace, **defaults):
    """The InferenceOptions the flags of `add_inference_flags` describe; `defaults` for flags left unset."""
    from ..inference.options import InferenceOptions

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runtime = "eager" if args.fast is False else args.runtime
    return InferenceOptions(
        scales=args.scales or defaults.get("scales", (1.0,)),
        flip=args.flip if args.flip is not None else defaults.get("flip", False),
        window=args.window, overlap=args.overlap, input_size=args.input_size, runtime=runtime, threads=args.threads,
        precision=args.precision, retime=args.retime, amp=args.amp, crf=crf_params(args), crf_backend=args.crf_backend, pointrend=args.pointrend,
        pointrend_points=args.pointrend_points, pointrend_steps=args.pointrend_steps,
    )


def load_for_inference(path: str, args: argparse.Namespace):
    """(model, checkpoint dict or exported metadata) for eval / predict / serve: a deeplab checkpoint (a .pt, a model
    folder, or a Hub repo id "owner/name" read through huggingface_hub's cache), or an exported .onnx / OpenVINO .xml
    file run by its runtime."""
    from pathlib import Path

    from ..deploy.runners import EXPORTED_SUFFIXES, load_exported
    from ..models.checkpoint import model_from_checkpoint, read_checkpoint
    from ..models.hub import checkpoint_path

    if Path(path).suffix.lower() in EXPORTED_SUFFIXES:
        runtime = args.runtime if args.runtime in ("onnxruntime", "openvino", "tflite") else None
        model = load_exported(path, runtime=runtime, threads=args.threads)
        return model, model.metadata
    local = checkpoint_path(path)
    data = read_checkpoint(local)
    model = model_from_checkpoint(data, source=str(path)).eval()
    if args.precision in ("auto", "int8") and args.runtime in ("auto", "onnxruntime", "openvino"):
        from ..deploy.quantize import int8_beside

        model.int8_file = int8_beside(local, model)  # a repo's own model.int8.onnx, when it has one
    return model, data


def crf_params(args: argparse.Namespace):
    from ..inference.crf import CRFParams

    if args.crf_params and not args.crf:
        raise ValueError("--crf-params needs --crf")
    if not args.crf:
        return None
    values = {}
    for item in (args.crf_params or "").split(","):
        if not item.strip():
            continue
        name, sep, text = item.partition("=")
        if not sep or name.strip() not in CRFParams.__dataclass_fields__:
            raise ValueError(f"--crf-params: {item!r} is not NAME=VALUE with NAME one of {sorted(CRFParams.__dataclass_fields__)}")
        values[name.strip()] = int(text) if name.strip() == "iterations" else float(text)
    return CRFParams(**values)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_folder_flags(p: argparse.ArgumentParser, note: str) -> None:
    """The folder dataset's flags, shared with `deeplab train` (same names, same parsing, same help)."""
    from ..training.config import FOLDER_OPTIONS, RANGES, TrainConfig

    g = p.add_argument_group(f"folder dataset ({note})")
    add_dataclass_flags(g, TrainConfig, only=FOLDER_OPTIONS, helps=FIELD_HELP, ranges=RANGES)
    g.add_argument("--dataset-options", type=str_tuple, default=None, help=FIELD_HELP["dataset_options"])


def str_tuple(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def flagged_folder_options(args: argparse.Namespace) -> dict:
    from ..training.config import FOLDER_OPTIONS

    return {name: getattr(args, name) for name in (*FOLDER_OPTIONS, "dataset_options") if getattr(args, name) is not None}


def add_raster_flags(p: argparse.ArgumentParser) -> None:
    """How rasters (GeoTIFF) of any size are tiled: `deeplab.inference.raster`."""
    g = p.add_argument_group("rasters (GeoTIFF and other GDAL rasters, any size; pip install 'deeplab[geo]')")
    g.add_argument("--tile", type=number(int, 17, "at least 17 pixels, e.g. 512"), default=None,
                   help="raster tile size in pixels, each tile run at its own size (default 512, or the checkpoint's "
                   "fixed input size when larger, e.g. 513; an exported .tflite file: its own size)")
    g.add_argument("--padding", type=number(int, 0, "0 or a positive number of pixels below half the tile"),
                   default=None, help="pixels of each tile's border that overlap its neighbours; tiles step by tile - "
                   "2 x padding and are blended where they overlap (default: a quarter of --tile, as ArcGIS)")
    g.add_argument("--tile-batch", type=number(int, 1, "a positive number of tiles"), default=2,
                   help="tiles run per call: peak memory grows with it, not with the raster (default %(default)s)")
    g.add_argument("--scale", type=number(float, 0, "a positive factor, e.g. 0.5", strict=True), default=None,
                   help="resample the raster by this factor for the model (0.5: the model sees it at half its "
                   "resolution, tiles of --tile pixels cover 2 x --tile raster pixels); the classes come back on the "
                   "raster's grid")
    g.add_argument("--resolution", type=number(float, 0, "a positive number of metres, e.g. 0.3", strict=True),
                   default=None, metavar="METRES", help="the ground sampling distance the model was trained at: the "
                   "raster is resampled by its own pixel size / METRES (rasters in a projected CRS in metres; ArcGIS's "
                   "cell size)")


def raster_tiling(args: argparse.Namespace, model):
    """The raster tiling the flags ask for (`default_tiling`: 512, or the model's larger fixed input size)."""
    from ..inference.raster import default_tiling

    return default_tiling(model, tile=args.tile, padding=args.padding, batch=args.tile_batch)


def raster_note(args: argparse.Namespace, model) -> str | None:
    """The one line to print when the flags would resize raster tiles (`deeplab.inference.raster.tiling_note`)."""
    from ..inference.raster import tiling_note

    return tiling_note(raster_tiling(args, model), args.input_size)

