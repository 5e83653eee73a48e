"""Training with the DeepLab papers' protocol: random scale, crop, flip; cross-entropy ignoring 255; SGD with
momentum and a poly learning rate; periodic validation; atomic, exactly resumable checkpoints; DDP under torchrun.

Everything a step depends on is a function of (seed, step): the batch order (a permutation per epoch seeded by
(seed, epoch)), each sample's augmentation (seeded by (seed, epoch, index) inside the dataset), and the learning
rate (computed from the step, not accumulated). The checkpoint adds the model, the optimizer and torch's RNG state
(dropout), so a run killed at any moment and resumed from its last checkpoint repeats the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy.precision import native_bf16
from ..models.checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_dict,
    configs_of,
    load_state_dict_strict,
    read_checkpoint,
)
from ..models.config import ModelConfig
from ..models.hub import checkpoint_path
from ..models.model import DeepLab
from .batches import EpochSamples, RunBatches, build_datasets
from .config import TrainConfig, default_weight_decay, train_config_of
from .distributed import all_reduce_sum, convert_sync_batchnorm, init_distributed
from .losses import step_losses
from .run_folder import (
    CsvLog,
    RunFolderLock,
    best_folder,
    elastic_restart,
    hardware_line,
    read_resume_state,
    recorded_command,
    tensorboard_writer,
    write_text,
)
from .warm_start import fit_to_data, initial_model, run_preprocessing


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """DeepLab's poly schedule: base_lr * (1 - step / total_steps) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** power


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
    dist: Any  # deeplab.training.distributed.DistInfo
    say: Callable[[str], None]
    progress: bool
    train_ds: Any
    val_ds: Any
    model: DeepLab
    train_model: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any
    class_weights: torch.Tensor | None
    log: "CsvLog"
    val_log: "CsvLog"
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
    command: str | None = None,
) -> TrainResult:
    """Train a DeepLab. The run folder `out_dir` gets config.json, data_report.json, last.pt, best.pt, metrics.json,
    log.csv (one row per step), val.csv (one row per validation), curves.png and predictions.png.

    In order: `_start` (device, resume state, datasets and their data report, model, optimizer, run folder),
    `_train_steps` (`_train_step` per batch; `_validate` every val_every steps; `_save_last` every checkpoint_every
    steps), then a last `_validate` and `_save_last`. `echo` receives the progress lines (e.g. `print`).

    With `resume`, the run continues with the configuration it was started with; `resume_changes` ({field: value},
    the flags given with --resume) may change only `RESUMABLE` fields (e.g. more `steps`) and refuses the others.
    `command` (the command line that started the run) is recorded in config.json for the model card of `best/`, the
    model folder (`deeplab.models.hub`) written from best.pt at the end.
    """
    started = time.time()
    out = Path(out_dir)
    lock = RunFolderLock(out) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        if lock is not None:
            for stale in out.glob(".*.tmp"):  # left by a write that was killed; no one else writes here now
                stale.unlink(missing_ok=True)
        resume, restarted = elastic_restart(out, resume, echo=echo, main=lock is not None)
        run = _start(model_cfg, train_cfg, out=out, resume=resume, progress=progress, echo=echo,
                     resume_changes=resume_changes or {}, restarted=restarted, command=command)
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
            hardware = {"train_seconds": round(time.time() - started, 1), "hardware": hardware_line(run.device, run.dist)}
            write_text(run.out / "metrics.json", json.dumps({**metrics, **hardware}, indent=2))
            best_folder(run.out, card={"seconds": hardware["train_seconds"], "hardware": hardware["hardware"]})
            if run.writer is not None:
                run.writer.close()
    finally:
        if lock is not None:
            lock.release()
    skipped = list(getattr(run.train_ds, "bad_files", [])) + list(getattr(run.val_ds, "bad_files", []))
    return TrainResult(out_dir=run.out, step=run.step, metrics=metrics, best_miou=run.best_miou,
                       seconds=time.time() - started, skipped=skipped, data_report=run.report)


