"""Peak memory and megapixels per second of `deeplab predict` on one large GeoTIFF.

    python benchmarks/raster_memory.py                              # 8192 x 8192 RGB, MobileNetV2 DeepLabv3+
    python benchmarks/raster_memory.py --size 16384 --tile-batch 8   # more pixels, more tiles per call
    python benchmarks/raster_memory.py --backbone resnet50 --no-separable --size 4096
    python benchmarks/raster_memory.py --width 100000 --height 2048 --tiny   # a very wide strip, a tiny fast model

It writes an orthophoto-like RGB GeoTIFF (parcels of field colours, roads, roof blocks, noise; UTM georeference)
block row by block row, so the raster is never in memory whole, saves a checkpoint of the model asked for (random
weights: speed and memory do not depend on them), and runs `deeplab predict` on the raster in a child process, as a
user would. It prints one JSON line: the raster, the settings, the seconds, megapixels per second, and the child's
peak resident memory (`ru_maxrss`), against the target of 1.5 GB for 8192 x 8192. The raster and the checkpoint are
written to --workdir (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MIB = 1536  # the issues' bound for an 8192 x 8192 RGB raster, and for one of 100,000 x 2,048


def write_orthophoto(path: Path, size: int, *, height: int | None = None, rows_per_write: int = 512) -> None:
    """An RGB uint8 GeoTIFF of `size` (wide) x `height` (default `size`) that looks like farmland seen from above,
    written strip by strip."""
    import rasterio
    from rasterio.windows import Window

    colours = np.array([[96, 128, 60], [150, 140, 90], [70, 100, 50], [180, 170, 120], [120, 90, 70]], np.float32)
    transform = rasterio.Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 4_000_000.0)  # 25 cm pixels, UTM 33N
    height = height or size
    rows_per_write = max(256, min(rows_per_write, 2**22 // size // 256 * 256))  # a few hundred MB of float32 at most
    with rasterio.open(path, "w", driver="GTiff", width=size, height=height, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                       BIGTIFF="IF_SAFER") as dst:
        xs = np.arange(size)
        for top in range(0, height, rows_per_write):
            rows = min(rows_per_write, height - top)
            y = np.arange(top, top + rows)[:, None]
            parcel = ((xs[None] // 300) * 7 + (y // 250) * 13 + (xs[None] // 900) * (y // 700)) % len(colours)
            image = colours[parcel]  # (rows, size, 3)
            road = ((xs[None] % 1000) < 12) | ((y % 1300) < 10)
            roof = ((xs[None] % 600) > 420) & ((y % 500) > 380)
            image[road] = (200, 200, 200)
            image[roof & ~road] = (160, 60, 50)
            image += np.random.default_rng(top).normal(0, 8, image.shape).astype(np.float32)
            dst.write(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1), window=Window(0, top, size, rows))


def save_model(path: Path, *, backbone: str, separable: bool, classes: int, tiny: bool = False) -> None:
    import torch

    from deeplab import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    names = ["field", "meadow", "forest", "bare soil", "road", "building"][:classes]
    names += [f"class_{i}" for i in range(len(names), classes)]
    cfg = (ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=classes, decoder=False,
                       atrous_rates=(2,), aspp_channels=16) if tiny else
           ModelConfig(backbone=backbone, num_classes=classes, separable=separable))
    model = build_model(cfg, class_names=names)
    save_checkpoint(model.eval(), path)


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{fields.get('Model name', 'unknown').strip()} ({', '.join(wanted) or 'no avx2'}), {os.cpu_count()} CPUs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192, help="raster side in pixels (default %(default)s)")
    p.add_argument("--width", type=int, default=None, help="raster width, for a raster that is not square")
    p.add_argument("--height", type=int, default=None, help="raster height, for a raster that is not square")
    p.add_argument("--tiny", action="store_true", help="a tiny fast model (MobileNetV2 x0.25, 16-channel ASPP, no "
                   "decoder): memory of the raster's buffers rather than of the network")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--separable", action=argparse.BooleanOptionalAction, default=True,
                   help="atrous separable ASPP and decoder (default on)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tile-batch", type=int, default=2)
    p.add_argument("--runtime", default="torch", help="deeplab predict --runtime (default torch, the fast path)")
    p.add_argument("--threads", type=int, default=None, help="deeplab predict --threads (default: PyTorch's)")
    p.add_argument("--workdir", default=None, help="keep the raster, checkpoint and prediction here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        raster, ckpt = work / "orthophoto.tif", work / "model.pt"
        width, height = args.width or args.size, args.height or args.size
        if not raster.is_file() or args.workdir is None:
            write_orthophoto(raster, width, height=height)
        save_model(ckpt, backbone=args.backbone, separable=args.separable, classes=args.classes, tiny=args.tiny)
        command = [sys.executable, "-m", "deeplab", "predict", "--checkpoint", str(ckpt), str(raster), "--out",
                   str(work / "pred"), "--tile", str(args.tile), "--tile-batch", str(args.tile_batch), "--runtime",
                   args.runtime, "--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            sys.exit(f"deeplab predict failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        line = next((ln for ln in run.stdout.splitlines() if "Mpx/s" in ln), "")
        predict_s = float(line.split(" in ")[1].split(" s ")[0]) if line else seconds
        megapixels = width * height / 1e6
        model = ("DeepLabv3 mobilenet_v2 x0.25, ASPP 16" if args.tiny else
                 f"DeepLabv3+ {args.backbone}{' separable' if args.separable else ''}")
        print(json.dumps({
            "raster": f"{width}x{height} RGB uint8", "megapixels": round(megapixels, 1),
            "model": f"{model}, {args.classes} classes", "cog": True,
            "tile": args.tile, "padding": args.tile // 4, "tile_batch": args.tile_batch, "runtime": args.runtime,
            "threads": args.threads, "predict_seconds": round(predict_s, 1), "process_seconds": round(seconds, 1),
            "megapixels_per_second": round(megapixels / predict_s, 3), "peak_rss_mib": round(peak_mib),
            "target_mib": TARGET_MIB if width * height <= 8192 * 8192 or height <= 2048 else None, "cpu": cpu_model(),
        }))


if __name__ == "__main__":
    main()
