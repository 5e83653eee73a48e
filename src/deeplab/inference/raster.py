"""Rasters of any size: a GeoTIFF (anything GDAL reads) in, a classified GeoTIFF out, window by window.

The choices, written down once:

* **Tiles** of `tile` x `tile` pixels start every `stride = tile - 2 * padding` pixels from the raster's corner, and
  the last tile of a row or column is moved back to end at the raster's edge, as the sliding window places them
  (`deeplab.inference.segment.window_starts`): no tile reaches outside a raster larger than a tile, so the model
  never sees made-up pixels at the raster's border. (ArcGIS's Classify Pixels Using Deep Learning starts its tiles
  at -padding and pads outside the raster; its default padding is tile / 4, which is the default here: a stride of
  half a tile.) A raster side shorter than a tile gets one tile, filled beyond the raster with the band means (0
  once normalised), as the sliding window pads photos.
* **Blending**: ArcGIS keeps each tile's centre and drops its padding, which leaves a seam wherever two centres
  disagree. Here every tile's class probabilities (the model's softmax, averaged over `scales` and `flip` as
  `deeplab.inference.segment.segment_probs` does) enter the output with a weight that falls from the tile's centre
  to its edges, w(i) = max(sin^2(pi (i + 0.5) / tile), 0.001) along each axis and their product over the tile, and
  every pixel gets the weighted mean of the tiles covering it. At the default stride of half a tile, neighbouring
  sin^2 windows sum to one (sin^2 + cos^2), so the blend is an even crossfade; the floor keeps a pixel covered by
  one tile's edge alone defined. The argmax of the blend is the class.
* **NoData**: a source pixel is NoData where GDAL's mask says so (the nodata value, an alpha band, an internal
  mask). It is fed to the model as the band means and comes out as 255, the output's nodata value. A tile without
  one valid pixel is not run.
* **Memory** is bounded by the tile batch and one strip of tiles, not by the raster: the raster is processed in
  column chunks (as wide as `MAX_BUFFER_BYTES` of blended probabilities allows, a multiple of the output's 256-pixel
  blocks), each chunk row of tiles by row of tiles; a strip of the output is final once no later tile row reaches
  it, and is written then (whole 256-row block rows at a time, so every compressed block is written once). Tiles
  that straddle a chunk border run once for each chunk. GDAL's block cache is held to `GDAL_CACHE_MB` meanwhile
  (its default, 5% of the machine's memory, would otherwise fill with the source's blocks).

The output NAME.tif: one uint8 band of class indices, the source's size, CRS and transform, nodata 255, a colour table
(the model's palette) and the class names (band metadata `class_I`, and GDAL category names in NAME.tif.aux.xml),
tiled 256 x 256 and DEFLATE-compressed. With `probs`, NAME_probs.tif beside it holds one band per class of
probabilities stored as 16-bit floats (Float32 with NBITS=16: a GeoTIFF's bands share one sample type, so they cannot
be extra bands of the uint8 file; GDAL reads them as Float32), NaN at NoData.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.bands import RASTER_SUFFIXES, import_rasterio
from ..deploy.runtimes import prepare_model, runtime_name
from .options import InferenceOptions
from .geotiff import (
    BLOCK,
    NODATA,
    BlockRows,
    describe_classes,
    geotiff_profile,
    nothing,
    to_cog,
    write_category_names,
)
from .segment import segment_probs

GDAL_CACHE_MB = 64  # GDAL's block cache while a raster is read and written (its default is 5% of the machine's RAM)
MERGE_COLUMNS = 8192  # columns copied at a time when the parts of a shared raster are merged
# The blended probabilities of one strip of tiles, at most (sets the chunk width: 8192 columns of 6 classes at tile
# 512). The strip's image, its copies and the written rows add about as much again, whatever the raster's width.
MAX_BUFFER_BYTES = 128 * 2**20
WEIGHT_FLOOR = 1e-3
MIN_TILE = 512  # the default tile, or the model's fixed input size when larger (`default_tiling`)

__all__ = ["RASTER_SUFFIXES", "RasterResult", "Tiling", "default_tiling", "evaluate_raster", "predict_raster",
           "raster_scale", "row_bands", "scaled_tiling", "tile_weight", "tiling_note"]


@dataclass(frozen=True)
class Tiling:
    """Tiles of `tile` pixels stepping by `tile - 2 * padding` (module docstring); `batch` tiles per call."""

    tile: int = 512
    padding: int | None = None  # None: tile // 4, as ArcGIS
    batch: int = 2  # each tile of 512 adds about 200 MB (MobileNetV2 DeepLabv3+ on CPU): docs/geo.md

    def __post_init__(self) -> None:
        if self.padding is None:
            object.__setattr__(self, "padding", self.tile // 4)
        if self.tile < 17:
            raise ValueError(f"--tile {self.tile}: must be at least 17 pixels (e.g. 512)")
        if not 0 <= self.padding < self.tile / 2:
            raise ValueError(f"--padding {self.padding}: must be 0 or more and below half of --tile {self.tile} "
                             f"(default {self.tile // 4}, a quarter of the tile, as ArcGIS)")
        if self.batch < 1:
            raise ValueError(f"--tile-batch {self.batch}: must be a positive number of tiles")

    @property
    def stride(self) -> int:
        return self.tile - 2 * self.padding

    def starts(self, length: int) -> list[int]:
        """Tile offsets along a side of `length` pixels: 0, stride, 2 * stride, ... and a last tile ending at the
        raster's edge (one tile at 0 when the side is no longer than a tile)."""
        if length <= self.tile:
            return [0]
        return list(range(0, length - self.tile, self.stride)) + [length - self.tile]


