"""`deeplab data`: the data report of a dataset's splits."""

from __future__ import annotations

import argparse
import json

from .flags import add_folder_flags, flagged_folder_options, number, str_tuple


def run(args: argparse.Namespace) -> int:
    """The data report of a dataset's splits; exit status 1 when a warning says the masks look read wrong."""
    from ..data import build_dataset
    from ..data.report import data_report, format_report
    from ..training.config import TrainConfig

    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, seed=args.seed, **flagged_folder_options(args))
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


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="report a dataset before training: images, classes, pixel shares, sizes, and "
                       "warnings that name the flag to fix (exit status 1 when the masks look read wrong)")
    p.add_argument("--dataset", required=True, help="voc, cityscapes, ade20k, camvid, folder, classified-tiles, "
                   "synthetic")
    p.add_argument("--data-root", default=None, help="dataset folder")
    p.add_argument("--splits", type=str_tuple, default=("train", "val"), help="splits to report (default train,val)")
    p.add_argument("--seed", type=number(int, 0, "0 or more"), default=0, help="picks the held-out split of a folder, as in training (default 0)")
    p.add_argument("--max-masks", type=number(int, 0, "0 (all) or a positive number"), default=1000,
                   help="read at most N masks per split, evenly spaced (0: all; default %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="count unreadable samples instead of stopping")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_folder_flags(p, "the same flags as deeplab train")
    p.set_defaults(func=run)
