"""`deeplab eval`: mIoU, per-class IoU, pixel accuracy and the trimap metric of checkpoints on a dataset."""

from __future__ import annotations

import argparse
import json
import sys

from ..models.config import OUTPUT_STRIDES
from .flags import (
    add_folder_flags,
    add_inference_flags,
    add_raster_flags,
    flagged_folder_options,
    inference_options,
    int_tuple,
    load_for_inference,
    number,
    raster_note,
    raster_tiling,
    resolve_device,
)


def _pct(v: float | None) -> str:
    return "     -" if v is None else f"{100 * v:6.2f}"


def eval_data(args: argparse.Namespace, trained: dict | None, *, source: str):
    """(dataset, root, split, seed, dataset keyword arguments) for `deeplab eval`: the flags, with the training
    data recorded in the checkpoint (`trained`, a TrainConfig dict) as the default for every flag not given."""
    from dataclasses import replace
    from pathlib import Path

    from ..training.config import TrainConfig, train_config_of

    cfg = train_config_of({"train_config": trained}, source=source) if trained else None
    name = args.dataset or (cfg.dataset if cfg else None)
    if name is None:
        raise ValueError("--dataset: this checkpoint records no training data (converted or older); pass --dataset "
                         "and --data-root")
    same = cfg is not None and cfg.dataset == name
    root = args.data_root or (cfg.data_root if same else None)
    flagged = flagged_folder_options(args)
    # The training run's dataset options (label map, folders, classes, held-out fraction and seed) as defaults.
    base = replace(cfg, data_root=root) if same else TrainConfig(dataset=name, data_root=root)
    base = replace(base, **flagged)
    trained_here = same and root is not None and cfg.data_root is not None and Path(root).resolve() == Path(cfg.data_root).resolve()
    split = args.split
    if split is None and trained_here:
        split = cfg.val_split
    elif split is None:
        no_list = (name == "folder" and not (root and (Path(root) / "splits" / "val.txt").is_file())
                   or name == "classified-tiles")  # an export the checkpoint was not trained on: all of its chips
        split = "all" if no_list else "val"
    return name, root, split, base.seed, base.dataset_kwargs()


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..inference.evaluate import (
        build_eval_dataset,
        checkpoint_labels,
        evaluate,
        write_plots,
    )
    from ..training.distributed import init_distributed

    if args.plots:  # before the evaluation, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plots needs matplotlib: pip install 'deeplab[plots]' (or drop --plots)") from None
    device = resolve_device(args.device)
    dist_info = init_distributed(device_type=device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    if (args.raster is None) != (args.labels is None):
        raise ValueError("--raster IMAGE and --labels LABELS go together: the image raster and its label raster")
    results = {}
    for label, path in zip(checkpoint_labels(args.checkpoint), args.checkpoint):
        model, data = load_for_inference(path, args)
        trained = data.get("train_config") or {}
        inference = inference_options(args, scales=tuple(trained.get("val_scales") or (1.0,)),
                                       flip=bool(trained.get("val_flip", False)))
        if args.raster is not None:
            results[label] = _raster_result(model, path, args, inference, device, dist_info)
            continue
        name, root, split, seed, options = eval_data(args, data.get("train_config"), source=str(path))
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
        extras += [f"runtime {s.get('runtime_line', s['runtime'])}, {s['threads']} threads"]
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


def _raster_result(model, path, args: argparse.Namespace, inference, device, dist_info) -> dict:
    """`deeplab eval --raster IMAGE --labels LABELS`: one raster of any size against its label raster; under torchrun
    each process predicts a band of rows and the confusion matrices are summed."""
    from ..inference.raster import evaluate_raster

    if args.eval_output_stride is not None and args.eval_output_stride != model.config.output_stride:
        if not hasattr(model, "with_output_stride"):
            raise ValueError("--eval-output-stride needs a deeplab checkpoint (.pt): an exported graph has its strides")
        model = model.with_output_stride(args.eval_output_stride)
    if next(model.parameters(), None) is not None:
        model = model.to(device)
    note = raster_note(args, model)
    if note and dist_info.is_main:
        print(f"deeplab eval: {note}", file=sys.stderr)
    res = evaluate_raster(model, args.raster, args.labels, tiling=raster_tiling(args, model), options=inference,
                          scale=args.scale, resolution=args.resolution,
                          progress=not args.quiet and not args.json and dist_info.is_main,
                          rank=dist_info.rank, world_size=dist_info.world_size)
    return {"checkpoint": str(path), "dataset": "raster", "split": args.labels, "images": args.raster, **res}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="mIoU, per-class IoU, pixel accuracy, trimap of checkpoints on a dataset (torchrun-ready)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="deeplab checkpoint, .pt, model folder or Hub repo id owner/name (or a .onnx / OpenVINO .xml "
                   "file from `deeplab export` or `deeplab quantize`); repeat to compare several (--json then prints "
                   "{\"checkpoints\": [...]})")
    p.add_argument("--dataset", default=None,
                   help="voc, cityscapes, ade20k, camvid, folder, classified-tiles, synthetic (default: the "
                   "checkpoint's training data)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's training data)")
    p.add_argument("--split", default=None,
                   help="the split to evaluate (default val: for the folder a checkpoint was trained on, the same held-out images; for "
                   "another folder without splits/val.txt, all)")
    p.add_argument("--limit", type=number(int, 1, "a positive number of images"), default=None, help="evaluate the first N images only")
    p.add_argument("--raster", default=None, help="instead of a dataset: an image raster of any size (GeoTIFF), "
                   "predicted tile by tile as deeplab predict does, scored against --labels (under torchrun each "
                   "process takes a band of rows)")
    p.add_argument("--labels", default=None, help="with --raster: the label raster on the same grid (class Values "
                   "for a model trained on an ArcGIS export, 0 = NoData; else class indices, 255 ignored)")
    p.add_argument("--skip-bad", action="store_true", help="warn about and skip unreadable samples")
    add_folder_flags(p, "e.g. the VOC samples: --image-dir . --mask-dir . --image-suffix _image.png "
                      "--mask-suffix _target.png --palette voc; default: what the checkpoint was trained with")
    add_inference_flags(p)
    add_raster_flags(p)
    p.add_argument("--eval-output-stride", type=int, default=None, choices=OUTPUT_STRIDES,
                   help="evaluate at this output stride (e.g. 8 for a model trained at 16)")
    p.add_argument("--trimap", type=int_tuple, default=None, help="boundary band widths in px, e.g. 1,2,5,10,20,40")
    p.add_argument("--plots", default=None, help="write confusion matrix, per-class IoU and (with --trimap) trimap plots here")
    p.add_argument("--per-image", action="store_true", help="also report each image's scores")
    p.add_argument("--json", action="store_true", help="print one JSON object (miou, per_class_iou, pixel_accuracy, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
