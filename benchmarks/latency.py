"""Inference latency at batch 1 and the share of this machine's convolution peak it reaches.

    python benchmarks/latency.py                       # the paper's configurations at 513x513
    python benchmarks/latency.py --sizes 257,513,769,1025 --configs resnet101_beta:16:dec
    python benchmarks/latency.py --bf16
    python benchmarks/latency.py --no-fast           # the plain eager model (no BN folding, NCHW, every tap)
    python benchmarks/latency.py --configs resnet101_beta:16:dec,resnet101_beta:16:dec:compile
                                                     # ":compile": torch.compile (inductor, freezing) on top

One JSON line per result. The peak is measured in the same run with a large 3x3 convolution (fp32 and bf16); a
model's achieved GFLOP/s counts only "effective" multiply-adds (filter taps that read inside the feature map), two
FLOPs each, so padding-only taps at large atrous rates earn nothing.

Timing is interleaved, because this kind of machine (a shared VM) drifts by 10-30% over minutes: each of the --runs
rounds runs the peak convolution (three times) and then the model once at every size, in turn. A model's median is
over the rounds; its percentage of peak compares like with like: its median against the median of the peak runs
(`percent_of_peak`), and its fastest run against the fastest peak run (`percent_of_best_peak`). Sizes measured in
the same rounds make the cost per megapixel comparable across sizes (`spread_per_megapixel`: slowest over fastest
size, minus one, on the medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deeplab import ModelConfig, build_model, retain_freed_memory
from deeplab.deploy.fast import optimize_for_inference, prepack_weights
from deeplab.models.profile import profile_model

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


def _peak_problem() -> tuple[torch.Tensor, torch.nn.Module, int]:
    """A large 3x3 convolution (256 -> 256 channels on 128x128, channels_last) and its FLOPs: the practical peak.

    It runs on a prepacked weight, as the fast path's convolutions do (without autocast: under bf16 autocast the
    prepacked path stands aside and it is a plain conv)."""
    x = torch.randn(1, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last).requires_grad_(False)
    prepack_weights(conv, shapes=1)
    return x, conv, 2 * 128 * 128 * 256 * 256 * 9


@torch.inference_mode()
def conv_peak(*, bf16: bool, runs: int) -> float:
    """GFLOP/s of the peak convolution, its fastest of `runs`."""
    x, conv, flops = _peak_problem()
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
    p.add_argument("--runs", type=int, default=7, help="rounds; each runs the peak conv and every size once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="deeplab.optimize_for_inference: BN folded, channels_last, padding-only taps skipped")
    p.add_argument("--channels-last", action="store_true", help="with --no-fast: channels_last only")
    p.add_argument("--prepacked-shapes", type=int, default=4,
                   help="optimize_for_inference's prepacked_shapes (0: oneDNN reorders the weights on every call)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="deeplab.retain_freed_memory() first, as the deeplab command does")
    args = p.parse_args()
    kept = retain_freed_memory() if args.keep_freed_memory else False
    peak = {"fp32": conv_peak(bf16=False, runs=args.runs), "bf16": conv_peak(bf16=True, runs=args.runs)}
    print(json.dumps({"kind": "peak", "threads": torch.get_num_threads(), "gflops_fp32": round(peak["fp32"], 1),
                      "gflops_bf16": round(peak["bf16"], 1), "freed_memory_kept": kept}), flush=True)
    dtype = "bf16" if args.bf16 else "fp32"
    sizes = [int(s) for s in args.sizes.split(",")]
    x_peak, conv_peak_layer, peak_flops = _peak_problem()
    for text in args.configs.split(","):
        cfg = parse_config(text)
        model = build_model(cfg).eval()
        if args.fast:
            model = optimize_for_inference(model, prepacked_shapes=args.prepacked_shapes)
        elif args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if "compile" in text.split(":")[2:]:
            # freezing: the weights become constants, so inductor folds them and prepacks them for oneDNN
            model = torch.compile(model, options={"freezing": True})
        inputs = {}
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            inputs[size] = x.contiguous(memory_format=torch.channels_last) if args.channels_last or args.fast else x
        times = {size: [] for size in sizes}
        peak_times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            first_call = {}  # includes compilation with ":compile"
            for _ in range(args.warmup):
                for size in sizes:
                    first_call.setdefault(size, timed(lambda: model(inputs[size]), warmup=0, runs=1)[0])
            for _ in range(args.runs):
                peak_times += timed(lambda: conv_peak_layer(x_peak), warmup=0, runs=3)
                for size in sizes:
                    times[size] += timed(lambda: model(inputs[size]), warmup=0, runs=1)
        peak_median = peak_flops / statistics.median(peak_times) / 1e9
        peak_best = peak_flops / min(peak_times) / 1e9
        per_mp = {}
        for size in sizes:
            prof, _ = profile_model(cfg, size=(size, size))
            t = times[size]
            med = statistics.median(t)
            achieved = 2 * prof.multiply_adds_effective / med / 1e9
            achieved_best = 2 * prof.multiply_adds_effective / min(t) / 1e9
            per_mp[size] = 1e3 * med / (size * size / 1e6)
            print(json.dumps({
                "kind": "latency", "config": text, "size": size, "dtype": dtype, "fast": args.fast,
                "channels_last": args.channels_last or args.fast, "threads": torch.get_num_threads(),
                "median_ms": round(1e3 * med, 1), "min_ms": round(1e3 * min(t), 1), "max_ms": round(1e3 * max(t), 1),
                "multiply_adds_effective": prof.multiply_adds_effective, "gflops": round(achieved, 1),
                "peak_gflops_median": round(peak_median, 1), "percent_of_peak": round(100 * achieved / peak_median, 1),
                "peak_gflops_best": round(peak_best, 1),
                "percent_of_best_peak": round(100 * achieved_best / peak_best, 1),
                "ms_per_megapixel": round(per_mp[size], 1),
                "first_call_s": round(first_call[size], 2) if size in first_call else None,
            }), flush=True)
        if len(sizes) > 1:
            print(json.dumps({
                "kind": "flatness", "config": text, "sizes": sizes,
                "ms_per_megapixel": [round(per_mp[s], 1) for s in sizes],
                "spread_per_megapixel": round(max(per_mp.values()) / min(per_mp.values()) - 1, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
