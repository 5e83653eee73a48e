"""Evaluation over a dataset: mIoU and friends from one summed confusion matrix, multi-scale + flip, sliding window,
the trimap (boundary) metric, per-image scores, plots, and several processes under torchrun.

The numbers come from `deeplab.inference.metrics` (confusion matrix -> mIoU with classes absent from both ground truth and
prediction left out, the ignore label never counted; pixel accuracy; frequency-weighted IoU; trimap mIoU); the
inference from `deeplab.inference.segment` (softmax probabilities averaged over scales and flips, as TF DeepLab does).

Memory stays bounded: images are read, predicted and counted one at a time, and only K x K matrices are kept.
Under torchrun each process takes every world_size-th image and the matrices are summed with an all-reduce, so
every process ends with the same result (the caller lets rank 0 print and write).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import denormalize
from ..deploy.runtimes import describe_runtime, precision_name, prepare_model, runtime_name
from .crf import dense_crf
from .metrics import MetricAccumulator, confusion_matrix, segmentation_scores
from .options import InferenceOptions
from .predict import resolve_input_size
from .segment import segment_probs

__all__ = ["build_eval_dataset", "checkpoint_labels", "evaluate", "write_plots"]


def build_eval_dataset(
    model: nn.Module, name: str, *, root: str | os.PathLike | None, split: str, seed: int = 0, skip_bad: bool = False,
    **options: Any,
):
    """Dataset `name` (see `deeplab.data.DATASETS`) at native size, normalised with the model's mean and std.

    `options` go to the dataset (for the 'folder' dataset: image_dir, mask_dir, image_suffix, mask_suffix, palette,
    classes, label_map, val_fraction, ...; `seed` picks a held-out split as in training). A folder without
    classes.txt, --classes or a named palette takes the model's class names. Raises ValueError when the dataset's
    class count differs from the model's.
    """
    from ..data import EvalTransform, build_dataset

    pre = model.preprocessing
    if (name == "folder" and root is not None and "classes" not in options and "palette" not in options
            and not (Path(root) / "classes.txt").is_file()):
        options = {**options, "classes": tuple(model.class_names)}
    dataset = build_dataset(
        name, root=root, split=split, transform=EvalTransform(mean=pre.mean, std=pre.std), seed=seed,
        skip_bad=skip_bad, **options,
    )
    k = model.config.num_classes
    if dataset.num_classes != k:
        where = f" at {root}" if root else ""
        raise ValueError(
            f"dataset {name!r}{where} has {dataset.num_classes} classes but the model predicts {k}; "
            "evaluate a checkpoint trained for this dataset (or, for a folder dataset, fix classes.txt, --classes or "
            "--palette)"
        )
    theirs, ours = getattr(dataset, "class_values", None), getattr(model, "class_values", None)
    if theirs and ours and tuple(theirs) != tuple(ours):
        raise ValueError(
            f"{root}: its classes have the Values {list(theirs)} but the model was trained on Values {list(ours)} "
            f"({', '.join(model.class_names)}); evaluate it on an export of the same classes"
        )
    return dataset


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    options: InferenceOptions | None = None,
    output_stride: int | None = None,
    trimap_widths: Sequence[int] = (),
    per_image: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    limit: int | None = None,
    **inference: Any,
) -> dict[str, Any]:
    """Scores of `model` on `dataset` (yielding normalised (3, H, W) images and (H, W) labels at native size).

    How the model runs is `options` (a `deeplab.inference.options.InferenceOptions`: scales, flip, window, input size,
    runtime, threads, amp, CRF, PointRend), with any of its fields also accepted as keywords (`scales=(0.5, 1.0)`,
    `runtime="torch"`); `input_size="model"` uses the checkpoint's fixed input size (None: native size).
    `output_stride` re-dilates the model first (e.g. 8 for a model trained at 16). The model runs on
    `options.runtime` (`deeplab.deploy.runtimes`; "auto" picks the fastest on the first image). `crf` post-processes every
    image's probabilities with the dense CRF (`deeplab.inference.crf`), on the image's RGB recovered from the model's
    preprocessing. Returns a JSON-ready dict: `segmentation_scores` (miou, per_class_iou, per_class_accuracy,
    pixel_accuracy, mean_accuracy, fw_iou, num_pixels), `trimap` (width -> mIoU), `num_images`, `confusion_matrix`
    (K x K list, rows ground truth), `settings` (with the runtime that ran), and with `per_image` a `per_image` list
    of {image, miou, per_class_iou, pixel_accuracy} in dataset order. Under torch.distributed each process evaluates
    every world_size-th image and every process returns the summed result.
    """
    opts = InferenceOptions.of(options, **inference)
    device = torch.device(device)
    size = resolve_input_size(model, opts.input_size)
    if output_stride is not None and output_stride != model.config.output_stride:
        if not hasattr(model, "with_output_stride"):
            raise ValueError("--eval-output-stride needs a deeplab checkpoint (.pt): an exported graph has its strides")
        model = model.with_output_stride(output_stride)
    original, was_training = model, model.training
    model.eval()
    if next(model.parameters(), None) is not None:
        model.to(device)
    model = prepare_model(model, opts)
    num_classes = model.config.num_classes
    ignore_index = getattr(dataset, "ignore_index", 255)
    acc = MetricAccumulator(num_classes=num_classes, ignore_index=ignore_index, trimap_widths=trimap_widths)
    rank, world_size = _dist()
    total = len(dataset) if limit is None else min(int(limit), len(dataset))
    files = getattr(dataset, "files", None) or []

    from tqdm import tqdm

    images: list[tuple[int, dict[str, Any]]] = []
    evaluated = 0
    indices = range(rank, total, world_size)
    try:
        for i in tqdm(indices, desc="eval", unit="image", disable=not (progress and rank == 0), dynamic_ncols=True):
            sample = dataset.item_or_none(i) if hasattr(dataset, "item_or_none") else dataset[i]
            if sample is None:  # a bad file skipped with skip_bad: not counted, not replaced by a neighbour
                continue
            image, mask = sample
            evaluated += 1
            probs = segment_probs(
                model, image[None].to(device), scales=opts.scales, flip=opts.flip, window=opts.window,
                overlap=opts.overlap, input_size=size, amp=opts.amp,
            )
            if opts.crf is not None:
                rgb = denormalize(image, model.preprocessing)
                probs = dense_crf(rgb, probs[0], params=opts.crf, backend=opts.crf_backend)[None]
            pred = probs.argmax(dim=1).cpu()  # (1, H, W)
            target = mask[None].cpu()
            acc.update(pred, target)
            if per_image:
                scores = segmentation_scores(
                    confusion_matrix(pred, target, num_classes=num_classes, ignore_index=ignore_index),
                    class_names=model.class_names,
                )
                name = str(files[i][0]) if i < len(files) else str(i)
                images.append((i, {"image": name, "miou": scores["miou"], "per_class_iou": scores["per_class_iou"],
                                   "pixel_accuracy": scores["pixel_accuracy"]}))
    finally:
        original.train(was_training)
    acc.all_reduce()
    result = acc.compute(class_names=model.class_names)
    result["num_images"] = sum(_gather([evaluated]))
    result["confusion_matrix"] = acc.confusion.tolist()
    result["settings"] = {
        **opts.settings(), "input_size": list(size) if size else None, "output_stride": model.config.output_stride,
        "runtime": runtime_name(model), "precision": precision_name(model), "runtime_line": describe_runtime(model),
        "threads": getattr(model, "threads", None) or torch.get_num_threads(),
    }
    if per_image:
        result["per_image"] = [entry for _, entry in sorted(_gather(images), key=lambda e: e[0])]
    return result


def checkpoint_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short, unique labels for checkpoints: the file stem, or parent/stem where stems clash, or the full path."""
    paths = [Path(p) for p in paths]
    for make in (lambda p: p.stem, lambda p: f"{p.parent.name}/{p.stem}", lambda p: str(p)):
        labels = [make(p) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def _file_label(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def write_plots(results: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots of `evaluate` results keyed by a label (e.g. `checkpoint_labels`); returns the paths written.

    One checkpoint: confusion_matrix.png, per_class_iou.png and, if trimap widths were evaluated, trimap.png. Several:
    confusion_matrix_LABEL.png and per_class_iou_LABEL.png for each, and one trimap.png with a line per checkpoint.
    Needs matplotlib (`pip install 'deeplab[plots]'`).
    """
    from .plots import plot_confusion_matrix, plot_per_class_iou, plot_trimap

    if not results:
        raise ValueError("no results to plot; evaluate at least one checkpoint")
    out = Path(out_dir)
    written = []
    single = len(results) == 1
    for label, res in results.items():
        suffix = "" if single else f"_{_file_label(label)}"
        names = list(res["per_class_iou"])
        conf = torch.tensor(res["confusion_matrix"], dtype=torch.int64)
        written.append(plot_confusion_matrix(conf, path=out / f"confusion_matrix{suffix}.png", class_names=names))
        written.append(plot_per_class_iou(res["per_class_iou"], path=out / f"per_class_iou{suffix}.png", miou=res["miou"]))
    curves = {label: res["trimap"] for label, res in results.items() if res.get("trimap")}
    if curves:
        written.append(plot_trimap(curves, path=out / "trimap.png"))
    return written
