"""CamVid val report for trained checkpoints: mIoU, per-class IoU, trimap curve and ms per 360x480 image.

The training runs themselves are `deeplab train` commands (docs/camvid.md). This script scores
what they wrote, each variant on the 101 val images at native 360x480 with void (11) ignored, and prints one JSON
line per variant. A variant is LABEL=CHECKPOINT[:option,...] with options

    os8        evaluate at output stride 8 (the model was trained at 16)
    crf        refine with the dense CRF (DeepLab v2 defaults, pure-torch backend)
    bf16       bf16 autocast
    coarse     a PointRend checkpoint without its subdivision (the coarse DeepLab prediction)
    sX         run at scale X of the image (e.g. s1.5); several sX: multi-scale, their probabilities averaged
    flip       add the mirrored image (each scale)

    python benchmarks/camvid.py --variant plain=runs/camvid-voc/last.pt \\
        --variant crf=runs/camvid-voc/last.pt:crf --variant pointrend=runs/camvid-voc-pointrend/last.pt \\
        --plot docs/camvid-trimap.png

../shared/data/camvid is used unless --data-root says otherwise; the script exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import deeplab
from deeplab.data import EvalTransform, build_dataset
from deeplab.data.transforms import denormalize
from deeplab.deploy.fast import optimize_for_inference, retain_freed_memory
from deeplab.deploy.runners import EXPORTED_SUFFIXES, load_exported
from deeplab.inference.crf import CRFParams, dense_crf
from deeplab.inference.evaluate import evaluate
from deeplab.inference.segment import segment_probs

OPTIONS = ("os8", "crf", "bf16", "coarse", "flip")
TRIMAP_WIDTHS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40)


def parse_variant(text: str) -> tuple[str, str, set[str]]:
    label, sep, rest = text.partition("=")
    if not sep:
        raise SystemExit(f"--variant {text!r}: expected LABEL=CHECKPOINT[:option,...]")
    path, _, opts = rest.partition(":")
    options = {o for o in opts.split(",") if o}
    unknown = {o for o in options - set(OPTIONS) if not _scale(o)}
    if unknown:
        raise SystemExit(f"--variant {text!r}: unknown options {sorted(unknown)}; choose from {OPTIONS}")
    return label, path, options


def _scale(option: str) -> float | None:
    try:
        return float(option[1:]) if option.startswith("s") and float(option[1:]) > 0 else None
    except ValueError:
        return None


def scales_of(options: set[str]) -> tuple[float, ...]:
    return tuple(sorted(s for o in options if (s := _scale(o)))) or (1.0,)


def prepared_model(path: str, options: set[str]) -> torch.nn.Module:
    if Path(path).suffix.lower() in EXPORTED_SUFFIXES:  # an exported (e.g. int8) file, run by its runtime
        return load_exported(path)
    model = deeplab.load(path)
    if "coarse" in options:  # as `deeplab eval --no-pointrend`: the coarse prediction, resized
        model.config = model.config.replace(pointrend_steps=0)
    if "os8" in options:
        model = model.with_output_stride(8)
    return optimize_for_inference(model.eval())


def ms_per_image(
    model, dataset, *, crf: CRFParams | None, amp: str, count: int, scales: tuple[float, ...], flip: bool
) -> dict[str, float]:
    """Median, min and max milliseconds for one image (network, upsampling, CRF, argmax), after one warm-up."""
    times = []
    for i in range(count + 1):
        image, _ = dataset[i % len(dataset)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = segment_probs(model, image[None], amp=amp, scales=scales, flip=flip)
            if crf is not None:
                probs = dense_crf(denormalize(image, model.preprocessing), probs[0], params=crf)[None]
            probs.argmax(1)
        if i:
            times.append(1000 * (time.perf_counter() - t0))
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help="LABEL=CHECKPOINT[:os8,crf,bf16,coarse,sX,flip]")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    p.add_argument("--limit", type=int, default=None, help="first N val images only (quick checks)")
    p.add_argument("--timing-images", type=int, default=10)
    p.add_argument("--plot", default=None, help="write the trimap curves of all variants to this PNG")
    args = p.parse_args()
    if not (Path(args.data_root) / "val.txt").is_file():
        sys.exit(f"CamVid not found at {args.data_root} (expected val.txt there); pass --data-root")
    retain_freed_memory()  # as the deeplab command does

    curves = {}
    for label, path, options in map(parse_variant, args.variant):
        model = prepared_model(path, options)
        dataset = build_dataset("camvid", root=args.data_root, split="val",
                                transform=EvalTransform(mean=model.preprocessing.mean, std=model.preprocessing.std))
        crf = CRFParams() if "crf" in options else None
        amp = "bf16" if "bf16" in options else "off"
        inference = {"scales": scales_of(options), "flip": "flip" in options}
        started = time.perf_counter()
        result = evaluate(model, dataset, input_size=None, trimap_widths=TRIMAP_WIDTHS, limit=args.limit,
                          amp=amp, crf=crf, **inference)
        eval_seconds = time.perf_counter() - started
        timing = ms_per_image(model, dataset, crf=crf, amp=amp, count=args.timing_images, **inference)
        curves[label] = result["trimap"]
        print(json.dumps({
            "variant": label, "checkpoint": path, "options": sorted(options), "miou": result["miou"],
            "pixel_accuracy": result["pixel_accuracy"], "per_class_iou": result["per_class_iou"],
            "trimap": result["trimap"], "images": result["num_images"], "threads": torch.get_num_threads(),
            "eval_seconds": round(eval_seconds, 1), **timing,
        }), flush=True)
    if args.plot:
        from deeplab.inference.plots import plot_trimap

        plot_trimap(curves, path=args.plot, title="CamVid val: mIoU within a band around object boundaries")


if __name__ == "__main__":
    main()
