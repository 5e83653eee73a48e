"""The training configuration: `TrainConfig` (the papers' protocol as defaults, every numeric field range-checked),
the built-in synthetic preset, and the dataset options `deeplab train`, `eval` and `data` share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..models.config import ModelConfig, check_ranges


def dataset_options(items: tuple[str, ...]) -> dict[str, Any]:
    """("image_size=64", "mask_suffix=_target.png") -> {"image_size": 64, "mask_suffix": "_target.png"}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"dataset option {item!r} is not of the form name=value (e.g. image_size=64)")
        value: Any = text
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                pass
        if text in ("true", "false", "True", "False"):
            value = text.lower() == "true"
        out[name.strip().replace("-", "_")] = value
    return out


# The valid range of each numeric TrainConfig field (None always passes), checked wherever a config is made: the
# flag's value is refused where it is parsed, naming the flag, not steps later.
RANGES = {
    "steps": (lambda v: v >= 1, "a positive number of steps"),
    "batch_size": (lambda v: v >= 1, "a positive number of images"),
    "crop_size": (lambda v: v >= 17, "at least 17 pixels (the papers use 513)"),
    "min_scale": (lambda v: v > 0, "positive (e.g. 0.5)"),
    "max_scale": (lambda v: v > 0, "positive (e.g. 2.0)"),
    "scale_step": (lambda v: v >= 0, "0 (continuous scales) or positive (e.g. 0.25)"),
    "lr": (lambda v: v >= 0 and math.isfinite(v), "0 or positive (e.g. 0.007)"),
    "lr_power": (lambda v: v >= 0, "0 or positive (e.g. 0.9)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.9)"),
    "weight_decay": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 4e-5)"),
    "ignore_index": (lambda v: 0 <= v <= 255, "a mask value 0..255 (e.g. 255)"),
    "hard_pixel_fraction": (lambda v: 0 < v <= 1, "in (0, 1] (e.g. 0.25)"),
    "val_every": (lambda v: v >= 0, "0 (only at the end) or a positive number of steps"),
    "val_limit": (lambda v: v >= 1, "a positive number of images"),
    "checkpoint_every": (lambda v: v >= 1, "a positive number of steps"),
    "seed": (lambda v: v >= 0, "0 or positive"),
    "workers": (lambda v: v >= 0, "0 (load in the main process) or positive"),
    "val_images": (lambda v: v >= 0, "0 or positive"),
    "precise_bn_images": (lambda v: v >= 0, "0 (off) or a positive number of images"),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1 (e.g. 0.2)"),
    "class_weights": (lambda v: v == "auto" or (not isinstance(v, str) and all(math.isfinite(w) and w >= 0 for w in v)
                                                 and any(v)),
                      "weights >= 0 and finite, not all 0 (e.g. 1.5,0.8), or auto"),
    "val_scales": (lambda v: len(v) > 0 and all(x > 0 for x in v), "positive scales (e.g. 1.0 or 0.75,1.0,1.25)"),
    "bands": (lambda v: v >= 1, "a positive number of bands (3 for RGB)"),
    "focal_gamma": (lambda v: v >= 0, "0 (cross-entropy) or positive (e.g. 2)"),
}


AMP_CHOICES = ("auto", "off", "bf16", "fp16")


# The pixel losses `--loss` chooses from (deeplab.training.losses).
LOSSES = ("ce", "focal", "dice", "ce+dice", "lovasz")

# TrainConfig fields that only the folder dataset reads; `deeplab eval` and `deeplab data` take the same flags.
FOLDER_OPTIONS = ("image_dir", "mask_dir", "image_suffix", "mask_suffix", "palette", "mask_mode", "classes",
                  "label_map", "val_fraction")
