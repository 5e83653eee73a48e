"""Datasets, palettes and the paired image/mask transforms of the DeepLab training protocol."""

from ..models.config import IMAGENET_MEAN, IMAGENET_STD, TF_MEAN, TF_STD
from .base import DatasetError, SegmentationDataset
from .datasets import (
    ADE20K,
    DATASETS,
    CamVid,
    Cityscapes,
    FolderDataset,
    VOCSegmentation,
    build_dataset,
    format_label_map,
    held_out_stems,
    parse_label_map,
)
from .palettes import (
    ADE20K_CLASSES,
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    PALETTES,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    Palette,
    colorize,
    colors_to_index,
    voc_colormap,
)
from .synthetic import SyntheticShapes, render_shapes
from .transforms import (
    EvalTransform,
    TrainTransform,
    eval_transform,
    normalize,
    random_scale,
    train_transform,
)

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PALETTES",
    "SYNTHETIC_CLASSES",
    "TF_MEAN",
    "TF_STD",
    "VOC_CLASSES",
    "CamVid",
    "Cityscapes",
    "DatasetError",
    "EvalTransform",
    "FolderDataset",
    "Palette",
    "SegmentationDataset",
    "SyntheticShapes",
    "TrainTransform",
    "VOCSegmentation",
    "build_dataset",
    "colorize",
    "colors_to_index",
    "eval_transform",
    "format_label_map",
    "held_out_stems",
    "parse_label_map",
    "normalize",
    "random_scale",
    "render_shapes",
    "train_transform",
    "voc_colormap",
]
