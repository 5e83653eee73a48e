"""Images of any number of bands and any sample type: reading them (rasterio for GeoTIFF and other rasters, PIL for
the rest) and the per-band statistics a model is normalised with.

An image here is an (H, W, C) numpy array in the file's own sample type: uint8 RGB photos as every dataset reads
them, uint16 or float32 multispectral chips as ArcGIS exports them. Models normalise each band with its own mean
and std (`deeplab.models.config.Preprocessing`), in the file's units: 0..255 for 8-bit images, the raw counts for
16-bit ones, whatever a float raster holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import DatasetError, image_to_rgb

# Rasters: read with rasterio (GDAL) when it is installed (PIL reads the rest, and 8-bit RGB or grey TIFF chips without
# it); `deeplab predict` classifies these tile by tile into GeoTIFFs.
RASTER_SUFFIXES = (".tif", ".tiff", ".img", ".jp2", ".vrt")
# Sample types a model can read (after reading, they are normalised as float32).
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

GEO_EXTRA = "pip install 'deeplab[geo]'"


def import_rasterio(what: str) -> Any:
    """The rasterio module, or an ImportError naming `what` needed it and the extra that installs it."""
    try:
        import rasterio
    except ImportError:
        raise ImportError(f"{what} needs the optional rasterio package (GDAL): {GEO_EXTRA}") from None
    return rasterio


def has_rasterio() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _pil_bands(im: Image.Image) -> np.ndarray | None:
    """(H, W, C) from a PIL image whose bands PIL understands (grey, RGB, RGBA, 16-bit and float grey); else None."""
    if im.mode in ("RGB", "RGBA", "L", "LA"):
        arr = np.asarray(im)
        return (arr[..., None] if arr.ndim == 2 else arr).copy()
    if im.mode == "P":
        return np.asarray(im.convert("RGB")).copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16)[..., None]
    if im.mode in ("I", "F"):
        return np.asarray(im)[..., None].copy()
    return None


def read_bands(path: Path, *, bands: int | None = None) -> np.ndarray:
    """(H, W, C) array of every band of the image at `path`, in its own sample type.

    `bands` (the number the model reads) decides how ambiguous files are read: a 3-band model reads a grey, palette or
    RGBA photo as RGB (`deeplab.data.base.image_to_rgb`, as every dataset reads photos). GeoTIFF and other rasters
    are read with rasterio when it is installed. Raises DatasetError naming the file when it cannot be read, and an
    ImportError naming the extra when only rasterio could read it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found; check the dataset folder and its list (map.txt)")
    if path.suffix.lower() in RASTER_SUFFIXES and has_rasterio():
        return _read_with_rasterio(path)
    try:
        with Image.open(path) as im:
            im.load()
            if bands == 3 and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return image_to_rgb(im)
            arr = _pil_bands(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if path.suffix.lower() in RASTER_SUFFIXES:
            import_rasterio(f"{path}: this raster (PIL cannot read it: {exc})")
        raise DatasetError(f"{path}: cannot decode image ({exc}); re-export or remove the file, or pass --skip-bad") from None
    if arr is None:
        import_rasterio(f"{path}: a {im.mode} image")
        return _read_with_rasterio(path)
    if bands == 3 and arr.shape[2] == 1:  # a 16-bit or float grey image for an RGB model, as the folders read it
        return np.repeat(arr, 3, axis=2) if arr.dtype == np.uint8 else arr.repeat(3, axis=2)
    return arr


def _read_with_rasterio(path: Path) -> np.ndarray:
    rasterio = import_rasterio(str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read()  # (C, H, W)
    except rasterio.errors.RasterioError as exc:
        raise DatasetError(f"{path}: cannot read raster ({exc}); re-export or remove the file, or pass --skip-bad") from None
    if data.dtype.name not in IMAGE_DTYPES:
        raise DatasetError(f"{path}: sample type {data.dtype.name} is not an image type ({', '.join(IMAGE_DTYPES)})")
    return np.ascontiguousarray(data.transpose(1, 2, 0))


def image_header(path: Path) -> tuple[int, int, str]:
    """(width, height, a short description of the bands) from the file's header, without decoding the pixels."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES and has_rasterio():
        import rasterio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.width, src.height, f"{src.count} bands {src.dtypes[0]}"
    with Image.open(path) as im:
        return im.width, im.height, im.mode


class BandStatistics:
    """Running per-band sums over images (float64): mean and population std of every band, NaN pixels left out."""

    def __init__(self) -> None:
        self.count: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.shift: np.ndarray | None = None
        self.dtypes: set[str] = set()

    def add(self, image: np.ndarray) -> None:
        """Count an (H, W, C) image; every image must have the same C."""
        flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
        finite = np.isfinite(flat)
        flat = np.where(finite, flat, 0.0)
        if self.count is None:
            c = flat.shape[1]
            self.count, self.total, self.squares = np.zeros(c), np.zeros(c), np.zeros(c)
            # Sums are taken about the first image's means, so squares of large raw counts do not swamp the variance.
            self.shift = flat.sum(0) / np.maximum(finite.sum(0), 1)
        if flat.shape[1] != len(self.count):
            raise DatasetError(f"an image has {flat.shape[1]} bands, the ones before it {len(self.count)}")
        self.count += finite.sum(0)
        centred = np.where(finite, flat - self.shift, 0.0)
        self.total += centred.sum(0)
        self.squares += (centred * centred).sum(0)
        self.dtypes.add(image.dtype.name)

    def result(self) -> dict[str, Any] | None:
        """{"bands", "dtype", "mean", "std"} (JSON-ready), or None before any image."""
        if self.count is None:
            return None
        n = np.maximum(self.count, 1)
        mean = self.total / n
        var = np.maximum(self.squares / n - mean * mean, 0.0)
        return {"bands": int(len(self.count)), "dtype": ",".join(sorted(self.dtypes)),
                "mean": [float(v) for v in mean + self.shift], "std": [float(v) for v in np.sqrt(var)]}


def display_rgb(image: np.ndarray, *, rgb: tuple[int, int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 for looking at an (H, W, C) image of any bands: uint8 RGB as it is; otherwise the bands `rgb`
    (default the first three, or the first one as grey), each stretched from its 2nd to its 98th percentile."""
    if image.dtype == np.uint8 and image.shape[2] == 3 and rgb in (None, (0, 1, 2)):
        return image
    picks = rgb if rgb is not None else ((0, 1, 2) if image.shape[2] >= 3 else (0, 0, 0))
    out = np.empty(image.shape[:2] + (3,), dtype=np.uint8)
    for channel, band in enumerate(picks):
        values = image[..., band].astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0))
        scaled = (np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-12) * 255.0
        out[..., channel] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out
