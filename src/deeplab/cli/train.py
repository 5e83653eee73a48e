"""`deeplab train`: the built-in synthetic default, or a dataset with the papers' protocol."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..models.config import ModelConfig
from ..training.config import TrainConfig, presets
from .flags import (
    FIELD_HELP,
    add_dataclass_flags,
    apply_head_flags,
    dataclass_from_flags,
    field_choices,
)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from ..training.loop import TrainingDiverged, fit

    dataset = args.dataset or "synthetic"
    # The synthetic dataset gets the built-in 3-minute preset (following --backbone where it names another);
    # real datasets get the paper's protocol.
    base_model, base_train = presets(dataset, args.backbone)
    model_cfg = apply_head_flags(dataclass_from_flags(ModelConfig, base_model, args), head=args.head,
                                 decoder=args.decoder)
    train_cfg = dataclass_from_flags(TrainConfig, base_train, args)
    out = args.out or f"runs/{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    # With --resume, the flags given on the command line (not the preset's values) are the changes asked for.
    given = {f.name: getattr(args, f.name) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    try:
        result = fit(model_cfg, train_cfg, out_dir=out, resume=args.resume, progress=not args.quiet, echo=print,
                     resume_changes=given, command=shlex.join(["deeplab", *sys.argv[1:]]))
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
    written = [name + ("/" if name == "best" else "") for name in RUN_OUTPUTS if (result.out_dir / name).exists()]
    print(f"wrote {result.out_dir}: {', '.join(written)}")
    if (result.out_dir / "best").is_dir():
        print(f"to share: {result.out_dir / 'best'}, best.pt as a model folder (config.json, model.safetensors and a "
              "README.md model card); any command takes it as --checkpoint, deeplab.push_to_hub publishes it")
    return 0


# What a run folder may hold, in the order the closing line lists what it does hold.
RUN_OUTPUTS = ("config.json", "data_report.json", "last.pt", "best.pt", "best", "metrics.json", "log.csv", "val.csv",
               "curves.png", "predictions.png", "tensorboard")


def _resume_hint(out: str) -> str:
    from pathlib import Path

    from ..models.checkpoint import read_checkpoint

    last = Path(out) / "last.pt"
    try:
        step = read_checkpoint(last)["step"]
    except (ValueError, KeyError):
        return f"no checkpoint was written yet in {out}; start again (a new --out, or remove that folder)"
    return f"{last} holds step {step}: continue with `deeplab train --out {out} --resume`"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic default, ~3 min on 2 CPU cores)")
    model, train = presets("synthetic")
    shared = dict(helps=FIELD_HELP, choices=field_choices(), preset_name="synthetic preset")
    # Ranges are checked as the configs are made from the flags, before anything is read or written; the message
    # names the flag and what it must be. The input bands come from the data and --bands.
    add_dataclass_flags(p, ModelConfig, preset=model, skip=("in_channels",), **shared)
    add_dataclass_flags(p, TrainConfig, preset=train, **shared)
    p.add_argument("--out", default=None, help="output folder (default runs/DATASET-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