def tile_weight(tile: int) -> torch.Tensor:
    """(tile, tile) float32 blending weight: sin^2 along each axis with a floor, outer product (module docstring)."""
    i = torch.arange(tile, dtype=torch.float64)
    w = torch.sin(math.pi * (i + 0.5) / tile).pow(2).clamp_min(WEIGHT_FLOOR)
    return (w[:, None] * w[None, :]).float()


@dataclass
class RasterResult:
    """What `predict_raster` wrote and how fast."""

    path: Path
    probs_path: Path | None
    megapixels: float
    seconds: float
    runtime: str = ""

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / max(self.seconds, 1e-9)


def _open(path: str | os.PathLike):
    rasterio = import_rasterio(f"{path}: reading rasters (GeoTIFF)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such raster file; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioError as exc:
        raise ValueError(f"{path}: cannot open it as a raster ({exc}); pass a GeoTIFF or another file GDAL reads") from None


def _image_bands(src, model: nn.Module) -> list[int]:
    """The 1-based band indexes the model reads: every band but alpha, which must be as many as the model's bands."""
    from rasterio.enums import ColorInterp

    wanted = int(getattr(getattr(model, "config", None), "in_channels", 3))
    bands = [i + 1 for i, c in enumerate(src.colorinterp) if c != ColorInterp.alpha] or list(range(1, src.count + 1))
    if len(bands) != wanted:
        raise ValueError(f"{src.name}: {len(bands)} image band(s) but the model reads {wanted} (it was trained on "
                         f"{wanted}-band imagery); predict rasters of the bands it was trained on")
    return bands


class _Blender:
    """Blended probabilities of one column chunk, a strip of tile rows at a time (the module docstring)."""

    def __init__(self, model: nn.Module, src, tiling: Tiling, opts: InferenceOptions, bands: list[int],
                 columns: tuple[int, int]) -> None:
        self.model, self.src, self.tiling, self.opts, self.bands = model, src, tiling, opts, bands
        self.x0, self.x1 = columns
        t = tiling.tile
        self.tiles_x = [x for x in tiling.starts(src.width) if x < self.x1 and x + t > self.x0]
        self.e0 = self.tiles_x[0]  # the chunk's tiles span columns e0 .. e0 + width
        self.width = self.tiles_x[-1] + t - self.e0
        pre = model.preprocessing
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
        self.weight = tile_weight(t)
        self.k = int(model.config.num_classes)
        self.acc = torch.zeros(self.k, t, self.width)  # weighted probability sums of rows top .. top + tile
        self.wsum = torch.zeros(t, self.width)

    def _strip(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image (C, tile, width) of the rows top .. top + tile (band means outside the raster and at
        NoData) and its validity (tile, width)."""
        from rasterio.windows import Window

        t, src = self.tiling.tile, self.src
        image = torch.zeros(len(self.bands), t, self.width)
        valid = torch.zeros(t, self.width, dtype=torch.bool)
        r0, r1 = max(0, top), min(src.height, top + t)
        c0, c1 = max(0, self.e0), min(src.width, self.e0 + self.width)
        if r1 > r0 and c1 > c0:
            window = Window(c0, r0, c1 - c0, r1 - r0)
            inside = (slice(r0 - top, r1 - top), slice(c0 - self.e0, c1 - self.e0))
            mask = torch.from_numpy(src.dataset_mask(window=window) > 0)
            data = image[:, inside[0], inside[1]]  # normalised in place: no full-strip temporaries
            data.copy_(torch.from_numpy(src.read(self.bands, window=window)))
            data.sub_(self.mean).div_(self.std).mul_(mask).nan_to_num_(0.0, 0.0, 0.0)
            valid[inside] = mask
        return image, valid

    @torch.no_grad()
    def add_row(self, top: int) -> None:
        """Run and blend the tiles of the tile row starting at `top`, `tiling.batch` at a time."""
        t, opts = self.tiling.tile, self.opts
        image, valid = self._strip(top)
        offsets = [x - self.e0 for x in self.tiles_x if valid[:, x - self.e0 : x - self.e0 + t].any()]
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        for i in range(0, len(offsets), self.tiling.batch):
            chunk = offsets[i : i + self.tiling.batch]
            x = torch.stack([image[:, :, o : o + t] for o in chunk]).to(device)  # (B, C, tile, tile)
            probs = segment_probs(self.model, x, scales=opts.scales, flip=opts.flip,
                                  input_size=opts.input_size if isinstance(opts.input_size, tuple) else None,
                                  amp=opts.amp).float().cpu()  # (B, K, tile, tile)
            for o, p in zip(chunk, probs):
                self.acc[:, :, o : o + t] += p * self.weight
                self.wsum[:, o : o + t] += self.weight

    def final(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the weighted probability sums (K, rows, x1 - x0) and the weight sums (rows, x1 - x0) of the first
        `rows` buffered rows (final: no later tile row reaches them), output columns only; valid until `advance`."""
        cols = slice(self.x0 - self.e0, self.x1 - self.e0)
        return self.acc[:, :rows, cols], self.wsum[:rows, cols]

    def advance(self, rows: int) -> None:
        """Move the buffer down by `rows`: its first row becomes the next tile row's top."""
        kept = self.tiling.tile - rows  # rows the next tile row adds to: moved up, the rest zeroed
        if kept > 0:  # class by class: the temporary copy is one class's rows, not the whole buffer
            for k in range(self.k):
                self.acc[k, :kept] = self.acc[k, rows:].clone()
            self.wsum[:kept] = self.wsum[rows:].clone()
        self.acc[:, max(kept, 0):] = 0
        self.wsum[max(kept, 0):] = 0


@dataclass
class Strip:
    """Rows `row` .. `row + h` of columns `column` .. `column + w` of the blended prediction, final. `sums` and
    `weights` are views into the blending buffer: use them before asking for the next strip."""

    row: int
    column: int
    sums: torch.Tensor  # (K, h, w) weighted sums of the tiles' probabilities
    weights: torch.Tensor  # (h, w) sums of the tiles' weights, positive
    valid: np.ndarray  # (h, w) bool: not NoData in the source

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weights.shape[0]), int(self.weights.shape[1])

    def labels(self) -> np.ndarray:
        """(h, w) uint8 class indices, NODATA where the source is NoData. The argmax of the sums is the argmax of the
        probabilities: each pixel's sums share one positive weight."""
        labels = argmax_classes(self.sums).numpy()
        labels[~self.valid] = NODATA
        return labels

    def probabilities(self) -> torch.Tensor:
        """(K, h, w) float32 blended probabilities."""
        return self.sums / self.weights.clamp_min(1e-12)


def _column_chunks(width: int, tiling: Tiling, classes: int) -> list[tuple[int, int]]:
    """Output column ranges, each a multiple of the 256-pixel block wide, with buffers under MAX_BUFFER_BYTES."""
    per_column = 4 * (classes + 1) * tiling.tile
    columns = max(BLOCK, (MAX_BUFFER_BYTES // per_column - 2 * tiling.tile) // BLOCK * BLOCK)
    return [(x, min(width, x + columns)) for x in range(0, width, columns)]


def blended_strips(model: nn.Module, src, tiling: Tiling, opts: InferenceOptions, *, bar: Any = None,
                   rows: tuple[int, int] | None = None) -> Iterator[Strip]:
    """The blended prediction of the raster `src`, strip by strip (each strip's rows final): column chunks left to
    right, rows top to bottom within each. `rows` (first, end): only the strips of those raster rows, computed from
    the same tiles, in the same order, as for the whole raster (so a band of rows equals that band of the whole)."""
    from rasterio.windows import Window

    bands = _image_bands(src, model)
    starts_y = tiling.starts(src.height)
    r0, r1 = rows or (0, src.height)
    for x0, x1 in _column_chunks(src.width, tiling, int(model.config.num_classes)):
        blender = _Blender(model, src, tiling, opts, bands, (x0, x1))
        for r, top in enumerate(starts_y):
            if top + tiling.tile <= r0:  # above the band: the buffer stays empty, so it needs no moving
                continue
            if top >= r1:
                break
            blender.add_row(top)
            # Rows above the next tile row's top are final; after the last tile row, every row left.
            end = src.height if r == len(starts_y) - 1 else starts_y[r + 1]
            sums, weights = blender.final(end - top)  # rows top .. end
            first, last = max(r0, top), min(r1, end)  # the rows inside the raster and the band
            if last > first:
                valid = src.dataset_mask(window=Window(x0, first, x1 - x0, last - first)) > 0
                part = slice(first - top, last - top)
                yield Strip(row=first, column=x0, sums=sums[:, part], weights=weights[part], valid=valid)
                if bar is not None:
                    bar.update((last - first) * (x1 - x0) / 1e6)
            blender.advance(end - top)  # the buffer now starts at the next tile row's top


def row_bands(height: int, world_size: int) -> list[tuple[int, int]]:
    """`world_size` consecutive bands of rows, split at multiples of the 256-row block (some may be empty)."""
    cuts = [min(height, round(height * i / world_size / BLOCK) * BLOCK) for i in range(world_size)] + [height]
    return list(zip(cuts[:-1], cuts[1:]))


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """argmax over dim 0 of (K, h, w) as uint8 (h, w), the first class on ties as torch.argmax: a running maximum,
    one elementwise pass per class (torch's argmax over the outer dimension is several times slower on CPU)."""
    best = probs[0].clone()
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for k in range(1, probs.shape[0]):
        labels.masked_fill_(probs[k] > best, k)
        torch.maximum(best, probs[k], out=best)
    return labels


def _checked_options(model: nn.Module, options: InferenceOptions | None, inference: dict[str, Any]
                     ) -> InferenceOptions:
    from .options import resolve_input_size

    opts = InferenceOptions.of(options, **inference)
    if opts.window is not None or opts.crf is not None:
        raise ValueError("--window and --crf apply to photos; a raster is tiled with --tile and --padding (and is "
                         "not CRF-refined)")
    if len(getattr(model, "class_names", ())) > 255:
        raise ValueError(f"a uint8 class raster holds classes 0..254 (255 is NoData); this model has "
                         f"{len(model.class_names)}")
    # "model": tiles run at their own size (the fixed size only sets the default tile: `default_tiling`); a size
    # given (H, W) resizes every tile to it.
    return InferenceOptions.of(opts, input_size=None if opts.input_size == "model" else
                               resolve_input_size(model, opts.input_size))


def default_tiling(model: nn.Module, *, tile: int | None = None, padding: int | None = None, batch: int = 2
                   ) -> Tiling:
    """Tiles of `tile` pixels, by default MIN_TILE or the model's fixed input size when its preprocessing names a
    larger one (a converted TF Lite model of 513), with a quarter of the tile as padding. DeepLab is fully
    convolutional, so a tile runs at its own size and the raster at its own resolution. The default comes from
    docs/geo.md's ground-truth study (CamVid val mosaics): tiles of 513 and 1025 with a quarter padded scored within
    0.35 mIoU points of whole-image prediction, tiles of 257 0.7-0.9 points below it, so a model converted at 257
    gets tiles of 512 too. A static graph (an exported .tflite file) runs only its own size, which is then the tile."""
    size = getattr(getattr(model, "preprocessing", None), "input_size", None)
    fixed = max(int(v) for v in size) if size else None
    if tile is None:
        tile = fixed if fixed and (getattr(model, "static_input", False) or fixed > MIN_TILE) else MIN_TILE
    return Tiling(tile=tile, padding=padding, batch=batch)


def raster_scale(src, *, scale: float | None = None, resolution: float | None = None) -> float:
    """The factor the raster is resampled by before the model: `scale`, or the raster's ground sampling distance
    (metres per pixel, from its transform) over `resolution` (the GSD the model was trained at), or 1."""
    if scale is not None and resolution is not None:
        raise ValueError(f"--scale {scale:g} and --resolution {resolution:g}: both say how to resample the raster; "
                         "give one")
    for flag, value in (("--scale", scale), ("--resolution", resolution)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value}: must be a positive number")
    if resolution is None:
        return float(scale or 1.0)
    crs = src.crs
    units = (getattr(crs, "linear_units", "") or "").lower() if crs is not None else ""
    if crs is None or not crs.is_projected or units not in ("metre", "meter", "metres", "meters", "m"):
        raise ValueError(f"{src.name}: --resolution {resolution:g} (metres) needs a raster in a projected CRS in "
                         f"metres, this one has {crs.to_string() if crs else 'no CRS'}; reproject it (gdalwarp "
                         "-t_srs EPSG:...) or give --scale instead")
    t = src.transform
    gsd = math.sqrt(abs(t.a * t.e - t.b * t.d))  # the side of a pixel's square area, rotated or not
    return gsd / resolution


def scaled_tiling(tiling: Tiling, opts: InferenceOptions, factor: float) -> tuple[Tiling, InferenceOptions]:
    """(raster tiling, options) that show the model the raster resampled by `factor`: tiles of tile / factor raster
    pixels, each resized to `tiling.tile` for the model and its probabilities resized back (bilinear, as
    `deeplab.inference.segment` resizes for a fixed input size), then blended on the raster's own grid."""
    if factor == 1.0:
        return tiling, opts
    if isinstance(opts.input_size, tuple):
        raise ValueError("--scale / --resolution set the size tiles are resized to; leave --input-size at model")
    tile = round(tiling.tile / factor)
    if tile < 17:
        raise ValueError(f"--scale {factor:g}: a {tiling.tile}-pixel tile would cover {tile} raster pixels; use a "
                         f"larger --tile or a scale under {tiling.tile / 17:g}")
    padding = min(round(tiling.padding / factor), (tile - 1) // 2)
    return (Tiling(tile=tile, padding=padding, batch=tiling.batch),
            InferenceOptions.of(opts, input_size=(tiling.tile, tiling.tile)))


def tiling_note(tiling: Tiling, input_size: Any) -> str | None:
    """One line for the user when tiles would be resized by an `input_size` (H, W) given with a tile of another size
    (the model would see the raster at another resolution than it asked for); None when they are not ("model" and
    None run tiles at their own size)."""
    size = tuple(input_size) if isinstance(input_size, (tuple, list)) else None
    if size is None or size == (tiling.tile, tiling.tile):
        return None
    factor = min(size) / tiling.tile
    return (f"--tile {tiling.tile} with --input-size {size[0]}x{size[1]}: every tile is resized to {size[0]}x{size[1]}, "
            f"so the model sees the raster at {factor:.2f} x its resolution; use --tile {max(size)} (or --input-size "
            f"model) to keep it, or --scale {factor:.2f} to mean it")


def predict_raster(
    model: nn.Module, path: str | os.PathLike, out_path: str | os.PathLike, *, tiling: Tiling | None = None,
    probs: bool = False, progress: bool = False, options: InferenceOptions | None = None, cog: bool = True,
    scale: float | None = None, resolution: float | None = None, rank: int = 0, world_size: int = 1,
    **inference: Any,
) -> RasterResult:
    """Classify the raster at `path` into the GeoTIFF `out_path` (module docstring), tile by tile.

    `tiling`: tile size, padding and tiles per call (default `default_tiling`: 512 or the model's larger fixed
    input size, a quarter of it, 2), each tile run at its own size. `options` (or its fields as keywords) as for `deeplab.predict`:
    `scales` / `flip` average each tile's softmax over rescaled and mirrored copies, `amp`, `runtime`; `window` and
    `crf` do not apply; an `input_size` (H, W) resizes every tile to it (`tiling_note`). `scale` resamples the raster
    by that factor for the model, or `resolution` to that ground sampling distance in metres (`raster_scale`,
    `scaled_tiling`); the output is on the raster's grid either way. The files are written under temporary names and
    renamed when complete. Returns the paths and the megapixels per second.

    `cog` (default): the files are cloud-optimised GeoTIFFs (`deeplab.inference.geotiff.to_cog`: 512-pixel tiles,
    internal overviews, mode-resampled for the classes and averaged for the probabilities), copied from the tiled
    GeoTIFF written strip by strip; `cog=False` keeps that file (256-pixel tiles, no overviews).

    `rank` of `world_size` processes (torch.distributed, initialised by the caller; every process calls this with
    the same arguments): each predicts one band of rows (`row_bands`) into a part file of its own, and process 0
    copies the parts into the output once all are written (a barrier), block row by block row. The output is equal
    to one process's byte for byte; the result's megapixels and seconds are this process's band.
    """
    rasterio = import_rasterio(f"{path}: reading rasters (GeoTIFF)")
    tiling = tiling or default_tiling(model)
    opts = _checked_options(model, options, inference)
    classes = int(model.config.num_classes)
    out_path, started = Path(out_path), time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    probs_path = out_path.with_name(out_path.stem + "_probs.tif") if probs else None
    prepared = prepare_model(model.eval() if hasattr(model, "eval") else model, opts)
    finals = [out_path] + ([probs_path] if probs_path is not None else [])
    partials = [p.with_name(f".{p.name}.partial") for p in finals]
    mine = partials if world_size == 1 else [p.with_name(f".{p.name}.part{rank}") for p in finals]
    from tqdm import tqdm

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), _open(path) as src:
        tiling, opts = scaled_tiling(tiling, opts, raster_scale(src, scale=scale, resolution=resolution))
        rows = row_bands(src.height, world_size)[rank]
        total = src.width * (rows[1] - rows[0]) / 1e6
        bar = tqdm(total=total, desc=Path(path).name, unit="Mpx", disable=not progress, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_noinv_fmt}]")
        try:
            if rows[1] > rows[0]:
                _write_band(prepared, model, src, mine, rows, tiling, opts, classes, bar=bar, cog=cog)
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()  # every band's part is written
                if rank != 0:
                    return RasterResult(path=out_path, probs_path=probs_path, megapixels=total,
                                        seconds=time.perf_counter() - started, runtime=runtime_name(prepared))
                _merge_bands(src, model, partials, finals, row_bands(src.height, world_size), classes, cog=cog)
            for i, (final, partial) in enumerate(zip(finals, partials)):
                if cog:
                    staged, partial = partial, partial.with_name(partial.name + ".cog")
                    to_cog(staged, partial, resampling="mode" if i == 0 else "average")
                    staged.unlink()
                os.replace(partial, final)
        except BaseException:
            for partial in {*partials, *mine, *(p.with_name(p.name + ".cog") for p in partials)}:
                partial.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
            if world_size > 1 and rank == 0:
                for r in range(world_size):
                    for final in finals:
                        final.with_name(f".{final.name}.part{r}").unlink(missing_ok=True)
    write_category_names(out_path, model.class_names)
    return RasterResult(path=out_path, probs_path=probs_path, megapixels=total,
                        seconds=time.perf_counter() - started, runtime=runtime_name(prepared))


def _write_band(prepared: nn.Module, model: nn.Module, src, paths: list[Path], rows: tuple[int, int],
                tiling: Tiling, opts: InferenceOptions, classes: int, *, bar: Any, cog: bool) -> None:
    """GeoTIFFs of the rows `rows` of the prediction: classes into paths[0], probabilities into paths[1] if given
    (`_probs_profile`)."""
    import rasterio

    t = src.transform  # moved down to the band's first row (rasterio's window_transform warns on its `*` use)
    band = {"height": rows[1] - rows[0],
            "transform": rasterio.Affine(t.a, t.b, t.c + t.b * rows[0], t.d, t.e, t.f + t.e * rows[0])}
    with rasterio.open(paths[0], "w", **{**geotiff_profile(src, count=1, dtype="uint8", nodata=NODATA), **band}) as dst, \
            (rasterio.open(paths[1], "w", **{**_probs_profile(src, classes, cog=cog), **band})
             if len(paths) > 1 else nothing()) as pdst:
        describe_classes(dst, model)
        writers: tuple[BlockRows, BlockRows | None] | None = None
        for strip in blended_strips(prepared, src, tiling, opts, bar=bar, rows=rows):
            if writers is None or writers[0].column != strip.column:
                for w in writers or ():
                    if w is not None:
                        w.flush()
                writers = (BlockRows(dst, strip.column, top=rows[0]),
                           BlockRows(pdst, strip.column, top=rows[0]) if pdst is not None else None)
            writers[0].add(strip.row, strip.labels()[None])
            if writers[1] is not None:
                probs = strip.probabilities().numpy()
                probs[:, ~strip.valid] = np.nan
                if cog:  # float16's values, stored as float32 (`_probs_profile`)
                    probs = probs.astype(np.float16).astype(np.float32)
                writers[1].add(strip.row, probs)
        for w in writers or ():
            if w is not None:
                w.flush()


def _probs_profile(src, classes: int, *, cog: bool) -> dict[str, Any]:
    """The probabilities' GeoTIFF: float32 bands holding float16 values, stored in 16 bits (NBITS=16) in a plain
    GeoTIFF; in 32 bits in a COG, as GDAL's COG driver (3.10) fills the unused part of 16-bit float blocks with
    whatever memory held, so the same probabilities would give other bytes each time."""
    profile = geotiff_profile(src, count=classes, dtype="float32", nodata=float("nan"))
    return profile if cog else {**profile, "nbits": 16}


def _merge_bands(src, model: nn.Module, partials: list[Path], finals: list[Path], bands: list[tuple[int, int]],
                 classes: int, *, cog: bool) -> None:
    """Process 0 of a shared raster: the bands' part files copied into whole GeoTIFFs, a window of 256 rows by at most
    `MERGE_COLUMNS` columns at a time (never a raster in memory)."""
    import rasterio
    from rasterio.windows import Window

    for i, (partial, final) in enumerate(zip(partials, finals)):
        profile = (geotiff_profile(src, count=1, dtype="uint8", nodata=NODATA) if i == 0 else
                   _probs_profile(src, classes, cog=cog))
        with rasterio.open(partial, "w", **profile) as dst:
            if i == 0:
                describe_classes(dst, model)
            for r, (r0, r1) in enumerate(bands):
                if r1 <= r0:
                    continue
                with rasterio.open(final.with_name(f".{final.name}.part{r}")) as part:
                    for top in range(0, r1 - r0, BLOCK):
                        for left in range(0, src.width, MERGE_COLUMNS):
                            window = Window(left, top, min(MERGE_COLUMNS, src.width - left), min(BLOCK, r1 - r0 - top))
                            dst.write(part.read(window=window), window=Window(left, r0 + top, window.width, window.height))


def evaluate_raster(
    model: nn.Module, path: str | os.PathLike, labels_path: str | os.PathLike, *, tiling: Tiling | None = None,
    progress: bool = False, options: InferenceOptions | None = None, scale: float | None = None,
    resolution: float | None = None, rank: int = 0, world_size: int = 1, **inference: Any,
) -> dict[str, Any]:
    """Scores of `model` on the raster at `path` against the label raster `labels_path` (the same size), predicted as
    `predict_raster` does and compared strip by strip (memory as for prediction).

    The label raster holds class Values when the model carries them (a model trained on an ArcGIS export: 0 and any
    other value are ignored), else class indices (255 ignored); its own NoData and the image's NoData are ignored.
    Returns `deeplab.inference.evaluate.evaluate`'s dict: miou, per_class_iou, pixel_accuracy, confusion_matrix, ...

    `rank` of `world_size` processes (torch.distributed, initialised by the caller; every process calls this with
    the same arguments): each predicts and counts one band of rows (`row_bands`, as `predict_raster` shares a raster),
    and the confusion matrices are summed over the processes (an all-reduce), so every process returns the scores of
    the whole raster, equal to one process's: the same pixels are predicted from the same tiles and counted once.
    """
    from rasterio.windows import Window

    from ..data.arcgis import class_value_lut
    from .metrics import MetricAccumulator

    rasterio = import_rasterio(f"{path}: reading rasters (GeoTIFF)")
    tiling = tiling or default_tiling(model)
    opts = _checked_options(model, options, inference)
    classes = int(model.config.num_classes)
    values = getattr(model, "class_values", None)
    lut = class_value_lut(values) if values else None
    acc = MetricAccumulator(num_classes=classes, ignore_index=NODATA)
    prepared = prepare_model(model.eval() if hasattr(model, "eval") else model, opts)
    from tqdm import tqdm

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), _open(path) as src, _open(labels_path) as truth:
        tiling, opts = scaled_tiling(tiling, opts, raster_scale(src, scale=scale, resolution=resolution))
        if (truth.width, truth.height) != (src.width, src.height):
            raise ValueError(f"{labels_path}: {truth.width}x{truth.height} pixels, but {path} has {src.width}x"
                             f"{src.height}; the label raster must cover the image pixel for pixel")
        if truth.crs != src.crs or not truth.transform.almost_equals(src.transform):
            raise ValueError(f"{labels_path}: its CRS / transform differ from {path}'s; snap the label raster to the "
                             "image (same grid) before evaluating")
        rows = row_bands(src.height, world_size)[rank]
        bar = tqdm(total=src.width * (rows[1] - rows[0]) / 1e6, desc=Path(path).name, unit="Mpx",
                   disable=not progress, dynamic_ncols=True)
        try:
            for strip in blended_strips(prepared, src, tiling, opts, bar=bar, rows=rows):
                valid = strip.valid
                window = Window(strip.column, strip.row, strip.shape[1], strip.shape[0])
                stored = truth.read(1, window=window)
                known = truth.read_masks(1, window=window) > 0
                if lut is not None:
                    target = lut[np.clip(stored, 0, 255).astype(np.intp)]
                    target = np.where((stored >= 0) & (stored <= 255), target, NODATA)
                else:
                    target = np.where((stored >= 0) & (stored < classes), stored, NODATA)
                target = np.where(known & valid, target, NODATA).astype(np.int64)
                acc.update(argmax_classes(strip.sums).long()[None], torch.from_numpy(target)[None])
        finally:
            bar.close()
    if world_size > 1:
        acc.all_reduce()
    result = acc.compute(class_names=model.class_names)
    result["num_images"] = 1
    result["confusion_matrix"] = acc.confusion.tolist()
    result["settings"] = {**opts.settings(), "tile": tiling.tile, "padding": tiling.padding,
                          "tile_batch": tiling.batch, "output_stride": model.config.output_stride,
                          "input_size": list(opts.input_size) if isinstance(opts.input_size, tuple) else None,
                          "runtime": runtime_name(prepared),
                          "threads": getattr(prepared, "threads", None) or torch.get_num_threads()}
    return result
