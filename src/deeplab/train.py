"""Training with the DeepLab papers' protocol: random scale, crop, flip; cross-entropy ignoring 255; SGD with
momentum and a poly learning rate; periodic validation; atomic, exactly resumable checkpoints; DDP under torchrun.

Everything a step depends on is a function of (seed, step): the batch order (a permutation per epoch seeded by
(seed, epoch)), each sample's augmentation (seeded by (seed, epoch, index) inside the dataset), and the learning
rate (computed from the step, not accumulated). The checkpoint adds the model, the optimizer and torch's RNG state
(dropout), so a run killed at any moment and resumed from its last checkpoint repeats the uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_dict,
    load_state_dict_strict,
    named_os_error,
    read_checkpoint,
)
from .config import ModelConfig, Preprocessing
from .distributed import all_reduce_sum, convert_sync_batchnorm, init_distributed
from .inference import autocast
from .pointrend import point_loss
from .model import DeepLab, build_model


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
_RANGES = (
    ("steps", lambda v: v >= 1, "a positive number of steps"),
    ("batch_size", lambda v: v >= 1, "a positive number of images"),
    ("crop_size", lambda v: v >= 17, "at least 17 pixels (the papers use 513)"),
    ("min_scale", lambda v: v > 0, "positive (e.g. 0.5)"),
    ("max_scale", lambda v: v > 0, "positive (e.g. 2.0)"),
    ("scale_step", lambda v: v >= 0, "0 (continuous scales) or positive (e.g. 0.25)"),
    ("lr", lambda v: v >= 0 and math.isfinite(v), "0 or positive (e.g. 0.007)"),
    ("lr_power", lambda v: v >= 0, "0 or positive (e.g. 0.9)"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.9)"),
    ("weight_decay", lambda v: 0 <= v < 1, "in [0, 1) (e.g. 4e-5)"),
    ("ignore_index", lambda v: 0 <= v <= 255, "a mask value 0..255 (e.g. 255)"),
    ("hard_pixel_fraction", lambda v: 0 < v <= 1, "in (0, 1] (e.g. 0.25)"),
    ("val_every", lambda v: v >= 0, "0 (only at the end) or a positive number of steps"),
    ("val_limit", lambda v: v >= 1, "a positive number of images"),
    ("checkpoint_every", lambda v: v >= 1, "a positive number of steps"),
    ("seed", lambda v: v >= 0, "0 or positive"),
    ("workers", lambda v: v >= 0, "0 (load in the main process) or positive"),
    ("val_images", lambda v: v >= 0, "0 or positive"),
    ("precise_bn_images", lambda v: v >= 0, "0 (off) or a positive number of images"),
    ("val_fraction", lambda v: 0 < v < 1, "between 0 and 1 (e.g. 0.2)"),
)

# TrainConfig fields that only the folder dataset reads; `deeplab eval` and `deeplab data` take the same flags.
FOLDER_OPTIONS = ("image_dir", "mask_dir", "image_suffix", "mask_suffix", "palette", "mask_mode", "classes",
                  "label_map", "val_fraction")


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
    ignore_index: int = 255
    class_weights: tuple[float, ...] | None = None
    hard_pixel_fraction: float = 1.0  # < 1: average the loss over only this fraction of hardest pixels
    freeze_bn: bool = False  # BN in inference mode and not trained (fine-tuning at output stride 8)
    amp: str = "off"  # "bf16" (CPU or CUDA) or "fp16" (CUDA)
    channels_last: bool = False
    val_every: int = 0  # steps between validations; 0: only at the end
    val_limit: int | None = None  # validate on the first N validation images only (quick checks)
    val_scales: tuple[float, ...] = (1.0,)  # validation inference scales (softmax averaged, as deeplab eval --scales)
    val_flip: bool = False  # validation also averages the mirrored image (deeplab eval --flip)
    checkpoint_every: int = 500
    eval_output_stride: int | None = None  # validate at another output stride (the paper trains at 16, tests at 8)
    seed: int = 0
    workers: int = 0
    skip_bad: bool = False
    backbone_weights: str | None = None  # ImageNet weights for the backbone (torchvision / timm files)
    init_checkpoint: str | None = None  # start from a deeplab checkpoint (e.g. a converted TF model)
    device: str = "auto"
    val_images: int = 4  # validation images drawn in DIR/predictions.png
    # BatchNorm statistics re-measured with the current weights on this many training images before every
    # validation and the final checkpoint (deeplab.precise_bn); 0: off. Skipped with freeze_bn.
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

    def __post_init__(self) -> None:
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"--amp {self.amp}: choose off, bf16 (CPU or CUDA) or fp16 (CUDA)")
        for name, ok, expected in _RANGES:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be {expected}")
        if self.max_scale < self.min_scale:
            raise ValueError(f"--max-scale {self.max_scale} is below --min-scale {self.min_scale}")
        if self.eval_output_stride not in (None, 8, 16, 32):
            raise ValueError(f"--eval-output-stride {self.eval_output_stride}: choose 8, 16 or 32")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
            if any(not math.isfinite(w) or w < 0 for w in self.class_weights) or not any(self.class_weights):
                raise ValueError(f"--class-weights {','.join(f'{w:g}' for w in self.class_weights)}: weights must be "
                                 ">= 0 and finite, and not all 0")
        object.__setattr__(self, "dataset_options", tuple(str(o) for o in self.dataset_options))
        dataset_options(self.dataset_options)  # fail early on a malformed option
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "val_scales", tuple(float(v) for v in self.val_scales))
        if not self.val_scales or any(v <= 0 for v in self.val_scales):
            raise ValueError(f"--val-scales must be positive numbers like 1.0 or 0.75,1.0,1.25, got {self.val_scales}")
        given = [f"--{name.replace('_', '-')}" for name in FOLDER_OPTIONS if getattr(self, name) is not None]
        if given and self.dataset != "folder":
            raise ValueError(f"{', '.join(given)} apply to --dataset folder only, not --dataset {self.dataset}")
        if self.label_map is not None:
            from .data import parse_label_map

            parse_label_map(self.label_map)  # fail before any file is read

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("class_weights", "classes", "val_scales"):
            if d[name] is not None:
                d[name] = list(d[name])
        d["dataset_options"] = list(d["dataset_options"])
        return d

    def dataset_kwargs(self) -> dict[str, Any]:
        """What the dataset's constructor gets besides root, split, transform, seed and skip_bad."""
        folder = {name: getattr(self, name) for name in FOLDER_OPTIONS if getattr(self, name) is not None}
        return {**folder, **dataset_options(self.dataset_options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
    lr=0.1, weight_decay=4e-5, class_weights=SYNTHETIC_CLASS_WEIGHTS, channels_last=True, val_every=450,
    checkpoint_every=300, workers=0,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """DeepLab's poly schedule: base_lr * (1 - step / total_steps) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** power


def default_weight_decay(backbone: str) -> float:
    return 1e-4 if backbone.startswith("resnet") else 4e-5


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), cut into full batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g).tolist()
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(num_samples // batch_size)]


def pixel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    hard_pixel_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-pixel cross-entropy, number of pixels it sums over); the caller divides.

    Pixels labelled `ignore_index` never count. With `hard_pixel_fraction` < 1 only the hardest fraction of the
    valid pixels of each image counts (online hard pixel mining, as TF DeepLab's `top_k_percent_pixels`).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in full precision under autocast
    losses = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if hard_pixel_fraction >= 1.0:
        return losses[valid].sum(), valid.sum()
    total = losses.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=losses.device)
    for per_image, ok in zip(losses.flatten(1), valid.flatten(1)):
        k = int(math.ceil(hard_pixel_fraction * int(ok.sum())))
        if k:
            total = total + per_image[ok].topk(k).values.sum()
            count += k
    return total, count


def _set_bn_frozen(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # TF regularizes conv kernels only: no decay on BatchNorm parameters or biases.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datasets(train_cfg: TrainConfig, preprocessing: Preprocessing):
    from .data import EvalTransform, TrainTransform, build_dataset

    train_tf = TrainTransform(
        crop_size=(train_cfg.crop_size, train_cfg.crop_size),
        scale_range=(train_cfg.min_scale, train_cfg.max_scale),
        scale_step=train_cfg.scale_step,
        mean=preprocessing.mean,
        std=preprocessing.std,
        ignore_index=train_cfg.ignore_index,
        flip=train_cfg.flip,
    )
    eval_tf = EvalTransform(mean=preprocessing.mean, std=preprocessing.std, ignore_index=train_cfg.ignore_index)
    common = dict(root=train_cfg.data_root, seed=train_cfg.seed, skip_bad=train_cfg.skip_bad,
                  **train_cfg.dataset_kwargs())
    train_ds = build_dataset(train_cfg.dataset, split=train_cfg.train_split, transform=train_tf, **common)
    val_ds = build_dataset(train_cfg.dataset, split=train_cfg.val_split, transform=eval_tf, **common)
    return train_ds, val_ds


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    metrics: dict[str, Any]
    best_miou: float
    seconds: float
    skipped: list = None  # (file, reason) of samples skipped with skip_bad (this process's count)
    data_report: dict[str, Any] | None = None  # deeplab.data.report.data_report of the run's splits (new runs)


class DataCheckError(ValueError):
    """The data report says the masks look read wrong; the message names the flag that fixes it."""


@dataclass
class _Run:
    """What a training run holds between its steps (built by `_start`)."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    out: Path
    device: torch.device
    dist: Any  # deeplab.distributed.DistInfo
    say: Callable[[str], None]
    progress: bool
    train_ds: Any
    val_ds: Any
    model: DeepLab
    train_model: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any
    class_weights: torch.Tensor | None
    log: "_CsvLog"
    val_log: "_CsvLog"
    writer: Any  # TensorBoard, if installed
    report: dict[str, Any] | None
    step: int = 0
    best_miou: float = -1.0
    last_metrics: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.0

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def per_rank(self) -> int:
        return self.train_cfg.batch_size // self.dist.world_size


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    resume_changes: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a DeepLab. The run folder `out_dir` gets config.json, data_report.json, last.pt, best.pt, metrics.json,
    log.csv (one row per step), val.csv (one row per validation), curves.png and predictions.png.

    In order: `_start` (device, resume state, datasets and their data report, model, optimizer, run folder),
    `_train_steps` (`_train_step` per batch; `_validate` every val_every steps; `_save_last` every checkpoint_every
    steps), then a last `_validate` and `_save_last`. `echo` receives the progress lines (e.g. `print`).

    With `resume`, the run continues with the configuration it was started with; `resume_changes` ({field: value},
    the flags given with --resume) may change only `RESUMABLE` fields (e.g. more `steps`) and refuses the others.
    """
    started = time.time()
    out = Path(out_dir)
    lock = RunFolderLock(out) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        if lock is not None:
            for stale in out.glob(".*.tmp"):  # left by a write that was killed; no one else writes here now
                stale.unlink(missing_ok=True)
        resume, restarted = _elastic_restart(out, resume, echo=echo, main=lock is not None)
        run = _start(model_cfg, train_cfg, out=out, resume=resume, progress=progress, echo=echo,
                     resume_changes=resume_changes or {}, restarted=restarted)
        try:
            _train_steps(run)
        finally:
            run.log.close()
        try:
            metrics = _validate(run)
            _save_last(run)
        finally:
            run.val_log.close()
        if run.dist.is_main:
            _write_text(run.out / "metrics.json", json.dumps(metrics, indent=2))
            if run.writer is not None:
                run.writer.close()
    finally:
        if lock is not None:
            lock.release()
    skipped = list(getattr(run.train_ds, "bad_files", [])) + list(getattr(run.val_ds, "bad_files", []))
    return TrainResult(out_dir=run.out, step=run.step, metrics=metrics, best_miou=run.best_miou,
                       seconds=time.time() - started, skipped=skipped, data_report=run.report)


def _elastic_restart(
    out: Path, resume: bool, *, echo: Callable[[str], None] | None, main: bool
) -> tuple[bool, bool]:
    """(resume, restarted). torchrun restarts a failed group with the same command (`--max-restarts N`); its workers
    then see TORCHELASTIC_RESTART_COUNT > 0. A restarted run resumes from its last.pt; one killed before its first
    checkpoint starts over in its own folder (config.json names the torchrun run id that wrote it)."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if count == 0 or resume:
        return resume, False
    say = echo if (echo is not None and main) else (lambda _msg: None)
    if (out / "last.pt").is_file():
        say(f"torchrun restart {count}: resuming from {out / 'last.pt'}")
        return True, False
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        owner = json.loads((out / "config.json").read_text()).get("torchelastic_run_id")
    except (OSError, ValueError):
        owner = None
    if owner is None or owner != run_id:
        return False, False  # not this group's folder: the usual refusal of an existing run applies
    say(f"torchrun restart {count}: no checkpoint was written yet, starting over in {out}")
    return False, True


def _start(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, out: Path, resume: bool, progress: bool,
    echo: Callable[[str], None] | None, resume_changes: dict[str, Any], restarted: bool = False,
) -> _Run:
    """Everything before the first step; says what it loaded."""
    device = _resolve_device(train_cfg.device)
    dist_info = init_distributed(device_type=device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    say = echo if (echo is not None and dist_info.is_main) else (lambda _msg: None)
    resume_state = _resume_state(out / "last.pt", resume, restarted=restarted)
    if resume_state is not None:
        model_cfg = ModelConfig.from_dict(resume_state["model_config"])
        saved = replace(TrainConfig.from_dict(resume_state.get("train_config", {})), device=train_cfg.device,
                        workers=train_cfg.workers)
        train_cfg = _resumed_config(saved, model_cfg, resume_changes, step=int(resume_state["step"]), say=say)

    torch.manual_seed(train_cfg.seed)
    init_data = read_checkpoint(train_cfg.init_checkpoint) if train_cfg.init_checkpoint and not resume_state else None
    preprocessing = _preprocessing(resume_state, init_data)
    train_ds, val_ds = build_datasets(train_cfg, preprocessing)
    report = None if resume_state is not None else _check_data(train_cfg, train_ds, val_ds, say=say, progress=progress)
    if model_cfg.num_classes != train_ds.num_classes:
        model_cfg = model_cfg.replace(num_classes=train_ds.num_classes)
    if len(train_ds) < train_cfg.batch_size:
        raise ValueError(
            f"{train_ds!r} has {len(train_ds)} samples, fewer than --batch-size {train_cfg.batch_size}; lower it"
        )
    if train_cfg.batch_size % dist_info.world_size:
        raise ValueError(
            f"--batch-size {train_cfg.batch_size} does not split over {dist_info.world_size} processes; "
            "use a multiple of --nproc_per_node"
        )

    model = _initial_model(model_cfg, train_cfg, train_ds, preprocessing, init_data, fresh=resume_state is None, say=say)
    if resume_state is not None:
        load_state_dict_strict(model, resume_state["state_dict"], source=str(out / "last.pt"))
    train_model, optimizer = _placed_and_optimized(model, train_cfg, device=device, dist_info=dist_info)
    class_weights = None if train_cfg.class_weights is None else torch.tensor(train_cfg.class_weights, device=device)
    if class_weights is not None and len(class_weights) != model_cfg.num_classes:
        raise ValueError(f"--class-weights has {len(class_weights)} values for {model_cfg.num_classes} classes; "
                         "give one per class")

    step, best_miou, last_metrics = 0, -1.0, {}
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        step = int(resume_state["step"])
        best_miou = float(resume_state.get("best_miou", -1.0))
        last_metrics = resume_state.get("metrics", {})
        torch.set_rng_state(resume_state["rng_state"])
        say(f"resumed {out / 'last.pt'} at step {step}")
    main = dist_info.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        elastic = {"torchelastic_run_id": os.environ["TORCHELASTIC_RUN_ID"]} if "TORCHELASTIC_RUN_ID" in os.environ else {}
        _write_text(out / "config.json", json.dumps(
            {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "preprocessing": preprocessing.to_dict(),
             "class_names": list(train_ds.class_names), **elastic}, indent=2))
        if report is not None:
            _write_text(out / "data_report.json", json.dumps(report, indent=2))
    say(f"model: {'DeepLabv3+' if model_cfg.decoder else 'DeepLabv3'} {model_cfg.backbone}, output stride "
        f"{model_cfg.output_stride}, {model_cfg.num_classes} classes ({', '.join(train_ds.class_names)}); "
        f"{train_cfg.steps} steps of {train_cfg.batch_size} images on {device}"
        + (f" x {dist_info.world_size} processes" if dist_info.enabled else "") + f"; writing {out}")
    log = _CsvLog(out / "log.csv", _CsvLog.step_columns, keep_below=step, enabled=main)
    val_log = _CsvLog(out / "val.csv", _val_columns(train_ds.class_names), keep_below=step, enabled=main)
    for note in (getattr(log, "repaired", None), getattr(val_log, "repaired", None)):
        if note:
            say(note)
    return _Run(
        model_cfg=model_cfg, train_cfg=train_cfg, out=out, device=device, dist=dist_info, say=say, progress=progress,
        train_ds=train_ds, val_ds=val_ds, model=model, train_model=train_model, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=train_cfg.amp == "fp16"), class_weights=class_weights,
        log=log, val_log=val_log,
        writer=_tensorboard(out / "tensorboard") if main else None, report=report,
        step=step, best_miou=best_miou, last_metrics=last_metrics, lr=train_cfg.lr,
    )


def _placed_and_optimized(model: DeepLab, train_cfg: TrainConfig, *, device: torch.device, dist_info: Any):
    """The model on its device and layout, wrapped for DDP (synchronized BN) when distributed; its SGD optimizer."""
    model.to(device)
    if train_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if train_cfg.freeze_bn:
        _set_bn_frozen(model)
    train_model: nn.Module = model
    if dist_info.enabled:
        if not train_cfg.freeze_bn:
            train_model = convert_sync_batchnorm(model, device_type=device.type)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    decay = train_cfg.weight_decay if train_cfg.weight_decay is not None else default_weight_decay(model.config.backbone)
    optimizer = torch.optim.SGD(_param_groups(train_model, decay), lr=train_cfg.lr, momentum=train_cfg.momentum)
    return train_model, optimizer


# What a resumed run may change: how long it runs and how it reports, never what it learns from or how.
RESUMABLE = ("steps", "device", "workers", "val_every", "val_limit", "val_images", "checkpoint_every",
             "precise_bn_images", "skip_bad")


def _resumed_config(saved: TrainConfig, model_cfg: ModelConfig, changes: dict[str, Any], *, step: int,
                    say: Callable[[str], None]) -> TrainConfig:
    """The run's own config with the --resume flags that may change applied (said); any other differing flag refused."""
    current = {**model_cfg.to_dict(), **saved.to_dict()}
    normal = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changes.items()}
    differ = {k: v for k, v in normal.items() if k in current and current[k] != v}
    refused = [k for k in differ if k not in RESUMABLE]
    if refused:
        shown = ", ".join(f"--{k.replace('_', '-')} {differ[k]} (the run has {current[k]})" for k in refused)
        raise ValueError(
            f"--resume: {shown}: a resumed run keeps its configuration; drop these flags, or start a new run with "
            "another --out (--init-checkpoint RUN/last.pt starts from its weights)"
        )
    if "steps" in differ and differ["steps"] <= step:
        raise ValueError(f"--resume --steps {differ['steps']}: the run is already at step {step}; give more steps")
    applied = {k: changes[k] for k in differ if k not in ("device", "workers")}
    if applied:
        say("resuming with " + ", ".join(f"--{k.replace('_', '-')} {v} (was {current[k]})" for k, v in applied.items()))
    return replace(saved, **applied)


def _preprocessing(resume_state: dict[str, Any] | None, init_data: dict[str, Any] | None) -> Preprocessing:
    if resume_state is not None:
        return Preprocessing.from_dict(resume_state["preprocessing"])
    if init_data is not None:
        # The imported normalisation stays; a fixed input size (a TF Lite graph's) does not: training is at any size.
        return replace(Preprocessing.from_dict(init_data["preprocessing"]), input_size=None)
    return Preprocessing()


# Files that make a folder a run folder: a new run never writes over them.
RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics.json", "log.csv", "val.csv")


def _resume_state(last_path: Path, resume: bool, *, restarted: bool = False) -> dict[str, Any] | None:
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: {last_path} does not exist; start a new run without --resume")
        return read_checkpoint(last_path)
    if restarted:  # this torchrun group's own folder, killed before its first checkpoint: written over
        return None
    found = [name for name in RUN_FILES if (last_path.parent / name).exists()]
    if found:
        hint = "pass --resume to continue that run" if "last.pt" in found else "it has no last.pt to resume from"
        raise FileExistsError(
            f"{last_path.parent} already holds a run ({', '.join(found)}): {hint}, or choose another --out"
        )
    return None


class RunFolderBusy(FileExistsError):
    """Another process is training in the run folder."""


class RunFolderLock:
    """An exclusive lock on a run folder (`DIR/.lock`, holding the PID) while a run uses it, so two `deeplab train
    --out DIR` never interleave their logs and checkpoints. The lock is the kernel's (flock): a killed run leaves no
    stale lock behind. A folder the lock created is removed again if the run leaves nothing in it."""

    def __init__(self, out: Path) -> None:
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.path = out, out / ".lock"
        self.file = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): no lock
            pass
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunFolderBusy(
                f"{out} is in use by another deeplab train (PID {holder}); wait for it to finish or choose another --out"
            ) from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
        except OSError as e:  # a full disk: leave nothing behind
            self.release()
            raise named_os_error(e, self.path) from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.file.close()
        except OSError:  # the PID that could not be flushed to a full disk: nothing of it is needed
            pass
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()