def _start(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, out: Path, resume: bool, progress: bool,
    echo: Callable[[str], None] | None, resume_changes: dict[str, Any], restarted: bool = False,
    command: str | None = None,
) -> _Run:
    """Everything before the first step; says what it loaded."""
    device = _resolve_device(train_cfg.device)
    dist_info = init_distributed(device_type=device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    say = echo if (echo is not None and dist_info.is_main) else (lambda _msg: None)
    resume_state = read_resume_state(out / "last.pt", resume, restarted=restarted)
    if resume_state is not None:
        model_cfg = configs_of(resume_state, source=str(out / "last.pt"))[0]
        saved = replace(train_config_of(resume_state, source=str(out / "last.pt")), device=train_cfg.device,
                        workers=train_cfg.workers)
        train_cfg = _resumed_config(saved, model_cfg, resume_changes, step=int(resume_state["step"]), say=say)

    train_cfg, amp_why = resolve_for_device(train_cfg, device, backbone=model_cfg.backbone)
    torch.manual_seed(train_cfg.seed)
    init_data = (read_checkpoint(checkpoint_path(train_cfg.init_checkpoint))  # a path, or a Hub repo id
                 if train_cfg.init_checkpoint and not resume_state else None)
    preprocessing = run_preprocessing(resume_state, init_data)
    train_ds, val_ds = build_datasets(train_cfg, preprocessing)
    report = None if resume_state is not None else _check_data(train_cfg, train_ds, val_ds, say=say, progress=progress)
    if resume_state is None:  # bands, their normalisation and auto class weights, from the data
        model_cfg, train_cfg, preprocessing = fit_to_data(model_cfg, train_cfg, preprocessing, train_ds, val_ds, report,
                                                          say=say)
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

    model = initial_model(model_cfg, train_cfg, train_ds, preprocessing, init_data, fresh=resume_state is None, say=say)
    if resume_state is not None:
        load_state_dict_strict(model, resume_state["state_dict"], source=str(out / "last.pt"))
    train_model, optimizer = _placed_and_optimized(model, train_cfg, device=device, dist_info=dist_info)
    class_weights = None if train_cfg.class_weights is None else torch.tensor(train_cfg.class_weights, device=device)
    if class_weights is not None and len(class_weights) != model_cfg.num_classes:
        raise ValueError(f"--class-weights has {len(class_weights)} values for {model_cfg.num_classes} classes; "
                         "give one per class")

    step, best_miou, last_metrics = 0, -1.0, {}
    if resume_state is not None:
        _restore_training_state(optimizer, resume_state, source=str(out / "last.pt"))
        step = int(resume_state["step"])
        best_miou = float(resume_state.get("best_miou") or -1.0)
        last_metrics = resume_state.get("metrics") or {}
        say(f"resumed {out / 'last.pt'} at step {step}")
    main = dist_info.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        elastic = {"torchelastic_run_id": os.environ["TORCHELASTIC_RUN_ID"]} if "TORCHELASTIC_RUN_ID" in os.environ else {}
        command = recorded_command(out) if resume_state is not None else command  # the one that started the run
        elastic.update({"command": command} if command else {})
        write_text(out / "config.json", json.dumps(
            {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "preprocessing": preprocessing.to_dict(),
             "class_names": list(train_ds.class_names), **elastic}, indent=2))
        if report is not None:
            write_text(out / "data_report.json", json.dumps(report, indent=2))
    say(f"model: {model_cfg.variant}{' (MSC training)' if train_cfg.msc else ''} {model_cfg.backbone}, output stride "
        f"{model_cfg.output_stride}, {model_cfg.num_classes} classes ({', '.join(train_ds.class_names)}); "
        f"{train_cfg.steps} steps of {train_cfg.batch_size} images on {device}"
        + (f" x {dist_info.world_size} processes" if dist_info.enabled else "")
        + f" ({_how(train_cfg, recomputes=hasattr(type(model.backbone), 'recompute'), why=amp_why)}); writing {out}")
    log = CsvLog(out / "log.csv", CsvLog.step_columns, keep_below=step, enabled=main)
    val_log = CsvLog(out / "val.csv", _val_columns(train_ds.class_names), keep_below=step, enabled=main)
    for note in (getattr(log, "repaired", None), getattr(val_log, "repaired", None)):
        if note:
            say(note)
    return _Run(
        model_cfg=model_cfg, train_cfg=train_cfg, out=out, device=device, dist=dist_info, say=say, progress=progress,
        train_ds=train_ds, val_ds=val_ds, model=model, train_model=train_model, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=train_cfg.amp == "fp16"), class_weights=class_weights,
        log=log, val_log=val_log,
        writer=tensorboard_writer(out / "tensorboard") if main else None, report=report,
        step=step, best_miou=best_miou, last_metrics=last_metrics, lr=train_cfg.lr,
    )


