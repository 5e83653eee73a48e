"""segmentation_models.pytorch's DeepLabV3Plus against ours, timed in alternation (issue 6's reference).

smp cannot be a dependency (unpinned, it replaces the CPU torch with a CUDA build) and torchvision's compiled ops do
not load on a CPU-only torch. To run this comparison, install smp and its pure-Python dependencies beside the venv
without letting pip touch torch, and put them on PYTHONPATH:

    pip install --no-deps --target /tmp/smpdeps segmentation_models_pytorch timm torchvision==0.28.0 \
        "huggingface_hub==0.26.5" safetensors requests pyyaml filelock fsspec packaging
    PYTHONPATH=/tmp/smpdeps python benchmarks/smp_reference.py --size 512

torchvision's Python modules import once its two operator schemas exist; this script defines them (never the
library). Every model is built first; then each round runs every model once, in turn, so a slow spell of a shared
machine falls on all of them alike (timing one model after another lets the machine's drift decide the ranking).
One JSON line per model: median/min/max ms over the rounds at batch 1, fp32, eval mode, and multiply-adds counted
with torch's FlopCounterMode (all taps; 2 FLOPs per multiply-add, halved). smp runs as shipped (NCHW) and, with
--channels-last, also moved to channels_last; ours runs its inference fast path (`optimize_for_inference`), as
`deeplab eval` and `deeplab predict` do.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from deeplab import build_model, retain_freed_memory
from deeplab.deploy.fast import optimize_for_inference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import parse_config  # noqa: E402  (one spelling of "backbone:os:dec|nodec[:sep]" for both scripts)


def _import_smp():
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive while smp is in use)
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import segmentation_models_pytorch as smp

    return smp, lib


@torch.inference_mode()
def _gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="resnet101,tu-xception65")
    p.add_argument("--ours", default="resnet101_beta:16:dec:sep,xception65:16:dec:sep",
                   help="our configurations (backbone:os:dec|nodec[:sep]), comma-separated; empty for none")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=7, help="rounds; each runs every model once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="also time smp moved to channels_last")
    args = p.parse_args()
    retain_freed_memory()  # the same allocator for both libraries (the deeplab command sets it)
    smp, _lib = _import_smp()
    x = torch.randn(1, 3, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    entries = []  # (name, channels_last, model, input)
    for encoder in args.encoders.split(","):
        model = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, classes=21).eval()
        entries.append((f"smp.DeepLabV3Plus({encoder})", False, model, x))
        if args.channels_last:
            entries.append((f"smp.DeepLabV3Plus({encoder})", True,
                            copy.deepcopy(model).to(memory_format=torch.channels_last), x_cl))
    for text in filter(None, args.ours.split(",")):
        entries.append((f"deeplab {text}", True, optimize_for_inference(build_model(parse_config(text))), x_cl))
    gmacs = [_gmacs(m, inp) for _, _, m, inp in entries]
    times = [[] for _ in entries]
    with torch.inference_mode():
        for _ in range(args.warmup):
            for _, _, m, inp in entries:
                m(inp)
        for _ in range(args.runs):
            for i, (_, _, m, inp) in enumerate(entries):
                t0 = time.perf_counter()
                m(inp)
                times[i].append(1000 * (time.perf_counter() - t0))
    for (name, cl, _, _), g, t in zip(entries, gmacs, times):
        print(json.dumps({
            "model": name, "size": args.size, "threads": torch.get_num_threads(), "channels_last": cl,
            "gmacs": round(g, 2), "ms_median": round(statistics.median(t), 1), "ms_min": round(min(t), 1),
            "ms_max": round(max(t), 1),
        }), flush=True)


if __name__ == "__main__":
    main()
