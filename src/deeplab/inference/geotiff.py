"""Writing GeoTIFFs of predictions: the profile, whole block rows at a time, the classes' colours and names, and
the conversion to a cloud-optimised GeoTIFF (COG)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

BLOCK = 256  # the output's GeoTIFF block size
NODATA = 255

__all__ = ["BLOCK", "COG_BLOCK", "NODATA", "BlockRows", "describe_classes", "geotiff_profile", "nothing", "to_cog",
           "write_category_names"]


class BlockRows:
    """Buffers strips of one column chunk and writes whole 256-row block rows (the rest at the end)."""

    def __init__(self, dst, column: int, *, top: int = 0) -> None:
        self.dst, self.column = dst, column
        self.origin = top  # the raster row of the file's first row (a band of rows written into a file of its own)
        self.top = 0
        self.parts: list[np.ndarray] = []  # (bands, h, w) each, consecutive rows from self.top

    def add(self, row: int, data: np.ndarray) -> None:
        if not self.parts:
            self.top = row
        self.parts.append(data)
        rows = sum(p.shape[1] for p in self.parts)
        if rows >= BLOCK:
            self._write(rows // BLOCK * BLOCK)

    def _write(self, rows: int) -> None:
        from rasterio.windows import Window

        data = np.concatenate(self.parts, axis=1) if len(self.parts) > 1 else self.parts[0]
        self.dst.write(data[:, :rows], window=Window(self.column, self.top - self.origin, data.shape[2], rows))
        self.top += rows
        self.parts = [data[:, rows:]] if rows < data.shape[1] else []

    def flush(self) -> None:
        if self.parts:
            self._write(sum(p.shape[1] for p in self.parts))


def geotiff_profile(src, *, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    return {
        "driver": "GTiff", "width": src.width, "height": src.height, "count": count, "dtype": dtype,
        "crs": src.crs, "transform": src.transform, "nodata": nodata, "tiled": True, "blockxsize": BLOCK,
        "blockysize": BLOCK, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }


def describe_classes(dst, model: nn.Module) -> None:
    """Colour table and class names of the class band (the model's palette; band metadata class_I = name)."""
    from ..data.palettes import model_palette

    palette = model_palette(model)
    colormap = {i: (*map(int, rgb), 255) for i, rgb in enumerate(palette.colors)}
    colormap[NODATA] = (0, 0, 0, 0)
    dst.write_colormap(1, colormap)
    dst.set_band_description(1, "class")
    values = getattr(model, "class_values", None) or ()
    dst.update_tags(1, **{f"class_{i}": name for i, name in enumerate(model.class_names)},
                    **{f"class_{i}_value": str(v) for i, v in enumerate(values)})


def write_category_names(path: Path, class_names) -> Path:
    """NAME.tif.aux.xml with GDAL's category names of band 1 (class index i is the i-th name)."""
    pam = ET.Element("PAMDataset")
    band = ET.SubElement(pam, "PAMRasterBand", band="1")
    names = ET.SubElement(band, "CategoryNames")
    for name in class_names:
        ET.SubElement(names, "Category").text = str(name)
    from ..models.checkpoint import write_atomically

    tree = ET.ElementTree(pam)
    return write_atomically(path.with_name(path.name + ".aux.xml"),
                            lambda f: tree.write(f, encoding="UTF-8", xml_declaration=False))


class nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


COG_BLOCK = 512  # the cloud-optimised GeoTIFF's internal tiles


def to_cog(source: Path, target: Path, *, resampling: str) -> Path:
    """Copy the tiled GeoTIFF `source` into a cloud-optimised GeoTIFF `target` with GDAL's COG driver: 512-pixel
    tiles, DEFLATE, internal overviews (halving until they fit one tile) made with `resampling` ('mode' for classes:
    every overview pixel is a class that occurs below it; 'average' for probabilities), the overviews' IFDs and data
    laid out in COG order (`LAYOUT=COG` in the IMAGE_STRUCTURE metadata). Colour table, band metadata, nodata, CRS and
    transform are copied; so are the 16-bit float samples (NBITS=16) of a probability raster."""
    import rasterio.shutil

    rasterio.shutil.copy(source, target, driver="COG", compress="deflate", blocksize=COG_BLOCK,
                         overview_resampling=resampling, BIGTIFF="IF_SAFER")
    return target