def _check_data(train_cfg: TrainConfig, train_ds, val_ds, *, say: Callable[[str], None], progress: bool):
    """The data report of both splits, said; raises DataCheckError on a warning that stops training."""
    from .data.report import data_report, format_report

    report = data_report({"train": train_ds, "val": val_ds}, progress=False)
    where = f" at {train_cfg.data_root}" if train_cfg.data_root else ""
    say(format_report(report, title=f"{train_cfg.dataset}{where}"))
    stops = [w["message"] for w in report["warnings"] if w["stop"]]
    if stops and not train_cfg.ignore_data_warnings:
        raise DataCheckError(
            f"the data looks read wrong, so training did not start: {stops[0]}"
            + (f" (and {len(stops) - 1} more problem(s) above)" if len(stops) > 1 else "")
            + ". Fix that, or pass --ignore-data-warnings to train anyway"
        )
    return report


def _initial_model(model_cfg: ModelConfig, train_cfg: TrainConfig, train_ds, preprocessing: Preprocessing,
                   init_data: dict[str, Any] | None, *, fresh: bool, say: Callable[[str], None]) -> DeepLab:
    """The model before the first step: random, from a deeplab checkpoint, or with an ImageNet backbone."""
    model = build_model(model_cfg, class_names=train_ds.class_names, preprocessing=preprocessing)
    if init_data is not None:
        matched = _load_init(model, init_data, source=str(train_cfg.init_checkpoint), say=say)
        folded = folded_batchnorms(model, matched)
        if folded and not train_cfg.freeze_bn:
            count = min(len(train_ds), max(train_cfg.batch_size, 32))
            recalibrate_folded_batchnorms(model, folded, (train_ds[i][0] for i in range(count)))
            say(f"{len(folded)} BatchNorms of {train_cfg.init_checkpoint} were folded into their convs; "
                f"their statistics were re-measured on {count} training crops so that training-mode BN keeps "
                "the imported function")
    if train_cfg.backbone_weights and fresh:
        from .convert.torch_weights import backbone_state_dict

        weights = backbone_state_dict(train_cfg.backbone_weights, backbone=model_cfg.backbone)
        load_state_dict_strict(model.backbone, weights, source=str(train_cfg.backbone_weights))
        say(f"backbone weights loaded from {train_cfg.backbone_weights}")
    return model


