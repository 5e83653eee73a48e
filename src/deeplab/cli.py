"""The `deeplab` command: thin argument parsing over the library; everything testable lives elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .backbones import BACKBONES
from .config import OUTPUT_STRIDES, ModelConfig, add_dataclass_flags, dataclass_from_flags


def _add_model_flags(p: argparse.ArgumentParser, *, backbone: str = "resnet101_beta") -> None:
    p.add_argument("--backbone", default=backbone, choices=sorted(BACKBONES), help="backbone network (default %(default)s)")
    p.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES, help="(default %(default)s)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True, help="DeepLabv3+ decoder (default on)")
    p.add_argument("--separable", action="store_true", help="atrous separable convolution in ASPP and decoder")
    p.add_argument("--num-classes", type=int, default=21, help="(default %(default)s)")
    p.add_argument("--atrous-rates", type=_int_tuple, default=None, help="override ASPP rates, e.g. 6,12,18 ('' for none)")
    p.add_argument("--multi-grid", type=_int_tuple, default=None, help="unit rates of the last stage, e.g. 1,2,4")
    p.add_argument("--no-image-pooling", dest="image_pooling", action="store_false", help="drop the ASPP pooling branch")
    p.add_argument("--depth-multiplier", type=float, default=1.0, help="MobileNetV2 width (default %(default)s)")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 6,12,18, got {text!r}") from None


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        backbone=args.backbone,
        num_classes=args.num_classes,
        output_stride=args.output_stride,
        atrous_rates=args.atrous_rates,
        multi_grid=args.multi_grid,
        decoder=args.decoder,
        separable=args.separable,
        image_pooling=args.image_pooling,
        depth_multiplier=args.depth_multiplier,
    )


def _billions(n: int | float) -> str:
    return f"{n / 1e9:8.2f} B"


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import paper_table, profile_model

    size = (args.size, args.size)
    if args.paper:
        rows = paper_table(size=size)
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"Multiply-adds at {args.size}x{args.size}, 21 classes: DeepLabv3+ paper (Tables 3 and 5) vs this implementation")
        print(f"{'backbone':<16}{'OS':>4}{'decoder':>9}{'separable':>11}{'paper':>10}{'paper conv.':>13}{'error':>8}{'performed':>12}{'effective':>12}")
        for r in rows:
            err = f"{100 * r['paper_relative_error']:+.2f}%" if r["paper_reference"] else "-"
            ref = f"{r['paper_reference']:.2f} B" if r["paper_reference"] else "-"
            print(
                f"{r['backbone']:<16}{r['output_stride']:>4}{'yes' if r['decoder'] else 'no':>9}"
                f"{'yes' if r['separable'] else 'no':>11}{ref:>10}{_billions(r['multiply_adds_paper']):>13}{err:>8}"
                f"{_billions(r['multiply_adds']):>12}{_billions(r['multiply_adds_effective']):>12}"
            )
        print("paper conv.: dilated convs counted on the map padded to a multiple of the rate (TF space-to-batch)")
        return 0
    cfg = _model_config(args)
    prof, layers = profile_model(cfg, size=size)
    if args.json:
        out = prof.to_dict()
        if args.layers:
            out["layers"] = [
                {"name": c.name, "out_shape": list(c.out_shape), "dilation": c.dilation[0], "multiply_adds": c.multiply_adds,
                 "multiply_adds_effective": c.multiply_adds_effective, "multiply_adds_paper": c.multiply_adds_paper}
                for c in layers
            ]
        print(json.dumps(out))
        return 0
    variant = "DeepLabv3+" if cfg.decoder else "DeepLabv3"
    print(f"{variant} {cfg.backbone}, output stride {cfg.output_stride}, ASPP rates {cfg.rates}"
          f"{', separable' if cfg.separable else ''}, {args.size}x{args.size}, {cfg.num_classes} classes")
    print(f"  parameters                {prof.params / 1e6:8.2f} M")
    print(f"  multiply-adds (performed) {_billions(prof.multiply_adds)}")
    print(f"  effective (taps in map)   {_billions(prof.multiply_adds_effective)}")
    paper = ""
    if prof.paper_reference:
        paper = f"   paper: {prof.paper_reference:.2f} B ({100 * prof.to_dict()['paper_relative_error']:+.2f}%)"
    print(f"  paper convention          {_billions(prof.multiply_adds_paper)}{paper}")
    if args.layers:
        print(f"\n  {'layer':<52}{'output':>18}{'rate':>5}{'performed':>12}{'paper conv.':>13}")
        for c in layers:
            shape = "x".join(str(s) for s in c.out_shape[1:])
            print(f"  {c.name:<52}{shape:>18}{c.dilation[0]:>5}{c.multiply_adds / 1e6:>10.1f} M{c.multiply_adds_paper / 1e6:>11.1f} M")
    return 0


TRAIN_HELP = {
    "dataset": "synthetic (built in, no download), voc, cityscapes, ade20k, camvid, folder",
    "data_root": "dataset folder",
    "batch_size": "global batch size, split across torchrun processes",
    "steps": "training steps",
    "lr": "initial learning rate of the poly schedule",
    "val_every": "validate every N steps (0: only at the end)",
    "backbone_weights": "ImageNet backbone weights (torchvision or timm file)",
    "init_checkpoint": "start from a deeplab checkpoint, e.g. one written by `deeplab convert`",
    "amp": "off, bf16 (CPU or CUDA) or fp16 (CUDA)",
    "hard_pixel_fraction": "train on only this fraction of hardest pixels",
    "freeze_bn": "BatchNorm in inference mode (fine-tuning at output stride 8)",
    "eval_output_stride": "validate at this output stride (e.g. 8 for a model trained at 16)",
    "skip_bad": "warn about and skip unreadable or invalid samples instead of stopping",
    "backbone": "backbone network: " + ", ".join(sorted(BACKBONES)),
    "dataset_options": "extra dataset arguments NAME=VALUE,..., e.g. image_size=96 for synthetic",
    "precise_bn_images": "re-measure BatchNorm statistics on N training images before each validation (0: off)",
    "val_scales": "validate with these image scales, softmax averaged, e.g. 1.5 for thin structures (deeplab eval "
                  "of the checkpoint uses them too)",
    "val_flip": "validate with the mirrored image averaged in (deeplab eval of the checkpoint does too)",
    "ignore_data_warnings": "train although the data report says the masks look read wrong",
    "image_dir": "folder dataset: images folder under --data-root (default images)",
    "mask_dir": "folder dataset: masks folder under --data-root (default masks)",
    "image_suffix": "folder dataset: image file name ending when images and masks share a folder, e.g. _image.png",
    "mask_suffix": "folder dataset: mask file name ending (default .png)",
    "palette": "folder dataset: colour masks read with voc, cityscapes, ade20k, camvid, or a file of 'R G B' lines",
    "mask_mode": "folder dataset: auto (by the PNG's mode), index or color",
    "classes": "folder dataset: class names NAME,NAME,... (default classes.txt)",
    "label_map": "folder dataset: stored mask value -> class, STORED:CLASS,... e.g. 0:0,255:1 (CLASS may be ignore)",
    "val_fraction": "folder dataset: held-out validation fraction when there is no splits/val.txt (default 0.2)",
}


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .train import SYNTHETIC_MODEL, SYNTHETIC_TRAIN, TrainConfig, TrainingDiverged, fit

    dataset = args.dataset or "synthetic"
    # The synthetic dataset gets the built-in 3-minute preset; real datasets get the paper's protocol.
    base_model, base_train = (SYNTHETIC_MODEL, SYNTHETIC_TRAIN) if dataset == "synthetic" else (ModelConfig(), TrainConfig())
    model_cfg = dataclass_from_flags(ModelConfig, base_model, args)
    train_cfg = dataclass_from_flags(TrainConfig, base_train, args)
    out = args.out or f"runs/{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    # With --resume, the flags given on the command line (not the preset's values) are the changes asked for.
    given = {f.name: getattr(args, f.name) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    try:
        result = fit(model_cfg, train_cfg, out_dir=out, resume=args.resume, progress=not args.quiet, echo=print,
                     resume_changes=given)
    except TrainingDiverged as e:
        print(f"deeplab train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ndeeplab train: interrupted; {_resume_hint(out)}", file=sys.stderr)
        return 130
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return 0
    m = result.metrics
    print(f"\nper-class IoU at step {result.step} ({result.seconds:.0f} s):")
    for name, iou in m["per_class_iou"].items():
        print(f"  {name:<20} {'-' if iou is None else f'{100 * iou:6.2f}'}")
    print(f"  {'mIoU':<20} {100 * m['miou']:6.2f}\n  {'pixel accuracy':<20} {100 * m['pixel_accuracy']:6.2f}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad sample(s) (--skip-bad); first: {result.skipped[0][0]}: {result.skipped[0][1]}")
    print(f"wrote {result.out_dir}: config.json, data_report.json, last.pt, best.pt, metrics.json, log.csv, val.csv, "
          "curves.png, predictions.png")
    return 0


def _resume_hint(out: str) -> str:
    from pathlib import Path

    from .checkpoint import read_checkpoint

    last = Path(out) / "last.pt"
    try:
        step = read_checkpoint(last)["step"]
    except (ValueError, KeyError):
        return f"no checkpoint was written yet in {out}; start again (a new --out, or remove that folder)"
    return f"{last} holds step {step}: continue with `deeplab train --out {out} --resume`"


def cmd_data(args: argparse.Namespace) -> int:
    """The data report of a dataset's splits; exit status 1 when a warning says the masks look read wrong."""
    from .data import build_dataset
    from .data.report import data_report, format_report
    from .train import TrainConfig

    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, seed=args.seed, **_flagged_folder_options(args))
    datasets = {split: build_dataset(cfg.dataset, root=cfg.data_root, split=split, seed=cfg.seed,
                                     skip_bad=args.skip_bad, **cfg.dataset_kwargs())
                for split in args.splits}
    report = data_report(datasets, max_masks=args.max_masks or None, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        where = f" at {cfg.data_root}" if cfg.data_root else ""
        print(format_report(report, title=f"{cfg.dataset}{where}"))
    return 1 if any(w["stop"] for w in report["warnings"]) else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .convert import convert_file

    from .data.palettes import PALETTES

    names = None
    if args.labels in PALETTES:
        names = list(PALETTES[args.labels].class_names)
    elif args.labels:
        with open(args.labels, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    model = convert_file(
        args.src, backbone=args.backbone, num_classes=args.num_classes, output_stride=args.output_stride,
        decoder=args.decoder, class_names=names, activation_rounding=not args.float_activations,
    )
    path = save_checkpoint(model, args.out, source=str(args.src))
    cfg = model.config
    rounding = model.activation_rounding
    print(f"{args.src} -> {path}: {cfg.backbone} (depth multiplier {cfg.depth_multiplier}), output stride "
          f"{cfg.output_stride}, ASPP rates {cfg.rates}, {'decoder' if cfg.decoder else 'no decoder'}, "
          f"{cfg.num_classes} classes, align_corners={cfg.align_corners}, mean {model.preprocessing.mean}, "
          f"std {model.preprocessing.std}, input size {model.preprocessing.input_size}"
          + (f", activations rounded as the uint8 file rounds them ({len(rounding)} places)" if rounding else ""))
    return 0


# -- eval, predict, export ------------------------------------------------------------------------------------------


def _number(kind: type, low: float, expected: str, *, below: float | None = None, below_inclusive: bool = False,
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


def _float_tuple(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers like 0.5,0.75,1.0, got {text!r}")
    return values


def _size_arg(text: str) -> tuple[int, int] | str | None:
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


def _sizes_arg(text: str) -> tuple[tuple[int, int], ...]:
    sizes = tuple(_size_arg(t) for t in text.split(",") if t.strip())
    if len(sizes) < 2 or not all(isinstance(s, tuple) for s in sizes):
        raise argparse.ArgumentTypeError(f"expected two or more sizes like 257x257,193x321, got {text!r}")
    return sizes  # type: ignore[return-value]


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (softmax probabilities are averaged over scales and flips, as TF DeepLab does)")
    g.add_argument("--scales", type=_float_tuple, default=None,
                   help="image scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default 1.0; eval: the scales the checkpoint "
                   "was validated at in training, --val-scales)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the mirrored image and mirror its output back (default off; eval: as the checkpoint "
                   "was validated in training, --val-flip)")
    g.add_argument("--window", type=_number(int, 17, "at least 17 pixels, e.g. 513"), default=None, help="sliding-window tile size in pixels, e.g. 513 (default: whole image)")
    g.add_argument("--overlap", type=_number(float, 0, "in [0, 1), e.g. 0.33", below=1), default=0.33, help="sliding-window overlap as a fraction of the window (default %(default)s)")
    g.add_argument(
        "--input-size", type=_size_arg, default="model",
        help="'model' (default): resize images to the checkpoint's fixed input size if it has one (converted TFLite "
        "models: 257x257 / 513x513) and the logits back; 'native': the image's own size; or HxW",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    _add_runtime_flags(g)
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
    g.add_argument("--pointrend-points", type=_number(int, 1, "a positive number of points"), default=None,
                   help="PointRend checkpoints: points refined per subdivision step (default: the checkpoint's, 8192)")
    g.add_argument("--pointrend-steps", type=_number(int, 0, "0 or a positive number of steps"), default=None,
                   help="PointRend checkpoints: subdivision steps (default: up to the input resolution)")


def _add_runtime_flags(g) -> None:
    from .inference import RUNTIME_CHOICES

    g.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                   help="auto (default): the fastest installed runtime, measured on the first image; torch: the PyTorch "
                   "fast path; eager: the model as built; onnxruntime / openvino / tflite: the exported graph (pip install "
                   "'deeplab[onnx]' / 'deeplab[openvino]' / 'deeplab[litert]'). Each is checked against the eager model "
                   "when built")
    g.add_argument("--threads", type=_number(int, 1, "a positive number of threads"), default=None,
                   help="CPU threads for the network (default: PyTorch's, i.e. OMP_NUM_THREADS or the core count)")


def _inference_options(args: argparse.Namespace, **defaults):
    """The InferenceOptions the flags of `_add_inference_flags` describe; `defaults` for flags left unset."""
    from .inference import InferenceOptions

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runtime = "eager" if args.fast is False else args.runtime
    return InferenceOptions(
        scales=args.scales or defaults.get("scales", (1.0,)),
        flip=args.flip if args.flip is not None else defaults.get("flip", False),
        window=args.window, overlap=args.overlap, input_size=args.input_size, runtime=runtime, threads=args.threads,
        amp=args.amp, crf=_crf_params(args), crf_backend=args.crf_backend, pointrend=args.pointrend,
        pointrend_points=args.pointrend_points, pointrend_steps=args.pointrend_steps,
    )


def _load_for_inference(path: str, args: argparse.Namespace):
    """(model, checkpoint dict or exported metadata) for eval / predict: a deeplab checkpoint, or an exported .onnx /
    OpenVINO .xml file run by its runtime."""
    from pathlib import Path

    from .checkpoint import model_from_checkpoint, read_checkpoint
    from .runtimes import EXPORTED_SUFFIXES, load_exported

    if Path(path).suffix.lower() in EXPORTED_SUFFIXES:
        runtime = args.runtime if args.runtime in ("onnxruntime", "openvino", "tflite") else None
        model = load_exported(path, runtime=runtime, threads=args.threads)
        return model, model.metadata
    data = read_checkpoint(path)
    return model_from_checkpoint(data, source=str(path)).eval(), data


def _crf_params(args: argparse.Namespace):
    from .crf import CRFParams

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


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pct(v: float | None) -> str:
    return "     -" if v is None else f"{100 * v:6.2f}"


def _add_folder_flags(p: argparse.ArgumentParser, note: str) -> None:
    """The folder dataset's flags, shared with `deeplab train` (same names, same parsing, same help)."""
    from .train import FOLDER_OPTIONS, TrainConfig

    g = p.add_argument_group(f"folder dataset ({note})")
    add_dataclass_flags(g, TrainConfig, only=FOLDER_OPTIONS, helps=TRAIN_HELP)
    g.add_argument("--dataset-options", type=_str_tuple, default=None, help=TRAIN_HELP["dataset_options"])


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _flagged_folder_options(args: argparse.Namespace) -> dict:
    from .train import FOLDER_OPTIONS

    return {name: getattr(args, name) for name in (*FOLDER_OPTIONS, "dataset_options") if getattr(args, name) is not None}


def _eval_data(args: argparse.Namespace, trained: dict | None):
    """(dataset, root, split, seed, dataset keyword arguments) for `deeplab eval`: the flags, with the training
    data recorded in the checkpoint (`trained`, a TrainConfig dict) as the default for every flag not given."""
    from dataclasses import replace
    from pathlib import Path

    from .train import TrainConfig

    cfg = TrainConfig.from_dict(trained) if trained else None
    name = args.dataset or (cfg.dataset if cfg else None)
    if name is None:
        raise ValueError("--dataset: this checkpoint records no training data (converted or older); pass --dataset "
                         "and --data-root")
    same = cfg is not None and cfg.dataset == name
    root = args.data_root or (cfg.data_root if same else None)
    flagged = _flagged_folder_options(args)
    # The training run's dataset options (label map, folders, classes, held-out fraction and seed) as defaults.
    base = replace(cfg, data_root=root) if same else TrainConfig(dataset=name, data_root=root)
    base = replace(base, **flagged)
    trained_here = same and root is not None and cfg.data_root is not None and Path(root).resolve() == Path(cfg.data_root).resolve()
    split = args.split
    if split is None and trained_here:
        split = cfg.val_split
    elif split is None:
        no_list = name == "folder" and not (root and (Path(root) / "splits" / "val.txt").is_file())
        split = "all" if no_list else "val"
    return name, root, split, base.seed, base.dataset_kwargs()


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    import torch

    from .distributed import init_distributed
    from .evaluate import build_eval_dataset, checkpoint_labels, evaluate, write_plots

    if args.plots:  # before the evaluation, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plots needs matplotlib: pip install 'deeplab[plots]' (or drop --plots)") from None
    device = _device(args.device)
    dist_info = init_distributed(device_type=device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    results = {}
    for label, path in zip(checkpoint_labels(args.checkpoint), args.checkpoint):
        model, data = _load_for_inference(path, args)
        name, root, split, seed, options = _eval_data(args, data.get("train_config"))
        trained = data.get("train_config") or {}
        inference = _inference_options(args, scales=tuple(trained.get("val_scales") or (1.0,)),
                                       flip=bool(trained.get("val_flip", False)))
        dataset = build_eval_dataset(model, name, root=root, split=split, seed=seed, skip_bad=args.skip_bad,
                                     **options)
        res = evaluate(
            model, dataset, options=inference, output_stride=args.eval_output_stride,
            trimap_widths=args.trimap or (), per_image=args.per_image, device=device,
            progress=not args.quiet and not args.json, limit=args.limit,
        )
        results[label] = {"checkpoint": str(path), "dataset": name, "split": split,
                          "images": getattr(dataset, "description", split), **res}
    if not dist_info.is_main:
        return 0
    if args.plots:
        written = write_plots(results, args.plots)
    if args.json:
        objs = list(results.values())
        print(json.dumps(objs[0] if len(objs) == 1 else {"checkpoints": objs}))
        return 0
    for label, res in results.items():
        s = res["settings"]
        extras = [f"scales {','.join(f'{v:g}' for v in s['scales'])}"] + (["flip"] if s["flip"] else [])
        extras += [f"window {s['window']} overlap {s['overlap']:g}"] if s["window"] else []
        extras += [f"input {s['input_size'][0]}x{s['input_size'][1]}"] if s["input_size"] else []
        extras += [f"runtime {s['runtime']}, {s['threads']} threads"]
        print(f"{label} on {res['dataset']} {res['split']}: {res['images']} ({res['num_images']} images, output "
              f"stride {s['output_stride']}, {', '.join(extras)}):")
        for name, iou in res["per_class_iou"].items():
            print(f"  {name:<24}{_pct(iou)}")
        print(f"  {'mIoU':<24}{_pct(res['miou'])}\n  {'pixel accuracy':<24}{_pct(res['pixel_accuracy'])}\n"
              f"  {'frequency-weighted IoU':<24}{_pct(res['fw_iou'])}")
        if res["trimap"]:
            print("  trimap mIoU: " + ", ".join(f"{w} px {_pct(v).strip()}" for w, v in res["trimap"].items()))
        for entry in res.get("per_image", []):
            present = ", ".join(f"{n} {_pct(v).strip()}" for n, v in entry["per_class_iou"].items() if v is not None)
            print(f"  {os.path.basename(entry['image'])}: mIoU {_pct(entry['miou']).strip()} ({present})")
    if args.plots:
        print(f"wrote {len(written)} plots to {args.plots}: {', '.join(p.name for p in written)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_files

    model, _ = _load_for_inference(args.checkpoint, args)
    if next(model.parameters(), None) is not None:
        model = model.to(_device(args.device))
    report = predict_files(
        model, args.inputs, out_dir=args.out, overlay_alpha=args.alpha if args.overlay else None, save_probs=args.probs,
        progress=not args.quiet, options=_inference_options(args),
    )
    for _name, message in report.failed:
        print(f"deeplab predict: {message}", file=sys.stderr)
    files = sum(len(v) for v in report.written.values())
    print(f"wrote {files} files for {len(report.written)} inputs to {args.out} (runtime {report.runtime})")
    if report.failed:
        total = len(report.written) + len(report.failed)
        print(f"deeplab predict: {len(report.failed)} of {total} inputs failed", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportCheckError, export_model

    from .checkpoint import model_from_checkpoint, read_checkpoint

    data = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(data, source=str(args.checkpoint)).eval()
    extra = {"train_config": data["train_config"]} if data.get("train_config") else None
    try:
        res = export_model(model, args.out, format=args.format, sizes=args.check_sizes, rtol=args.rtol,
                           opset=args.opset, dynamo=args.dynamo, metadata=extra,
                           output_layout="NHWC" if args.nhwc_logits else "NCHW", input_size=args.input_size)
    except ExportCheckError as e:
        print(f"deeplab export: FAILED: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in res["max_rel_diff"].items())
    rounded = " without activation rounding (every rounding is in the file)" if model.activation_rounding else ""
    print(f"{args.checkpoint} -> {res['path']} ({args.format}, {res['seconds']:.1f} s); "
          f"max |exported - eager|{rounded} / logit range {diffs} (allowed {args.rtol:g})")
    return 0


def _spread(count: int, total: int, offset: float = 0.0) -> list[int]:
    """`count` indices spread evenly over range(total) (shifted by `offset` of a step)."""
    count = min(count, total)
    step = total / max(count, 1)
    return sorted({min(total - 1, int((i + offset) * step)) for i in range(count)})


def _calibration_and_check(count: int, calibration: int, check: int) -> tuple[list[int], list[int]]:
    """Indices of `calibration` images spread over `count`, and of up to `check` others spread over the rest, for
    the int8-vs-float agreement on images the calibration did not see (none when it used them all)."""
    chosen = _spread(calibration, count)
    taken = set(chosen)
    rest = [i for i in range(count) if i not in taken]
    return chosen, [rest[j] for j in _spread(check, len(rest), offset=0.5)] if rest else []


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import model_from_checkpoint, read_checkpoint
    from .evaluate import build_eval_dataset
    from .inference import _resize, scaled_size
    from .predict import resolve_input_size
    from .quantize import quantize_model

    data = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(data, source=str(args.checkpoint)).eval()
    trained = data.get("train_config") or {}
    scales = args.scales or tuple(trained.get("val_scales") or (1.0,))
    size = resolve_input_size(model, "model")
    align = bool(model.config.align_corners)

    def scaled(x):
        x = x if size is None else _resize(x, size, align_corners=align)
        base = tuple(x.shape[-2:])
        return [x if s == 1.0 else _resize(x, scaled_size(base, s, align_corners=align), align_corners=align)
                for s in scales]

    if args.images:  # any image files: no masks needed to calibrate
        from .predict import _normalised, expand_inputs, load_image

        files = [path for path, _ in expand_inputs(args.images)[0]]
        if not files:
            raise ValueError(f"--images {' '.join(args.images)}: no image files found")
        name, split, count = "image", ",".join(args.images), len(files)
        load = lambda i: _normalised(model, load_image(files[i]))  # noqa: E731
    else:
        name, root, split, seed, options = _eval_data(args, trained)
        if args.split is None and split != "all":  # calibrate on training images, not on the ones scored later
            split = trained.get("train_split", "train")
        dataset = build_eval_dataset(model, name, root=root, split=split, seed=seed, **options)
        count = len(dataset)
        load = lambda i: dataset[i][0][None]  # noqa: E731
    chosen, others = _calibration_and_check(count, args.calibration_images, args.check_images)
    calibration = [x for i in chosen for x in scaled(load(i))]
    held = [x for i in others for x in scaled(load(i))]
    extra = {"train_config": data["train_config"]} if data.get("train_config") else {}
    extra["calibration"] = {"dataset": name, "split": split, "images": len(calibration), "scales": list(scales)}
    res = quantize_model(model, calibration, args.out, held_out=held, metadata=extra)
    agreement = "" if res["agreement"] is None else (
        f"; argmax agreement with the float model on {len(held)} other {split} images: {100 * res['agreement']:.2f}%")
    print(f"{args.checkpoint} -> {res['path']} (int8, {res['quantized_convs']} convolutions, calibrated on "
          f"{len(calibration)} {name} {split} images at scale {','.join(f'{v:g}' for v in scales)}, "
          f"{res['seconds']:.0f} s){agreement}. In float: the image-pooling branch, the classifier's output and the last "
          f"upsampling. Score it: deeplab eval --checkpoint {res['path']}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import benchmark, format_table

    rows = benchmark(args.checkpoint, runtimes=args.runtimes, threads=args.threads_list, size=args.size,
                     runs=args.runs, progress=not args.quiet)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


def _add_quantize_benchmark(sub) -> None:
    p = sub.add_parser("quantize", help="int8 post-training quantization (ONNX Runtime), calibrated on a dataset's images")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint (float)")
    p.add_argument("--out", required=True, help="the int8 ONNX file to write (.onnx); run it with predict / eval "
                   "--checkpoint FILE")
    p.add_argument("--images", nargs="+", default=None, help="calibrate on these image files, folders or globs "
                   "(no masks needed) instead of a dataset")
    p.add_argument("--dataset", default=None, help="calibration images: voc, cityscapes, ade20k, camvid, folder (default: "
                   "the checkpoint's training data)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's training data)")
    p.add_argument("--split", default=None, help="split to calibrate on (default: the training split)")
    _add_folder_flags(p, "as for deeplab eval")
    p.add_argument("--calibration-images", type=_number(int, 1, "a positive number of images"), default=64,
                   help="images to measure activation ranges on, spread over the split (default %(default)s)")
    p.add_argument("--check-images", type=_number(int, 0, "0 or more images"), default=8,
                   help="other images of the split to report int8-vs-float argmax agreement on (default %(default)s)")
    p.add_argument("--scales", type=_float_tuple, default=None,
                   help="image scales to calibrate at (default: the scales the checkpoint was validated at)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("benchmark", help="ms per image and images/s of a model on every installed runtime and thread count")
    p.add_argument("--checkpoint", required=True,
                   help="deeplab checkpoint, or an exported .onnx / OpenVINO .xml / .tflite file")
    p.add_argument("--size", type=_size_arg, default=None, help="input HxW (default: the model's input size, else 513x513)")
    p.add_argument("--runtimes", type=_str_tuple, default=("torch", "onnxruntime", "openvino", "tflite"),
                   help="comma-separated, from torch, eager, onnxruntime, openvino, tflite (default: all but eager)")
    p.add_argument("--threads", dest="threads_list", type=_int_tuple, default=None,
                   help="thread counts, e.g. 1,2 (default: 1 and PyTorch's default)")
    p.add_argument("--runs", type=_number(int, 1, "a positive number of runs"), default=10,
                   help="timed runs per runtime and thread count, interleaved in rounds (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_benchmark)


def _add_eval_predict_export(sub) -> None:
    p = sub.add_parser("eval", help="mIoU, per-class IoU, pixel accuracy, trimap of checkpoints on a dataset (torchrun-ready)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="deeplab checkpoint (or a .onnx / OpenVINO .xml file from `deeplab export` or `deeplab "
                   "quantize`); repeat to compare several (--json then prints {\"checkpoints\": [...]})")
    p.add_argument("--dataset", default=None,
                   help="voc, cityscapes, ade20k, camvid, folder, synthetic (default: the checkpoint's training data)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's training data)")
    p.add_argument("--split", default=None,
                   help="(default val: for the folder a checkpoint was trained on, the same held-out images; for "
                   "another folder without splits/val.txt, all)")
    p.add_argument("--limit", type=_number(int, 1, "a positive number of images"), default=None, help="evaluate the first N images only")
    p.add_argument("--skip-bad", action="store_true", help="warn about and skip unreadable samples")
    _add_folder_flags(p, "e.g. the VOC samples: --image-dir . --mask-dir . --image-suffix _image.png "
                      "--mask-suffix _target.png --palette voc; default: what the checkpoint was trained with")
    _add_inference_flags(p)
    p.add_argument("--eval-output-stride", type=int, default=None, choices=OUTPUT_STRIDES,
                   help="evaluate at this output stride (e.g. 8 for a model trained at 16)")
    p.add_argument("--trimap", type=_int_tuple, default=None, help="boundary band widths in px, e.g. 1,2,5,10,20,40")
    p.add_argument("--plots", default=None, help="write confusion matrix, per-class IoU and (with --trimap) trimap plots here")
    p.add_argument("--per-image", action="store_true", help="also report each image's scores")
    p.add_argument("--json", action="store_true", help="print one JSON object (miou, per_class_iou, pixel_accuracy, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files, folders or globs into index PNGs (+ overlays, probabilities)")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns; videos "
                   "(.mp4, .avi, .mov, .mkv, .webm) only with the optional imageio package (pip install 'imageio[pyav]'), "
                   "otherwise they are reported as failed")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint, or a .onnx / OpenVINO .xml file from "
                   "`deeplab export` or `deeplab quantize`")
    p.add_argument("--out", required=True, help="output folder: NAME.png index PNGs in the dataset's palette")
    p.add_argument("--overlay", action="store_true", help="also NAME_overlay.png, the image blended with the colours")
    p.add_argument("--alpha", type=_number(float, 0, "in [0, 1], e.g. 0.5", below=1, below_inclusive=True), default=0.5, help="overlay colour weight (default %(default)s)")
    p.add_argument("--probs", action="store_true", help="also NAME_probs.npy, class probabilities float16 (C, H, W)")
    _add_inference_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, OpenVINO, TorchScript, torch.export or TF Lite, "
                       "verified against eager")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint")
    p.add_argument("--format", required=True, choices=["onnx", "openvino", "torchscript", "pt2", "tflite"])
    p.add_argument("--out", required=True,
                   help="file to write (.onnx, OpenVINO .xml (+ .bin beside it), .pt, .pt2, .tflite)")
    p.add_argument("--input-size", type=_size_arg, default=None,
                   help="tflite: the file's fixed input size HxW (default: the checkpoint's input size, else 513x513)")
    p.add_argument("--dynamo", action="store_true", help="ONNX: the torch.export-based exporter (slower) instead of the legacy one")
    p.add_argument("--opset", type=_number(int, 17, "17 or newer"), default=17, help="ONNX opset, 17 or newer (default %(default)s)")
    p.add_argument("--nhwc-logits", action="store_true",
                   help="ONNX: logits (N, H, W, classes), upsampled NHWC: faster in ONNX Runtime (metadata output_layout)")
    p.add_argument("--check-sizes", type=_sizes_arg, default=((257, 257), (193, 321)),
                   help="input sizes to compare against eager (default 257x257,193x321)")
    p.add_argument(
        "--rtol", type=_number(float, 0, "positive, e.g. 1e-4", strict=True), default=1e-4,
        help="largest allowed |exported - eager| as a fraction of the eager logits' range (default %(default)s)",
    )
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLabv3 / DeepLabv3+ semantic segmentation")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also DEEPLAB_DEBUG=1), e.g. deeplab --debug train ...")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="parameters and multiply-adds of a configuration (no weights needed)")
    _add_model_flags(p)
    p.add_argument("--size", type=_number(int, 17, "at least 17 pixels, e.g. 513"), default=513, help="square input size (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--paper", action="store_true", help="the DeepLabv3+ paper's table beside our counts")
    p.add_argument("--layers", action="store_true", help="per-layer breakdown")
    p.set_defaults(func=cmd_profile)

    from .train import TrainConfig

    p = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic default, ~3 min on 2 CPU cores)")
    add_dataclass_flags(p, ModelConfig, helps=TRAIN_HELP)
    add_dataclass_flags(p, TrainConfig, helps=TRAIN_HELP)
    p.add_argument("--out", default=None, help="output folder (default runs/DATASET-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="report a dataset before training: images, classes, pixel shares, sizes, and "
                       "warnings that name the flag to fix (exit status 1 when the masks look read wrong)")
    p.add_argument("--dataset", required=True, help="voc, cityscapes, ade20k, camvid, folder, synthetic")
    p.add_argument("--data-root", default=None, help="dataset folder")
    p.add_argument("--splits", type=_str_tuple, default=("train", "val"), help="splits to report (default train,val)")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out split of a folder, as in training (default 0)")
    p.add_argument("--max-masks", type=_number(int, 0, "0 (all) or a positive number"), default=1000,
                   help="read at most N masks per split, evenly spaced (0: all; default %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="count unreadable samples instead of stopping")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_folder_flags(p, "the same flags as deeplab train")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("convert", help="import a TFLite model or torchvision/timm weights as a deeplab checkpoint")
    p.add_argument("src", help="official TF DeepLab .tflite, torchvision deeplabv3 .pth, or an ImageNet backbone .pth")
    p.add_argument("out", help="the deeplab checkpoint to write (.pt)")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="for ImageNet backbone files: which backbone")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the new head (backbone files)")
    p.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES, help="(backbone files)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True, help="(backbone files)")
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
    p.set_defaults(func=cmd_convert)

    _add_eval_predict_export(sub)
    _add_quantize_benchmark(sub)
    return parser


# Exit status of each kind of failure (1: the command ran but failed, e.g. a diverged run; 70: a bug, BSD's
# EX_SOFTWARE).
EXIT_INPUT, EXIT_FILES, EXIT_MEMORY, EXIT_INTERRUPTED, EXIT_BUG = 2, 3, 4, 130, 70

# What allocators say when an allocation fails (PyTorch's CPU and CUDA allocators, oneDNN, the C++ runtime, numpy,
# ONNX Runtime, OpenVINO): any of these is the out-of-memory line, whatever the exception's type.
_ALLOCATION_WORDS = ("out of memory", "not enough memory", "cannot allocate memory", "bad_alloc",
                     "failed to allocate", "unable to allocate", "allocation failed", "could not allocate")
# What PyTorch says when the device named by --device cannot be used: only these are blamed on the flag.
_DEVICE_WORDS = ("torch not compiled with cuda", "no cuda gpus are available", "invalid device ordinal",
                 "found no nvidia driver", "cuda driver version is insufficient", "cuda unavailable",
                 "expected one of cpu, cuda", "invalid device string", "no mps device")


def _original(e: BaseException) -> tuple[str, str]:
    """(type name, first message line) of `e`, seen through PyTorch's DataLoader worker wrapper, which re-raises a
    worker's exception as 'Caught X in DataLoader worker process N.' with the worker's traceback as its message."""
    text = str(e)
    first = (text.splitlines() or [""])[0]
    if first.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return name.rsplit(".", 1)[-1], message
    return type(e).__name__, first


def _raised_by_deeplab(e: BaseException) -> bool:
    """Whether `e` comes from a `raise` statement in deeplab's own code (a refusal written for the user, with the
    fix in its message) rather than from a library call or a mistake in the code (a bug)."""
    import linecache
    from pathlib import Path

    if type(e).__module__.startswith("deeplab"):
        return True
    if str(e).startswith("Caught ") and "Original Traceback" in str(e):
        return "/deeplab/" in str(e).rsplit('File "', 1)[-1].split('"', 1)[0].replace("\\", "/")
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:  # never raised: made to be shown
        return True
    path = Path(tb.tb_frame.f_code.co_filename)
    package = Path(__file__).resolve().parent.parent
    inside = package in path.resolve().parents
    return inside and linecache.getline(str(path), tb.tb_lineno).strip().startswith("raise")


def failure_line(e: BaseException) -> tuple[int, str]:
    """(exit status, one line naming what failed and the fix), for every exception: an expected failure names the
    file or flag; anything else says it is a bug and how to see its traceback."""
    import errno

    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    name, first = _original(e)
    lowered = str(e).lower()
    if isinstance(e, MemoryError) or any(w in lowered for w in _ALLOCATION_WORDS):
        cuda = "cuda" in lowered or "gpu" in lowered
        return EXIT_MEMORY, (f"out of {'GPU ' if cuda else ''}memory: {_asked(str(e))}; lower --batch-size or "
                             "--crop-size (training), or predict large images with --window 513")
    if isinstance(e, (RuntimeError, AssertionError)) and any(w in lowered for w in _DEVICE_WORDS):
        return EXIT_INPUT, f"error: --device: {first}; pick a device this machine has (--device cpu)"
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                      IsADirectoryError)) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        if e.errno == errno.ENOSPC:
            return EXIT_FILES, f"error: {where}no space left on the device; free some or write elsewhere (--out)"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return EXIT_FILES, f"error: {where}permission denied; write elsewhere (--out) or fix the permissions"
        return EXIT_FILES, f"error: {where}{e.strerror or e}"
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ImportError)):
        return EXIT_INPUT, f"error: {e}"
    if isinstance(e, OSError):  # e.g. PIL's UnidentifiedImageError: the message names the file
        return EXIT_FILES, f"error: {first}"
    if isinstance(e, ValueError) and _raised_by_deeplab(e):
        return EXIT_INPUT, f"error: {first if name != type(e).__name__ else e}"
    return EXIT_BUG, (f"bug: {name}: {first[:300]} -- this is a bug in deeplab, not in your input; please report it "
                      "with the traceback that --debug shows (deeplab --debug COMMAND ...)")


def _asked(message: str) -> str:
    """The size an allocator asked for, as its message states it ('Tried to allocate 2.00 GiB', 'you tried to
    allocate 9663676416 bytes'), or its first line."""
    import re

    found = re.search(r"(?i)tried to allocate ([0-9]+ bytes|[0-9.]+ ?[KMGT]?i?B)", message)
    if found:
        size = found.group(1)
        if size.endswith(" bytes"):
            size = f"{int(size.split()[0]) / 2**30:.2f} GiB"
        return f"an allocation of {size} failed"
    return (message.splitlines() or [""])[0][:160]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Every failure ends in one line on stderr and an exit status (2: the input or a flag,
    3: files or disk, 4: memory, 130: interrupted, 70: a bug); with --debug or DEEPLAB_DEBUG=1 it raises with the
    traceback."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DEEPLAB_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        code, line = failure_line(e)
        print(f"deeplab {args.command}: {line}", file=sys.stderr)
        return code


def run() -> int:
    """The `deeplab` command (console script and ``python -m deeplab``): `main` in a process of its own, so it
    first keeps freed memory for reuse (`deeplab.fast.retain_freed_memory`; tests call `main` directly)."""
    from .fast import retain_freed_memory

    retain_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
