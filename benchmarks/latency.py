"""Inference latency at batch 1 and the share of this machine's convolution peak it reaches.

    python benchmarks/latency.py                       # the paper's configurations at 513x513
    python benchmarks/latency.py --sizes 257,513,769,1025 --configs resnet101_beta:16:dec
    python benchmarks/latency.py --bf16
    python benchmarks/latency.py --no-fast           # the plain eager model (no BN folding, NCHW, every tap)

One JSON line per result. The peak is measured in the same run with a large 3x3 convolution (fp32 and bf16); a
model's achieved GFLOP/s counts only "effective" multiply-adds (filter taps that read inside the feature map), two
FLOPs each, so padding-only taps at large atrous rates earn nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deeplab import ModelConfig, build_model, optimize_for_inference
from deeplab.profile import profile_model

PAPER_CONFIGS = [
    "resnet101_beta:16:nodec", "resnet101_beta:16:dec", "resnet101_beta:8:nodec", "resnet101_beta:8:dec",
    "xception65:16:dec", "xception65:16:dec:sep", "xception65:8:dec:sep", "mobilenet_v2:16:nodec",
]


def timed(fn, *, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.inference_mode()
def conv_peak(*, bf16: bool, runs: int) -> float:
    """GFLOP/s of a large 3x3 convolution (256 -> 256 channels on 128x128), the machine's practical peak."""
    x = torch.randn(1, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    flops = 2 * 128 * 128 * 256 * 256 * 9
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t = timed(lambda: conv(x), warmup=2, runs=runs)
    return flops / min(t) / 1e9


def parse_config(text: str) -> ModelConfig:
    parts = text.split(":")
    return ModelConfig(backbone=parts[0], output_stride=int(parts[1]), decoder="dec" in parts[2:],
                       separable="sep" in parts[2:], num_classes=21)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(PAPER_CONFIGS), help="backbone:os:dec|nodec[:sep], comma-separated")
    p.add_argument("--sizes", default="513")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="deeplab.optimize_for_inference: BN folded, channels_last, padding-only taps skipped")
    p.add_argument("--channels-last", action="store_true", help="with --no-fast: channels_last only")
    args = p.parse_args()
    peak = {"fp32": conv_peak(bf16=False, runs=args.runs), "bf16": conv_peak(bf16=True, runs=args.runs)}
    print(json.dumps({"kind": "peak", "threads": torch.get_num_threads(), "gflops_fp32": round(peak["fp32"], 1),
                      "gflops_bf16": round(peak["bf16"], 1)}), flush=True)
    dtype = "bf16" if args.bf16 else "fp32"
    for text in args.configs.split(","):
        cfg = parse_config(text)
        model = build_model(cfg).eval()
        if args.fast:
            model = optimize_for_inference(model)
        elif args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for size in (int(s) for s in args.sizes.split(",")):
            prof, _ = profile_model(cfg, size=(size, size))
            x = torch.randn(1, 3, size, size)
            if args.channels_last or args.fast:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                t = timed(lambda: model(x), warmup=args.warmup, runs=args.runs)
            med = statistics.median(t)
            achieved = 2 * prof.multiply_adds_effective / med / 1e9
            print(json.dumps({
                "kind": "latency", "config": text, "size": size, "dtype": dtype, "fast": args.fast,
                "channels_last": args.channels_last or args.fast,
                "median_ms": round(1e3 * med, 1), "min_ms": round(1e3 * min(t), 1), "max_ms": round(1e3 * max(t), 1),
                "multiply_adds_effective": prof.multiply_adds_effective, "gflops": round(achieved, 1),
                "percent_of_peak": round(100 * achieved / peak[dtype], 1),
                "ms_per_megapixel": round(1e3 * med / (size * size / 1e6), 1),
            }), flush=True)


if __name__ == "__main__":
    main()