# The folder options other datasets read too.
DATASET_OPTIONS = {"folder": FOLDER_OPTIONS, "classified-tiles": ("val_fraction",)}


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol; defaults are the DeepLabv3/v3+ papers' (TF DeepLab's train.py flags)."""

    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_options: tuple[str, ...] = ()  # extra dataset arguments as "name=value", e.g. image_size=64
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 513
    min_scale: float = 0.5
    max_scale: float = 2.0
    scale_step: float = 0.25  # TF draws scales in steps of 0.25; 0 draws them continuously
    flip: bool = True
    batch_size: int = 16  # global: split across processes under torchrun
    steps: int = 30_000
    lr: float = 0.007
    lr_power: float = 0.9  # poly: lr * (1 - step / steps) ** power
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 1e-4 for ResNet, 4e-5 for Xception and MobileNetV2 (TF's scopes)
    # (5e-4 for VGG, DeepLab v1/v2's; 1e-4 for DenseNet)
    ignore_index: int = 255
    class_weights: tuple[float, ...] | str | None = None  # per class, or "auto": from the data report's pixel shares
    loss: str = "ce"  # one of LOSSES
    focal_gamma: float = 2.0  # the focal loss's gamma (Lin et al.'s best, 2)
    hard_pixel_fraction: float = 1.0  # < 1: average the loss over only this fraction of hardest pixels
    msc: bool = False  # DeepLab v2's multi-scale training: inputs at scales 1, 0.75, 0.5, max-fused, four losses
    freeze_bn: bool = False  # BN in inference mode and not trained (fine-tuning at output stride 8)
    # Mixed precision: "auto" is bf16 autocast on a CUDA GPU with bf16 (fp16 with a gradient scaler on one without)
    # and on a CPU as `training.loop.cpu_amp` says (bf16 with AMX, or AVX512_BF16 for dense backbones, else off);
    # "off", "bf16" (CPU or CUDA) or "fp16" (CUDA) force it. Resolved when the run starts.
    amp: str = "auto"
    channels_last: bool = True  # NHWC memory: faster with oneDNN and cuDNN alike (docs/performance.md)
    compile: bool = False  # torch.compile the model for training
    # Recompute the backbone's early stages in the backward pass instead of keeping their activations (ResNet: stem,
    # layer1, layer2): less peak memory for a little more work, the same gradients (docs/performance.md).
    recompute: bool = True
    val_every: int = 0  # steps between validations; 0: only at the end
    val_limit: int | None = None  # validate on the first N validation images only (quick checks)
    val_scales: tuple[float, ...] = (1.0,)  # validation inference scales (softmax averaged, as deeplab eval --scales)
    val_flip: bool = False  # validation also averages the mirrored image (deeplab eval --flip)
    checkpoint_every: int = 500
    eval_output_stride: int | None = None  # validate at another output stride (the paper trains at 16, tests at 8)
    seed: int = 0
    workers: int | None = None  # data-loading processes; None: 0 on CPU, up to 8 per GPU process on CUDA
    skip_bad: bool = False
    backbone_weights: str | None = None  # ImageNet weights for the backbone (torchvision / timm files)
    init_checkpoint: str | None = None  # start from a deeplab checkpoint (e.g. a converted TF model)
    device: str = "auto"
    val_images: int = 4  # validation images drawn in DIR/predictions.png
    # BatchNorm statistics re-measured with the current weights on this many training images before every
    # validation and the final checkpoint (deeplab.training.precise_bn); 0: off. Skipped with freeze_bn.
    precise_bn_images: int = 128
    ignore_data_warnings: bool = False  # train although the data report says the masks look read wrong
    # The folder dataset (--dataset folder); None: the dataset's default.
    image_dir: str | None = None  # images folder under data_root (default images)
    mask_dir: str | None = None  # masks folder under data_root (default masks)
    image_suffix: str | None = None  # image file name ending when images and masks share a folder, e.g. _image.png
    mask_suffix: str | None = None  # mask file name ending (default .png)
    palette: str | None = None  # colour masks: voc, cityscapes, ade20k, camvid, or a file of 'R G B' lines
    mask_mode: str | None = None  # auto (by the PNG's mode), index or color
    classes: tuple[str, ...] | None = None  # class names (default classes.txt, or the palette's)
    label_map: str | None = None  # stored mask value -> class, e.g. "0:0,255:1"; a class may be "ignore"
    val_fraction: float | None = None  # held-out fraction when there is no splits/val.txt (default 0.2)
    bands: int | None = None  # input bands; None: the data's (3 for photos, NumBands of an ArcGIS export)
    rgb_bands: tuple[int, ...] | None = None  # positions of red, green, blue among the bands (RGB weights adapt)

    def __post_init__(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"--amp {self.amp}: choose auto, off, bf16 (CPU or CUDA) or fp16 (CUDA)")
        if isinstance(self.class_weights, str) and self.class_weights != "auto":
            raise ValueError(f"--class-weights {self.class_weights}: give one weight per class (e.g. 0.5,2) or auto")
        check_ranges(self, RANGES)
        if self.max_scale < self.min_scale:
            raise ValueError(f"--max-scale {self.max_scale} is below --min-scale {self.min_scale}")
        if self.eval_output_stride not in (None, 8, 16, 32):
            raise ValueError(f"--eval-output-stride {self.eval_output_stride}: choose 8, 16 or 32")
        if self.class_weights is not None and self.class_weights != "auto":
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        object.__setattr__(self, "dataset_options", tuple(str(o) for o in self.dataset_options))
        dataset_options(self.dataset_options)  # fail early on a malformed option
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "val_scales", tuple(float(v) for v in self.val_scales))
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        if self.hard_pixel_fraction < 1 and self.loss in ("dice", "lovasz"):
            raise ValueError(f"--hard-pixel-fraction mines the pixels of a per-pixel loss; --loss {self.loss} is not one "
                             "(use ce, focal or ce+dice)")
        if self.rgb_bands is not None:
            object.__setattr__(self, "rgb_bands", tuple(int(b) for b in self.rgb_bands))
            if len(self.rgb_bands) != 3 or len(set(self.rgb_bands)) != 3 or min(self.rgb_bands) < 0 or (
                    self.bands is not None and max(self.rgb_bands) >= self.bands):
                raise ValueError(f"--rgb-bands {','.join(map(str, self.rgb_bands))}: give the 0-based positions of the "
                                 "red, green and blue bands, three different numbers below --bands (e.g. 0,1,2)")
        accepted = DATASET_OPTIONS.get(self.dataset, ())
        given = [name for name in FOLDER_OPTIONS if getattr(self, name) is not None and name not in accepted]
        if given:
            readers = sorted(d for d, names in DATASET_OPTIONS.items() if set(given) <= set(names))
            raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in given)} apply to --dataset "
                             f"{' and '.join(readers)} only, not --dataset {self.dataset}")
        if self.label_map is not None:
            from ..data import parse_label_map

            parse_label_map(self.label_map)  # fail before any file is read

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("class_weights", "classes", "val_scales", "rgb_bands"):
            if d[name] is not None and not isinstance(d[name], str):
                d[name] = list(d[name])
        d["dataset_options"] = list(d["dataset_options"])
        return d

    def dataset_kwargs(self) -> dict[str, Any]:
        """What the dataset's constructor gets besides root, split, transform, seed and skip_bad."""
        accepted = DATASET_OPTIONS.get(self.dataset, ())
        folder = {name: getattr(self, name) for name in accepted if getattr(self, name) is not None}
        return {**folder, **dataset_options(self.dataset_options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def train_config_of(data: dict[str, Any], *, source: str) -> TrainConfig:
    """The TrainConfig a checkpoint records (its `train_config`), refused in one line naming the file when the
    record is not a valid one."""
    from ..models.checkpoint import CheckpointError

    try:
        return TrainConfig.from_dict(data.get("train_config") or {})
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: its train_config is not valid ({(str(e).splitlines() or [''])[0]}); the "
                              "file was edited or not written by deeplab") from None


# The built-in default: `deeplab train` with no arguments trains on the synthetic shapes on 2 CPU cores in under
# three minutes. It departs from the paper where a three-minute run must: a MobileNetV2 at depth multiplier 0.5 with
# separable ASPP and decoder of 128 channels, whole 64x64 images (no rescaling, only flips: the images are already
# small and the shapes fill them), a higher learning rate (0.1) for the few steps there are, PyTorch's BN momentum
# 0.1 (TF's 0.9997 decay needs thousands of steps before its running statistics are usable), channels_last (about a
# third faster per step here), and class weights: the square root of median-frequency balancing (Eigen & Fergus),
# sqrt(median(f) / f_c) over the training split's pixel frequencies f (background 68%, each shape 7-9%), the same
# rule as the CamVid recipe in docs/camvid.md. Without them the background dominates the loss and the shape classes
# learn slowly: 0.669 against 0.765 validation mIoU after the 900 steps (one thread each).
SYNTHETIC_CLASS_WEIGHTS = (0.338, 0.919, 1.0, 1.002, 1.064)


SYNTHETIC_MODEL = ModelConfig(
    backbone="mobilenet_v2",
    num_classes=5,
    output_stride=16,
    decoder=True,
    separable=True,
    aspp_channels=128,
    decoder_channels=128,
    depth_multiplier=0.5,
    bn_momentum=0.1,
)


SYNTHETIC_TRAIN = TrainConfig(
    dataset="synthetic", crop_size=64, min_scale=1.0, max_scale=1.0, scale_step=0.0, batch_size=16, steps=900,
    lr=0.1, weight_decay=None, class_weights=SYNTHETIC_CLASS_WEIGHTS, channels_last=True, val_every=450,
    checkpoint_every=300,
)


def default_weight_decay(backbone: str) -> float:
    """The weight decay each network was trained with: TF DeepLab's 1e-4 for ResNet and 4e-5 for Xception and the
    MobileNets, DeepLab v1/v2's 5e-4 for VGG, DenseNet's own 1e-4."""
    if backbone.startswith("vgg"):
        return 5e-4  # DeepLab v1/v2's Caffe solvers (and VGG's own ImageNet training)
    if backbone.startswith("densenet"):
        return 1e-4  # DenseNet's ImageNet training, as for ResNet
    return 1e-4 if backbone.startswith("resnet") else 4e-5


def presets(dataset: str, backbone: str | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configurations `deeplab train` starts from before its flags: the synthetic preset for the synthetic
    dataset, the papers' protocol (ModelConfig(), TrainConfig()) otherwise.

    The synthetic preset's model is a MobileNetV2 at depth multiplier 0.5. With another `backbone` (a flag the user
    gave), the values that belong to that MobileNetV2 follow the backbone instead: the depth multiplier returns to
    1.0 (only MobileNetV2 and MobileNet-EdgeTPU take one), and weight decay is the backbone's own (it already is:
    the preset leaves it to `default_weight_decay`).
    """
    if dataset != "synthetic":
        return ModelConfig() if backbone is None else ModelConfig(backbone=backbone), TrainConfig(dataset=dataset)
    model = SYNTHETIC_MODEL
    if backbone is not None and backbone != model.backbone:
        model = model.replace(backbone=backbone, depth_multiplier=ModelConfig().depth_multiplier)
    return model, SYNTHETIC_TRAIN