def _train_steps(run: _Run) -> None:
    """Steps from run.step to train_cfg.steps, an epoch's seeded permutation at a time."""
    from tqdm import tqdm

    cfg = run.train_cfg
    steps_per_epoch = len(run.train_ds) // cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train", disable=not (run.progress and run.dist.is_main),
               dynamic_ncols=True)
    _train_mode(run)
    try:
        while run.step < cfg.steps:
            epoch, first = divmod(run.step, steps_per_epoch)
            batches = epoch_batches(len(run.train_ds), cfg.batch_size, seed=cfg.seed, epoch=epoch)
            rank = run.dist.rank
            rank_batches = [b[rank * run.per_rank : (rank + 1) * run.per_rank] for b in batches[first:]]
            run.train_ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                run.train_ds, batch_sampler=rank_batches, num_workers=cfg.workers,
                pin_memory=run.device.type == "cuda",
                # Its own generator: a DataLoader otherwise draws its worker seed from torch's global RNG, and
                # the extra draw of a resumed (mid-epoch) loader would shift the dropout masks after a resume.
                generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
            )
            for images, masks in loader:
                t0 = time.perf_counter()
                loss = _train_step(run, images, masks)
                run.step += 1
                images_per_s = cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                run.log.write(step=run.step, epoch=epoch, loss=repr(loss), lr=run.lr, images_per_s=f"{images_per_s:.2f}")
                if run.writer is not None:
                    run.writer.add_scalar("train/loss", loss, run.step)
                    run.writer.add_scalar("train/lr", run.lr, run.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.lr:.2e}", img_s=f"{images_per_s:.1f}")
                if cfg.val_every and run.step % cfg.val_every == 0 and run.step < cfg.steps:
                    _validate(run)
                    _train_mode(run)
                if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                    _save_last(run)
                if run.step >= cfg.steps:
                    break
    finally:
        bar.close()


