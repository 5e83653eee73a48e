"""segmentation_models.pytorch's DeepLabV3Plus, timed the way benchmarks/latency.py times ours (issue 6's reference).

smp cannot be a dependency (unpinned, it replaces the CPU torch with a CUDA build) and torchvision's compiled ops do
not load on a CPU-only torch. To run this comparison, install smp and its pure-Python dependencies beside the venv
without letting pip touch torch, and put them on PYTHONPATH:

    pip install --no-deps --target /tmp/smpdeps segmentation_models_pytorch timm torchvision==0.28.0 \
        "huggingface_hub==0.26.5" safetensors requests pyyaml filelock fsspec packaging
    PYTHONPATH=/tmp/smpdeps python benchmarks/smp_reference.py --size 512

torchvision's Python modules import once its two operator schemas exist; this script defines them (never the
library). One JSON line per model: median/min/max ms at batch 1, fp32, eval mode, and multiply-adds counted with
torch's FlopCounterMode (all taps; 2 FLOPs per multiply-add, halved).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _import_smp():
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive while smp is in use)
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import segmentation_models_pytorch as smp

    return smp, lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="resnet101,tu-xception65")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    smp, _lib = _import_smp()
    from torch.utils.flop_counter import FlopCounterMode

    for encoder in args.encoders.split(","):
        model = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, classes=21).eval()
        x = torch.randn(1, 3, args.size, args.size)
        if args.channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                model(x)
            for _ in range(args.warmup):
                model(x)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                model(x)
                times.append(1000 * (time.perf_counter() - t0))
        print(json.dumps({
            "model": f"smp.DeepLabV3Plus({encoder})", "size": args.size, "threads": torch.get_num_threads(),
            "channels_last": args.channels_last, "gmacs": round(counter.get_total_flops() / 2e9, 2),
            "ms_median": round(statistics.median(times), 1), "ms_min": round(min(times), 1),
            "ms_max": round(max(times), 1),
        }), flush=True)


if __name__ == "__main__":
    main()
