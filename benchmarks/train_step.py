"""Seconds per training step and peak resident memory at batch 2, crop 513 (one JSON line).

    python benchmarks/train_step.py --backbone resnet101_beta
    python benchmarks/train_step.py --backbone mobilenet_v2 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from deeplab import ModelConfig, build_model, retain_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet101_beta")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--separable", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=513)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="deeplab.retain_freed_memory() first, as the deeplab command does")
    args = p.parse_args()
    kept = retain_freed_memory() if args.keep_freed_memory else False
    cfg = ModelConfig(backbone=args.backbone, output_stride=args.output_stride, separable=args.separable, num_classes=21)
    model = build_model(cfg).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.crop, args.crop)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 21, (args.batch, args.crop, args.crop))
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "kind": "train_step", "backbone": args.backbone, "output_stride": args.output_stride, "batch": args.batch,
        "crop": args.crop, "dtype": "bf16" if args.bf16 else "fp32", "channels_last": args.channels_last,
        "freed_memory_kept": kept, "threads": torch.get_num_threads(), "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3), "max_s": round(max(times), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
