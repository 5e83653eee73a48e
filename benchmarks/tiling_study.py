"""Tiled against whole, against ground truth: mIoU of whole-image and tiled prediction on georeferenced CamVid mosaics.

The CamVid val frames (sorted, 360x480) are laid out `--grid` rows x columns into mosaics (3x4: 1080x1920 from 12
frames; leftover frames are dropped), each written as a GeoTIFF in a projected CRS (EPSG:32630, 0.1 m pixels) with
its label mosaic beside it (void 11 -> 255, the nodata and ignore value). For every `--checkpoint` it scores

    frames      every frame predicted alone at `--scale` (the usual val protocol: the photo path, `predict_probs`)
    whole       every mosaic predicted in one pass at `--scale` (the photo path: the raster tiler would pad a side
                shorter than a tile, and this is the reference the tiles are compared with)
    tTILE/pPAD  every mosaic tiled as `deeplab predict` / `deeplab eval --raster` tile it (`predict_raster`:
                `Tiling(tile, padding)` in model pixels, `scale`), the classified GeoTIFF read back

against the labels with one kind of accumulator (`MetricAccumulator`, 255 ignored), confusion matrices summed over the
mosaics; the tiled argmax is what `evaluate_raster` scores (`tests/test_benchmarks.py` checks that the confusion
matrices are equal). Photo-path passes run at the image's own size scaled by `--scale` (not a converted model's fixed
input size), as tiles do. Agreement is the share of all pixels (void included) whose class equals the whole-mosaic
prediction's.

    python benchmarks/tiling_study.py --checkpoint runs/camvid/last.pt --checkpoint runs/camvid-nopool/last.pt \\
        --scale 1.5 --tiles 257,513,1024 --paddings 0,e,q --threads 2 --json study.jsonl
    python benchmarks/tiling_study.py --checkpoint cs.pt --class-map cityscapes --frames 24   # a Cityscapes model

`--paddings`: pixels, or q (a quarter of the tile, the default padding) or e (an eighth). `--class-map cityscapes`
(or a comma list: the CamVid class of each model class) scores a model of other classes on CamVid's 11. It prints a
machine line, one JSON line per model and per configuration, and a Markdown table. ../shared/data/camvid is read
unless --data-root says otherwise; the script exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                  "bicyclist")
VOID, IGNORE = 11, 255
# Cityscapes' 19 train classes onto SegNet's CamVid 11 (SegNet's grouping: wall is building, terrain is vegetation,
# truck / bus / train are car, rider and motorcycle are bicyclist, traffic lights are sign-symbols).
CLASS_MAPS = {"cityscapes": (3, 4, 1, 1, 7, 2, 6, 6, 5, 5, 0, 9, 10, 8, 8, 8, 8, 10, 10)}
CRS, PIXEL_METRES = "EPSG:32630", 0.1


@dataclass
class Mosaic:
    """One mosaic: its GeoTIFFs, its labels (H, W) uint8 with 255 ignored, and its frames' RGB arrays and offsets."""

    image_path: Path
    labels_path: Path
    labels: np.ndarray
    frames: list[tuple[np.ndarray, int, int]]  # (rgb (h, w, 3), top, left)