def _restore_training_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], *, source: str) -> None:
    """The optimizer's state and torch's RNG from a run's last.pt, refused in one line naming the file when they do
    not fit this run (an edited file, or another run's)."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_state"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: its optimizer or RNG state does not fit this run ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:160]}); resume from an intact last.pt, or start a "
                              f"new run from its weights: deeplab train --init-checkpoint {source} --out NEW_FOLDER") from None


# Backbones that AVX512_BF16 without AMX does not speed up: their time goes to depthwise convolutions and elementwise
# ops, which gain nothing from bf16 dot products and pay the casts (the synthetic preset's MobileNetV2: 7% slower).
BF16_SLOWER_WITHOUT_AMX = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_edgetpu")


def cpu_amp(backbone: str, *, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """amp "auto" on a CPU, and why: bf16 autocast where the CPU has AMX (every backbone), or AVX512_BF16 for the
    backbones whose dense convolutions it speeds up (ResNet-101 DeepLabv3+ at 512x512: 1.58x), float32 elsewhere
    (docs/training.md#precision)."""
    native = native_bf16(flags)
    if native == "AMX":
        return "bf16", "bf16 autocast: this CPU has AMX"
    if native == "AVX512_BF16" and backbone not in BF16_SLOWER_WITHOUT_AMX:
        return "bf16", f"bf16 autocast: this CPU has AVX512_BF16, which speeds up {backbone}'s convolutions"
    if native == "AVX512_BF16":
        return "off", f"float32: AVX512_BF16 without AMX does not speed up {backbone}'s depthwise convolutions"
    return "off", "float32: this CPU has no native bf16 (no AMX or AVX512_BF16)"


def resolve_for_device(cfg: TrainConfig, device: torch.device, *, backbone: str = "resnet101",
                       flags: frozenset[str] | None = None) -> tuple[TrainConfig, str]:
    """`cfg` with its automatic choices made for `device`, and what the start-up line says of the precision: amp
    "auto" is bf16 autocast on a CUDA GPU that has bf16 (fp16 with a gradient scaler on one without), and on a CPU
    what `cpu_amp` says for `backbone`; workers None is 0 on CPU (loading competes with the training threads for the
    cores) and, on CUDA, the CPU cores of this process's share of the machine, at most 8."""
    amp, why = cfg.amp, ""
    if amp == "auto" and device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        why = f"--amp auto on a GPU {'with' if amp == 'bf16' else 'without'} bf16"
    elif amp == "auto":
        amp, why = cpu_amp(backbone, flags=flags)
        why = f"--amp auto, {why.split(': ', 1)[1]}"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (--device cuda); on CPU use --amp bf16 or --amp off")
    workers = cfg.workers
    if workers is None:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        workers = 0 if device.type != "cuda" else max(1, min(8, (os.cpu_count() or 1) // local - 1))
    return replace(cfg, amp=amp, workers=workers), why


def _how(cfg: TrainConfig, *, recomputes: bool = False, why: str = "") -> str:
    """What the start-up line says of precision (and `why`), memory layout, compilation and loading."""
    amp = {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler"}[cfg.amp]
    amp += f" ({why})" if why else ""
    parts = [amp, "channels_last" if cfg.channels_last else "NCHW"] + (["torch.compile"] if cfg.compile else [])
    parts += ["early stages recomputed in backward"] if cfg.recompute and recomputes else []
    return ", ".join(parts + [f"{cfg.workers} loader workers" if cfg.workers else "loading in this process"])


def _placed_and_optimized(model: DeepLab, train_cfg: TrainConfig, *, device: torch.device, dist_info: Any):
    """The model on its device and layout, wrapped for DDP (synchronized BN) when distributed; its SGD optimizer."""
    model.to(device)
    for module in model.modules():  # the modules that can recompute their activations in the backward pass
        if hasattr(type(module), "recompute"):
            module.recompute = train_cfg.recompute
    if train_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if train_cfg.freeze_bn:
        _set_bn_frozen(model)
    train_model: nn.Module = model
    if train_cfg.compile:
        train_model = torch.compile(train_model)
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
RESUMABLE = ("steps", "device", "workers", "compile", "recompute", "val_every", "val_limit", "val_images", "checkpoint_every",
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


def _check_data(train_cfg: TrainConfig, train_ds, val_ds, *, say: Callable[[str], None], progress: bool):
    """The data report of both splits, said; raises DataCheckError on a warning that stops training."""
    from ..data.report import data_report, format_report

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


def _loader(run: _Run) -> torch.utils.data.DataLoader:
    """One DataLoader for the rest of the run. With workers: persistent (no start-up per epoch), 4 batches
    prefetched per worker, and on CUDA pinned memory, so the copy to the GPU overlaps the step."""
    cfg = run.train_cfg
    batches = RunBatches(size=len(run.train_ds), batch_size=cfg.batch_size, seed=cfg.seed, step=run.step,
                          steps=cfg.steps, rank=run.dist.rank, per_rank=run.per_rank)
    workers = {"persistent_workers": True, "prefetch_factor": 4} if cfg.workers else {}
    return torch.utils.data.DataLoader(
        EpochSamples(run.train_ds), batch_sampler=batches, num_workers=cfg.workers,
        pin_memory=run.device.type == "cuda", **workers,
        # Its own generator: a DataLoader otherwise draws its worker seed from torch's global RNG, and that draw
        # would shift the dropout masks of a resumed run.
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + run.step),
    )


def _train_steps(run: _Run) -> None:
    """Steps from run.step to train_cfg.steps; each row of log.csv has the step's images/s over the wall time since
    the previous step (data loading included) and the seconds the step waited for its batch."""
    from tqdm import tqdm

    cfg = run.train_cfg
    steps_per_epoch = len(run.train_ds) // cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train", disable=not (run.progress and run.dist.is_main),
               dynamic_ncols=True)
    _train_mode(run)
    try:
        last = time.perf_counter()
        for images, masks in _loader(run):
            waited = time.perf_counter() - last
            loss = _train_step(run, images, masks)
            run.step += 1
            now = time.perf_counter()
            images_per_s = cfg.batch_size / max(now - last, 1e-9)
            run.log.write(step=run.step, epoch=(run.step - 1) // steps_per_epoch, loss=repr(loss), lr=run.lr,
                          images_per_s=f"{images_per_s:.2f}", wait_s=f"{waited:.4f}")
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
            last = time.perf_counter()
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
        class_weights=run.class_weights, hard_pixel_fraction=cfg.hard_pixel_fraction, loss=cfg.loss,
        focal_gamma=cfg.focal_gamma, msc=cfg.msc,
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
    # The augmentation of the epoch the last step drew from, whether or not loader workers did the drawing.
    run.train_ds.set_epoch(max(0, run.step - 1) // (len(run.train_ds) // cfg.batch_size))
    loader = torch.utils.data.DataLoader(run.train_ds, batch_sampler=mine, num_workers=cfg.workers)
    dtype = next(run.model.parameters()).dtype
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = (x.to(run.device, dtype=dtype).contiguous(memory_format=memory) for x, _ in loader)
    return recompute_bn_statistics(run.model, batches) * world


def _validate(run: _Run) -> dict[str, Any]:
    """Precise BN, then the same evaluation as `deeplab eval` (at native size, with val_scales and val_flip, sharded
    across processes); writes val.csv, best.pt, predictions.png and curves.png."""
    from ..inference.evaluate import evaluate

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
    from ..inference.plots import draw_predictions, plot_training_curves

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