def _train_mode(run: _Run) -> None:
    run.train_model.train()
    if run.train_cfg.freeze_bn:
        _set_bn_frozen(run.train_model)


def _train_step(run: _Run, images: torch.Tensor, masks: torch.Tensor) -> float:
    """One SGD step on this process's share of a global batch; returns the global mean loss."""
    cfg, device = run.train_cfg, run.device
    run.lr = poly_lr(cfg.lr, run.step, cfg.steps, cfg.lr_power)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    images = images.to(device, dtype=next(run.model.parameters()).dtype, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    loss_sum, count, point_sum, point_count = step_losses(
        run.train_model, images, masks, amp=cfg.amp, channels_last=cfg.channels_last, ignore_index=cfg.ignore_index,
        class_weights=run.class_weights, hard_pixel_fraction=cfg.hard_pixel_fraction,
    )
    # Divide by the global number of counted pixels (times the world size, which DDP's gradient averaging divides
    # out): the gradient then equals one process's over the whole batch.
    stats = all_reduce_sum(torch.stack([
        loss_sum.detach().double(), count.double(), point_sum.detach().double(), point_count.double(),
    ]))
    global_count, global_points = stats[1].clamp_min(1), stats[3].clamp_min(1)
    world = run.dist.world_size
    loss = loss_sum * (world / global_count).to(loss_sum.dtype)
    loss = loss + point_sum * (world / global_points).to(point_sum.dtype)  # 0 without PointRend
    loss_value = float(stats[0] / global_count + stats[2] / global_points)
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"the loss is {loss_value} at step {run.step} (learning rate {run.lr:.3g}); "
            f"{_kept(run)}. Lower --lr or check the data."
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss_value


def step_losses(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, amp: str = "off", channels_last: bool = False,
    ignore_index: int = 255, class_weights: torch.Tensor | None = None, hard_pixel_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a training step under `amp` autocast and its losses: (pixel loss sum, pixels counted,
    PointRend point loss sum, points counted; both 0 without PointRend). Sums, not means: the caller divides by
    the global counts."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device.type, amp):
        outputs = model(images)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    loss_sum, count = pixel_loss(logits, masks, ignore_index=ignore_index, class_weights=class_weights,
                                 hard_pixel_fraction=hard_pixel_fraction)
    point_sum = point_count = torch.zeros((), device=images.device)
    if isinstance(outputs, dict):  # PointRend: the point loss is added to the main loss
        point_sum, point_count = point_loss(outputs["point_logits"], outputs["point_coords"], masks,
                                            ignore_index=ignore_index)
    return loss_sum, count, point_sum, point_count


def _kept(run: _Run) -> str:
    if run.last_path.is_file():
        return f"the last good checkpoint {run.last_path} is kept"
    return "no checkpoint had been written yet"


def _save_last(run: _Run) -> None:
    # A step can leave non-finite weights (or BN statistics) behind a still-finite loss; never let them replace a
    # good checkpoint.
    if not all(torch.isfinite(v).all() for v in run.model.state_dict().values() if v.is_floating_point()):
        raise TrainingDiverged(
            f"the weights became non-finite at step {run.step} (learning rate {run.lr:.3g}); {_kept(run)}. "
            "Lower --lr or check the data."
        )
    if run.dist.is_main:
        atomic_save(
            checkpoint_dict(
                run.model, step=run.step, optimizer=run.optimizer.state_dict(), rng_state=torch.get_rng_state(),
                best_miou=run.best_miou, metrics=run.last_metrics, train_config=run.train_cfg.to_dict(),
            ),
            run.last_path,
        )


def _precise_bn(run: _Run) -> int:
    """Re-measure the BN statistics on `precise_bn_images` training images (the same ones in every process count
    and order for a given step); returns the number of images used, 0 when switched off."""
    from .precise_bn import recompute_bn_statistics

    cfg = run.train_cfg
    if cfg.precise_bn_images <= 0 or cfg.freeze_bn:
        return 0
    world, rank = run.dist.world_size, run.dist.rank
    # Two images at least in one process: the image-pooling BN's statistics over one 1x1 feature are undefined (with
    # several processes synchronized BN pools the batch across them, as in training).
    per_rank = run.per_rank if world > 1 else max(2, run.per_rank)
    n_batches = max(1, min(cfg.precise_bn_images, len(run.train_ds)) // (per_rank * world))
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step + 1)  # not torch's global RNG
    perm = torch.randperm(len(run.train_ds), generator=g).tolist()
    chosen = [perm[i % len(perm)] for i in range(n_batches * per_rank * world)]
    mine = [chosen[(b * world + rank) * per_rank : (b * world + rank + 1) * per_rank] for b in range(n_batches)]
    loader = torch.utils.data.DataLoader(run.train_ds, batch_sampler=mine, num_workers=cfg.workers)
    dtype = next(run.model.parameters()).dtype
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = (x.to(run.device, dtype=dtype).contiguous(memory_format=memory) for x, _ in loader)
    return recompute_bn_statistics(run.model, batches) * world


def _validate(run: _Run) -> dict[str, Any]:
    """Precise BN, then the same evaluation as `deeplab eval` (at native size, with val_scales and val_flip, sharded
    across processes); writes val.csv, best.pt, predictions.png and curves.png."""
    from .evaluate import evaluate

    cfg = run.train_cfg
    measured = _precise_bn(run)
    # The PyTorch fast path, not "auto": choosing a runtime would export and time the model at every validation.
    metrics = evaluate(run.model, run.val_ds, input_size=None, output_stride=cfg.eval_output_stride,
                       scales=cfg.val_scales, flip=cfg.val_flip, runtime="torch", device=run.device,
                       progress=run.progress and run.dist.is_main, limit=cfg.val_limit)
    metrics["step"] = run.step
    metrics["precise_bn_images"] = measured
    run.last_metrics = metrics
    miou = metrics["miou"]
    bn_note = f" (BatchNorm statistics re-measured on {measured} training images)" if measured else ""
    run.say(f"step {run.step}: val mIoU {_fmt(miou)}, pixel accuracy {_fmt(metrics['pixel_accuracy'])}{bn_note}")
    if not run.dist.is_main:
        return metrics
    if run.writer is not None and miou is not None:
        run.writer.add_scalar("val/miou", miou, run.step)
    run.val_log.write(step=run.step, miou=_fmt(miou), pixel_accuracy=_fmt(metrics["pixel_accuracy"]),
                      **{f"iou_{n}": _fmt(v) for n, v in metrics["per_class_iou"].items()})
    if miou is not None and miou > run.best_miou:
        run.best_miou = miou
        atomic_save(checkpoint_dict(run.model, step=run.step, metrics=metrics, train_config=cfg.to_dict()),
                    run.out / "best.pt")
    from .plots import draw_predictions, plot_training_curves

    draw_predictions(run.model, run.val_ds, run.out / "predictions.png", count=cfg.val_images, device=run.device,
                     step=run.step)
    drawn = plot_training_curves(run.out / "log.csv", run.out / "val.csv", run.out / "curves.png")
    if drawn is None and run.step == cfg.steps:
        run.say("curves.png not drawn: it needs matplotlib (pip install 'deeplab[plots]')")
    return metrics


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _val_columns(class_names) -> tuple[str, ...]:
    return ("step", "miou", "pixel_accuracy", *(f"iou_{n}" for n in class_names), "time")


def _write_text(path: Path, text: str) -> None:
    """A small text file written through a temporary file and a rename (readable by the group, as umask allows)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_init(model: DeepLab, data: dict[str, Any], *, source: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Start from another deeplab checkpoint: every tensor whose name and shape match; a new classifier otherwise."""
    own = model.state_dict()
    theirs = data["state_dict"]
    matched = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in own if k not in matched)
    if not any(k.startswith("backbone.") for k in matched):
        raise CheckpointError(
            f"{source}: none of its backbone weights fit this model ({model.config.backbone}); "
            "pass the same --backbone (and --depth-multiplier) the checkpoint was built with"
        )
    own.update(matched)
    model.load_state_dict(own)
    say(f"initialised from {source}: {len(matched)} tensors loaded, {len(skipped)} left at random init"
        + (f" ({', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''})" if skipped else ""))
    return matched


def folded_batchnorms(model: nn.Module, loaded: dict[str, Any]) -> list[str]:
    """BatchNorms loaded as identities carrying a folded bias (weight 1, mean 0, variance 1 - eps): TF Lite imports."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_var" in loaded:
            identity = (
                bool((module.weight == 1).all()) and bool((module.running_mean == 0).all())
                and torch.allclose(module.running_var, torch.full_like(module.running_var, 1.0 - module.eps))
            )
            if identity:
                names.append(name)
    return names


@torch.no_grad()
def recalibrate_folded_batchnorms(model: nn.Module, names: list[str], images: Iterable[torch.Tensor]) -> None:
    """Give folded (identity) BatchNorms the statistics of their inputs without changing what the model computes.

    A BN-folded graph computes conv(x) + b. As an identity BN that is exact at inference, but training-mode BN would
    normalise each channel by its batch statistics and the imported features would be rescaled. With the measured
    input mean m and variance v: running_mean = m, running_var = v, weight = sqrt(v + eps), bias = b + m. Inference
    is unchanged exactly; in training the batch statistics approximate (m, v), so the function is kept and BN
    trains in its usual parametrisation.
    """
    modules = dict(model.named_modules())
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # per BN: sum, sum of squares, count

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1).cpu()  # (C, pixels)
            s1, s2, n = sums.get(name, (0.0, 0.0, 0))
            sums[name] = (s1 + x.sum(1), s2 + (x * x).sum(1), n + x.shape[1])
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for image in images:
            model(image.unsqueeze(0).to(device, dtype=next(model.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name in names:
        s1, s2, n = sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        bn = modules[name]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.bias.add_(mean.to(bn.bias.dtype))
        bn.weight.copy_(torch.sqrt(var + bn.eps))


def _intact_rows(path: Path, keep_below: int) -> tuple[list[dict[str, str]], str | None]:
    """The rows of a run's CSV up to step `keep_below`, and a note when damaged rows were dropped: a write cut off by a
    crash or power loss leaves a partial last line or NUL bytes, which must not stop a resume."""
    import io

    text = path.read_bytes().decode("utf-8", errors="replace")
    clean = text.replace("\x00", "")
    rows, damaged = [], 0
    for row in csv.DictReader(io.StringIO(clean)):
        try:
            step = int(row["step"])
        except (KeyError, TypeError, ValueError):
            damaged += 1
            continue
        if None in row.values() or None in row:  # a short or an overlong row
            damaged += 1
        elif step <= keep_below:
            rows.append(row)
    if damaged or clean != text:
        return rows, (f"{path}: dropped {damaged} damaged row(s) and {len(text) - len(clean)} NUL byte(s) left by an "
                      f"interrupted write; the {len(rows)} intact rows up to step {keep_below} are kept")
    return rows, None


class _CsvLog:
    """A CSV file with one row per step (log.csv) or per validation (val.csv), flushed per row; on resume, rows
    after the resumed step are dropped (they are run again)."""

    step_columns = ("step", "epoch", "loss", "lr", "images_per_s", "time")

    def __init__(self, path: Path, columns: tuple[str, ...], *, keep_below: int, enabled: bool) -> None:
        self.file = None
        if not enabled:
            return
        rows, self.repaired = [], None
        if keep_below > 0 and path.exists():
            rows, self.repaired = _intact_rows(path, keep_below)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row: Any) -> None:
        if self.file is None:
            return
        row["time"] = f"{time.time():.3f}"
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: an optional extra
        return None
    return SummaryWriter(str(path))