def parse_grid(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not (sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise SystemExit(f"--grid {text!r}: expected ROWSxCOLUMNS, e.g. 3x4")
    return int(rows), int(cols)


def padding_pixels(token: str, tile: int) -> int:
    """`--paddings` entry in model pixels: q = tile // 4, e = tile // 8, or a number."""
    if token in ("q", "e"):
        return tile // (4 if token == "q" else 8)
    if not token.isdigit():
        raise SystemExit(f"--paddings {token!r}: expected pixels, q (a quarter of the tile) or e (an eighth)")
    return int(token)


def class_lut(spec: str | None, model_classes: int) -> np.ndarray:
    """(model_classes,) CamVid class of each model class: the identity for an 11-class model, else `--class-map`."""
    if spec is None:
        if model_classes != len(CAMVID_CLASSES):
            raise SystemExit(f"the model has {model_classes} classes, CamVid {len(CAMVID_CLASSES)}: pass --class-map "
                             f"({', '.join(CLASS_MAPS)} or a comma list of CamVid classes, one per model class)")
        return np.arange(model_classes, dtype=np.uint8)
    values = CLASS_MAPS.get(spec) or tuple(int(v) for v in spec.split(",") if v.strip().isdigit())
    if len(values) != model_classes or not all(0 <= v < len(CAMVID_CLASSES) for v in values):
        raise SystemExit(f"--class-map {spec!r}: needs {model_classes} CamVid classes (0..10), one per model class")
    return np.asarray(values, dtype=np.uint8)


def val_frames(root: Path, count: int | None) -> list[tuple[Path, Path]]:
    images = sorted((root / "val").glob("*.png"))[:count]
    if not images:
        raise SystemExit(f"{root}/val: no CamVid frames; pass --data-root (a folder with val/ and valannot/)")
    return [(p, root / "valannot" / p.name) for p in images]


def write_geotiff(path: Path, data: np.ndarray, *, nodata: int | None) -> None:
    """(bands, H, W) uint8 as a GeoTIFF in `CRS`, `PIXEL_METRES` pixels."""
    import rasterio

    transform = rasterio.Affine(PIXEL_METRES, 0.0, 500_000.0, 0.0, -PIXEL_METRES, 4_000_000.0)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="uint8", crs=CRS, transform=transform, nodata=nodata, tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate") as dst:
        dst.write(data)


def build_mosaics(frames: list[tuple[Path, Path]], grid: tuple[int, int], folder: Path) -> list[Mosaic]:
    """Mosaics of grid[0] x grid[1] frames in order, written to `folder` as NAME.tif and NAME_labels.tif."""
    from PIL import Image

    per = grid[0] * grid[1]
    if len(frames) < per:
        raise SystemExit(f"--grid {grid[0]}x{grid[1]} needs {per} frames, --frames gives {len(frames)}")
    mosaics = []
    for m in range(len(frames) // per):
        rgbs = [np.asarray(Image.open(p).convert("RGB")) for p, _ in frames[m * per:(m + 1) * per]]
        labels = [np.asarray(Image.open(p)) for _, p in frames[m * per:(m + 1) * per]]
        h, w = rgbs[0].shape[:2]
        if any(a.shape[:2] != (h, w) for a in rgbs + labels):
            raise SystemExit(f"mosaic {m}: frames of several sizes; CamVid val frames are all 360x480")
        image = np.zeros((grid[0] * h, grid[1] * w, 3), np.uint8)
        truth = np.zeros((grid[0] * h, grid[1] * w), np.uint8)
        placed = []
        for k, (rgb, lab) in enumerate(zip(rgbs, labels)):
            top, left = k // grid[1] * h, k % grid[1] * w
            image[top:top + h, left:left + w] = rgb
            truth[top:top + h, left:left + w] = np.where(lab == VOID, IGNORE, lab)
            placed.append((rgb, top, left))
        image_path, labels_path = folder / f"mosaic-{m}.tif", folder / f"mosaic-{m}_labels.tif"
        write_geotiff(image_path, image.transpose(2, 0, 1), nodata=None)  # no nodata: black pixels are imagery
        write_geotiff(labels_path, truth[None], nodata=IGNORE)
        mosaics.append(Mosaic(image_path=image_path, labels_path=labels_path, labels=truth, frames=placed))
    return mosaics


def mosaic_rgb(mosaic: Mosaic) -> np.ndarray:
    """(H, W, 3) uint8: the mosaic's frames in place (what its GeoTIFF holds)."""
    image = np.zeros((*mosaic.labels.shape, 3), np.uint8)
    for rgb, top, left in mosaic.frames:
        image[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    return image


@dataclass
class Measured:
    """One configuration over all mosaics: the summed confusion, each mosaic's classes (CamVid's), seconds."""

    acc: object  # deeplab.inference.metrics.MetricAccumulator
    classes: list[np.ndarray]
    seconds: float = 0.0

    def add(self, pred: np.ndarray, labels: np.ndarray) -> None:
        self.acc.update(torch.from_numpy(pred.astype(np.int64))[None], torch.from_numpy(labels.astype(np.int64))[None])


def new_measured() -> Measured:
    from deeplab.inference.metrics import MetricAccumulator

    return Measured(acc=MetricAccumulator(num_classes=len(CAMVID_CLASSES), ignore_index=IGNORE), classes=[])


def photo_classes(model, rgb: np.ndarray, *, scale: float, lut: np.ndarray) -> np.ndarray:
    """CamVid classes (H, W) of one image by the photo path at `scale` of its own size."""
    from deeplab.inference.predict import predict_probs

    probs = predict_probs(model, rgb, scales=(scale,), input_size=None)  # (K, H, W)
    return lut[probs.argmax(axis=0)]


def run_frames(model, mosaics: list[Mosaic], *, scale: float, lut: np.ndarray) -> Measured:
    """Every frame predicted alone (the val protocol), scored against its labels; placed as in its mosaic."""
    out = new_measured()
    for mosaic in mosaics:
        classes = np.full(mosaic.labels.shape, IGNORE, np.uint8)
        for rgb, top, left in mosaic.frames:
            started = time.perf_counter()
            pred = photo_classes(model, rgb, scale=scale, lut=lut)
            out.seconds += time.perf_counter() - started
            classes[top:top + pred.shape[0], left:left + pred.shape[1]] = pred
        out.add(classes, mosaic.labels)
        out.classes.append(classes)
    return out


def run_whole(model, mosaics: list[Mosaic], *, scale: float, lut: np.ndarray) -> Measured:
    """Every mosaic predicted in one pass by the photo path."""
    out = new_measured()
    for mosaic in mosaics:
        rgb = mosaic_rgb(mosaic)
        started = time.perf_counter()
        classes = photo_classes(model, rgb, scale=scale, lut=lut)
        out.seconds += time.perf_counter() - started
        out.add(classes, mosaic.labels)
        out.classes.append(classes)
    return out


def run_tiled(model, mosaics: list[Mosaic], *, tiling, options, scale: float, lut: np.ndarray, folder: Path
              ) -> Measured:
    """Every mosaic classified by `predict_raster` (as `deeplab predict` tiles it) into a GeoTIFF, read back."""
    import rasterio

    from deeplab.inference.raster import predict_raster

    out = new_measured()
    for i, mosaic in enumerate(mosaics):
        target = folder / f"pred-{i}-t{tiling.tile}-p{tiling.padding}.tif"
        started = time.perf_counter()
        predict_raster(model, mosaic.image_path, target, tiling=tiling, options=options, scale=scale, cog=False)
        out.seconds += time.perf_counter() - started
        with rasterio.open(target) as src:
            classes = lut[src.read(1)]
        out.add(classes, mosaic.labels)
        out.classes.append(classes)
    return out


def row_of(measured: Measured, whole: Measured, **fields) -> dict:
    """One JSON line: the fields given, mIoU, per-class IoU, agreement with the whole-mosaic prediction, seconds."""
    scores = measured.acc.compute(class_names=CAMVID_CLASSES)
    same = sum(int((a == b).sum()) for a, b in zip(measured.classes, whole.classes))
    total = sum(a.size for a in whole.classes)
    return {**fields, "miou": scores["miou"], "per_class_iou": scores["per_class_iou"],
            "pixel_accuracy": scores["pixel_accuracy"], "agreement_with_whole": same / total,
            "seconds": round(measured.seconds, 2), "pixels_scored": scores["num_pixels"],
            "confusion_matrix": measured.acc.confusion.tolist()}


def configurations(tiles: list[int], paddings: list[str], *, batch: int, scale: float
                   ) -> list[tuple[str, object, object]]:
    """(name, Tiling in model pixels, Tiling in raster pixels at `scale`) for every tile and padding; repeats dropped.
    Checked before anything runs: a tiling that cannot be exits with its one-line reason."""
    from deeplab.inference.options import InferenceOptions
    from deeplab.inference.raster import Tiling, scaled_tiling

    seen, out = set(), []
    for tile in tiles:
        for token in paddings:
            padding = padding_pixels(token, tile)
            if (tile, padding) in seen:
                continue
            seen.add((tile, padding))
            try:
                tiling = Tiling(tile=tile, padding=padding, batch=batch)
                out.append((f"t{tile}/p{padding}", tiling, scaled_tiling(tiling, InferenceOptions(), scale)[0]))
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
    return out


def model_label(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def loaded(path: str, class_map: str | None) -> tuple[object, np.ndarray]:
    """The model at `path` and its (256,) lookup from its class indices to CamVid's (255, NoData, stays 255)."""
    import deeplab

    model = deeplab.load(path)
    lut = np.full(256, IGNORE, np.uint8)
    try:
        lut[:model.config.num_classes] = class_lut(class_map, int(model.config.num_classes))
    except SystemExit as exc:
        raise SystemExit(f"{path}: {exc}") from None
    return model, lut


def study_model(path: str, model, lut: np.ndarray, mosaics: list[Mosaic], args, folder: Path) -> list[dict]:
    """The rows of one checkpoint: whole, frames, then every tiling; each printed as it is measured."""
    from deeplab.deploy.runtimes import prepare_model, runtime_name
    from deeplab.inference.options import InferenceOptions

    options = InferenceOptions(runtime=args.runtime, threads=args.threads)
    prepared = prepare_model(model, options)
    cfg = model.config
    print(json.dumps({"model": model_label(path), "checkpoint": str(path), "image_pooling": cfg.image_pooling,
                      "backbone": cfg.backbone, "decoder": cfg.decoder, "output_stride": cfg.output_stride,
                      "classes": cfg.num_classes, "class_map": args.class_map,
                      "runtime": runtime_name(prepared)}), flush=True)
    base = {"model": model_label(path), "checkpoint": str(path), "image_pooling": cfg.image_pooling,
            "scale": args.scale, "mosaics": len(mosaics), "frames": sum(len(m.frames) for m in mosaics)}
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    whole = run_whole(prepared, mosaics, scale=args.scale, lut=lut)
    emit(row_of(whole, whole, **base, config="whole", tile=None, padding=None))
    frames = run_frames(prepared, mosaics, scale=args.scale, lut=lut)
    emit(row_of(frames, whole, **base, config="frames", tile=None, padding=None))
    for name, tiling, raster in args.configurations:
        tiled = run_tiled(prepared, mosaics, tiling=tiling, options=options, scale=args.scale, lut=lut,
                          folder=folder)
        emit(row_of(tiled, whole, **base, config=name, tile=tiling.tile, padding=tiling.padding,
                    raster_tile=raster.tile, raster_padding=raster.padding))
    return rows


def summary_table(rows: list[dict]) -> str:
    """Markdown: model x configuration; mIoU, its difference to the whole mosaic's in points, agreement, seconds."""
    lines = ["| model | pooling | configuration | mIoU | vs whole (points) | agreement with whole | seconds |",
             "|---|---|---|---|---|---|---|"]
    whole = {r["checkpoint"]: r["miou"] for r in rows if r["config"] == "whole"}
    for r in rows:
        diff = 100 * (r["miou"] - whole[r["checkpoint"]])
        lines.append(f"| {r['model']} | {'yes' if r['image_pooling'] else 'no'} | {r['config']} "
                     f"| {100 * r['miou']:.2f} | {diff:+.2f} | {100 * r['agreement_with_whole']:.2f}% "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="a model to study (repeat for several)")
    p.add_argument("--data-root", default=str(CAMVID), help="CamVid with val/ and valannot/ (default ../shared)")
    p.add_argument("--frames", type=int, default=None, help="the first N sorted val frames (default: all 101)")
    p.add_argument("--grid", type=parse_grid, default=(3, 4), help="frames per mosaic, ROWSxCOLUMNS (default 3x4)")
    p.add_argument("--scale", type=float, default=1.0, help="the scale the model sees the imagery at (CamVid: 1.5)")
    p.add_argument("--tiles", default="257,513,1024", help="tile sizes in model pixels, comma-separated")
    p.add_argument("--paddings", default="0,q", help="paddings: pixels, q (tile / 4) or e (tile / 8), comma-separated")
    p.add_argument("--tile-batch", type=int, default=2)
    p.add_argument("--runtime", default="torch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--class-map", default=None, help="cityscapes, or the CamVid class of each model class (0,3,...)")
    p.add_argument("--workdir", default=None, help="keep the mosaics and tiled predictions here (default: a "
                   "temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the JSON lines to this file")
    args = p.parse_args()
    try:
        args.tiles = [int(v) for v in args.tiles.split(",")]
    except ValueError:
        raise SystemExit(f"--tiles {args.tiles!r}: expected comma-separated pixels, e.g. 257,513,1024") from None
    args.paddings = [v.strip() for v in args.paddings.split(",") if v.strip()]
    if not (args.scale > 0):
        raise SystemExit(f"--scale {args.scale}: must be a positive number")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from deeplab.data.bands import import_rasterio
    from deeplab.deploy.precision import machine_line

    root = Path(args.data_root)
    if not (root / "val").is_dir():
        sys.exit(f"{root}/val absent: pass --data-root (CamVid with val/ and valannot/, ../shared/data/camvid)")
    import_rasterio("the mosaics are GeoTIFFs")
    args.configurations = configurations(args.tiles, args.paddings, batch=args.tile_batch, scale=args.scale)
    models = {path: loaded(path, args.class_map) for path in args.checkpoint}  # every one checked before the work
    frames = val_frames(root, args.frames)
    machine = {"machine": machine_line(torch.get_num_threads())}
    print(json.dumps(machine), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        mosaics = build_mosaics(frames, args.grid, folder)
        used = sum(len(m.frames) for m in mosaics)
        print(json.dumps({"mosaics": len(mosaics), "size": "x".join(map(str, mosaics[0].labels.shape)),
                          "frames": used, "dropped": len(frames) - used, "crs": CRS, "pixel_m": PIXEL_METRES}),
              flush=True)
        for path, (model, lut) in models.items():
            rows += study_model(path, model, lut, mosaics, args, folder)
    print(summary_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for r in [machine, *rows]:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
