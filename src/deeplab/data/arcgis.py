"""ArcGIS Pro "Classified Tiles" exports (Export Training Data For Deep Learning, metadata format Classified Tiles).

An export folder holds, as ArcGIS Pro writes it::

    images/000000000.tif ...          image chips (TIFF, PNG or JPEG), any number of bands and sample type
    labels/000000000.tif ...          label chips of the same stems: one band, each pixel a class Value, 0 = NoData
    map.txt                           one 'images\\000000000.tif labels\\000000000.tif' pair per line (Windows paths)
    esri_accumulated_stats.json       NumBands, TileSizeX / TileSizeY, NumClasses, Classes [{ClassValue, ClassName}],
                                      ClassPixelStats {NumPixelsPerClass, ...}, MetaDataMode "Classified_Tiles"
    esri_model_definition.emd         JSON; Classes [{Value, Name, Color: [r, g, b]}], [-1, -1, -1] = no colour;
                                      InputRastersProps {BandNames}

The classes are the .emd's, in its order (arcgis.learn's `prepare_data` reads the same list): class index i is the
i-th Value. A label pixel of Value 0 is NoData and becomes the ignore label, as arcgis.learn treats it (a class
listed with Value 0 is dropped, as arcgis.learn drops it). Values need not be consecutive (e.g. 11, 21, 41). Colours
come from the .emd; a class without one gets the default palette's colour of its index.

`split` 'train' / 'val' hold out `val_fraction` (default 0.2) of the chips by a hash of their stems and the seed,
exactly as the folder dataset does (`deeplab.data.datasets.held_out_stems`); 'all' is every chip.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from .bands import image_header, read_bands
from .base import (
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    Transform,
    held_out_stems,
    make_lut,
)
from .palettes import Palette, default_palette

STATS_FILE = "esri_accumulated_stats.json"
EMD_FILE = "esri_model_definition.emd"
MAP_FILE = "map.txt"
DEFAULT_VAL_FRACTION = 0.2
NO_COLOR = (-1, -1, -1)

__all__ = ["ClassifiedTiles", "ExportInfo", "read_export"]


@dataclass(frozen=True)
class ExportInfo:
    """What an export's two metadata files say (`read_export`)."""

    values: tuple[int, ...]  # class Value of each class index
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]  # from the .emd; the default palette's where it gives none
    num_bands: int | None
    tile_size: tuple[int, int] | None  # (X, Y)
    band_names: tuple[str, ...] | None
    pixels_per_class: tuple[int, ...] | None  # ClassPixelStats.NumPixelsPerClass, in class-index order

    @property
    def rgb_bands(self) -> tuple[int, int, int] | None:
        """Positions of the bands named red, green and blue (InputRastersProps.BandNames), if all three are named."""
        if not self.band_names:
            return None
        lowered = [n.strip().lower() for n in self.band_names]
        found = []
        for colour, short in (("red", "r"), ("green", "g"), ("blue", "b")):
            hits = [i for i, n in enumerate(lowered) if n in (colour, short)]
            if not hits:
                return None
            found.append(hits[0])
        return tuple(found)  # type: ignore[return-value]


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a Classified Tiles export has {MAP_FILE}, {STATS_FILE} and {EMD_FILE} "
                           "beside images/ and labels/ (export again with metadata format Classified Tiles)")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); export the training data again") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, found {type(data).__name__}; export the training data again")
    return data


def _classes(entries: Any, path: Path, value_key: str, name_key: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: 'Classes' is missing or empty; it must list the classes ({value_key}, {name_key})")
    out = []
    for entry in entries:
        value = entry.get(value_key, entry.get("Value", entry.get("ClassValue"))) if isinstance(entry, dict) else None
        name = entry.get(name_key, entry.get("Name", entry.get("ClassName"))) if isinstance(entry, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or name is None:
            raise DatasetError(f"{path}: class entry {entry!r} has no integer {value_key} and {name_key}")
        if not 0 <= value <= 255:
            raise DatasetError(f"{path}: class {name!r} has Value {value}; label chips of Values above 255 are not "
                               "supported: reclassify to Values 1..255 before exporting")
        out.append({"value": value, "name": str(name), "color": entry.get("Color")})
    return out


def _color(raw: Any, path: Path, name: str) -> tuple[int, int, int] | None:
    if raw is None:
        return None
    try:
        rgb = tuple(int(v) for v in raw)
    except (TypeError, ValueError):
        rgb = ()
    if rgb == NO_COLOR:
        return None
    if len(rgb) < 3 or not all(0 <= v <= 255 for v in rgb[:3]):
        raise DatasetError(f"{path}: class {name!r} has Color {raw!r}; expected [r, g, b] in 0..255 or [-1, -1, -1]")
    return rgb[:3]  # type: ignore[return-value]


def read_export(root: str | Path) -> ExportInfo:
    """The classes, colours, band count and pixel counts of the export at `root`; a DatasetError naming the file for
    one that is missing, unreadable, or that disagrees with the other."""
    root = Path(root)
    stats_path, emd_path = root / STATS_FILE, root / EMD_FILE
    stats, emd = _json(stats_path), _json(emd_path)
    mode = stats.get("MetaDataMode")
    if mode is not None and str(mode).replace(" ", "_").lower() != "classified_tiles":
        raise DatasetError(f"{stats_path}: MetaDataMode is {mode!r}; --dataset classified-tiles reads Classified_Tiles "
                           "exports (export again with metadata format Classified Tiles)")
    if "Classes" in emd:
        classes = _classes(emd["Classes"], emd_path, "Value", "Name")
    else:
        classes = _classes(stats.get("Classes"), stats_path, "ClassValue", "ClassName")
    if "Classes" in stats and "Classes" in emd:
        listed = {c["value"]: c["name"] for c in _classes(stats["Classes"], stats_path, "ClassValue", "ClassName")}
        defined = {c["value"]: c["name"] for c in classes}
        if listed != defined:
            raise DatasetError(f"{stats_path}: its Classes {listed} differ from {emd_path}'s {defined}; the two files "
                               "come from different exports: export the training data again into an empty folder")
    values = [c["value"] for c in classes]
    if len(set(values)) != len(values):
        raise DatasetError(f"{emd_path}: a class Value is listed twice ({values}); each class needs its own Value")
    stated = stats.get("NumClasses")
    if isinstance(stated, int) and stated not in (len(classes), len([v for v in values if v != 0])):
        raise DatasetError(f"{stats_path}: NumClasses is {stated} but {emd_path} lists {len(classes)} classes; the two "
                           "files come from different exports: export the training data again into an empty folder")
    pixels = (stats.get("ClassPixelStats") or {}).get("NumPixelsPerClass")
    if pixels is not None and (not isinstance(pixels, list) or len(pixels) != len(classes)):
        raise DatasetError(f"{stats_path}: ClassPixelStats.NumPixelsPerClass has {len(pixels) if isinstance(pixels, list) else pixels!r} "
                           f"entries for the {len(classes)} classes of {emd_path}")
    kept = [i for i, c in enumerate(classes) if c["value"] != 0]  # Value 0 is NoData (ignored), as arcgis.learn drops it
    if not 1 <= len(kept) <= 255:
        raise DatasetError(f"{emd_path}: {len(kept)} classes besides NoData (Value 0); need 1..255")
    names = tuple(classes[i]["name"] for i in kept)
    defaults = default_palette(names).colors
    colors = tuple(_color(classes[i]["color"], emd_path, classes[i]["name"]) or defaults[k] for k, i in enumerate(kept))
    bands = stats.get("NumBands")
    if bands is not None and (not isinstance(bands, int) or bands < 1):
        raise DatasetError(f"{stats_path}: NumBands is {bands!r}; expected a positive number of bands")
    size = (stats.get("TileSizeX"), stats.get("TileSizeY"))
    band_names = (emd.get("InputRastersProps") or {}).get("BandNames")
    return ExportInfo(
        values=tuple(classes[i]["value"] for i in kept), names=names, colors=colors, num_bands=bands,
        tile_size=(int(size[0]), int(size[1])) if all(isinstance(s, int) for s in size) else None,
        band_names=tuple(str(b) for b in band_names) if isinstance(band_names, list) else None,
        pixels_per_class=tuple(int(pixels[i]) for i in kept) if pixels is not None else None,
    )


def _listed_path(root: Path, text: str, map_path: Path, line_no: int) -> Path:
    """A map.txt entry (Windows backslashes, relative to the export; or absolute on the machine that exported it)."""
    windows = PureWindowsPath(text)
    relative = Path(*windows.parts) if not windows.anchor else None
    candidates = [root / relative] if relative is not None else []
    candidates.append(root / Path(*windows.parts[-2:]))  # an absolute path: its folder and file under the export
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(f"{map_path}:{line_no}: lists '{text}', but {candidates[0]} does not exist; the export is "
                       "incomplete: copy the whole export folder again (or export again)")


def read_map(root: Path) -> list[tuple[Path, Path]]:
    """(image chip, label chip) pairs of `root/map.txt`, every file checked to exist."""
    map_path = root / MAP_FILE
    if not map_path.is_file():
        raise DatasetError(f"{map_path}: not found; a Classified Tiles export lists its chips there (export again with "
                           "metadata format Classified Tiles)")
    pairs = []
    for line_no, line in enumerate(map_path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DatasetError(f"{map_path}:{line_no}: expected 'images\\NAME labels\\NAME', got {line.strip()!r}")
        # An export with an additional input raster lists images, images2, labels: the label chip comes last.
        pairs.append((_listed_path(root, tokens[0], map_path, line_no),
                      _listed_path(root, tokens[-1], map_path, line_no)))
    if not pairs:
        raise DatasetError(f"{map_path}: lists no chips; export the training data again")
    return pairs


class ClassifiedTiles(SegmentationDataset):
    """An ArcGIS Pro Classified Tiles export (see the module docstring) as a segmentation dataset.

    Images come back as (H, W, `num_bands`) arrays in their stored sample type (uint8 RGB for 3-band 8-bit chips), so
    transforms normalise them per band; labels map each class Value to its index and NoData (0) to 255.
    """

    sparse_labels = True  # NoData (ignored) pixels are where no one labelled: a large share of them is normal

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        val_fraction: float | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: export folder not found; pass the folder ArcGIS Pro exported to as --data-root")
        for folder in ("images", "labels"):
            if not (root / folder).is_dir():
                raise DatasetError(f"{root / folder}: folder not found; a Classified Tiles export has images/ and "
                                   "labels/ (point --data-root at the export folder itself)")
        self.export = read_export(root)
        self.class_names = self.export.names
        self.class_values = self.export.values
        self.class_colors = self.export.colors
        self.palette = Palette(self.class_names, self.class_colors, (0, 0, 0))
        self.num_bands = self.export.num_bands or 3
        self.label_lut = make_lut({0: IGNORE_INDEX, **{v: i for i, v in enumerate(self.class_values)}})
        pairs = read_map(root)
        stems = {image.stem: (image, label) for image, label in pairs}
        if split == "all":
            chosen, description = sorted(stems), f"{root} (all {len(stems)} chips)"
        elif split in ("train", "val"):
            fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
            held = held_out_stems(sorted(stems), fraction=fraction, seed=seed)
            chosen = sorted(held) if split == "val" else sorted(s for s in stems if s not in held)
            description = (f"{root} ({split}: {len(chosen)} of {len(stems)} chips, held out by --val-fraction "
                           f"{fraction:g} and --seed {seed})")
        else:
            raise DatasetError(f"unknown split {split!r} for a Classified Tiles export; choose train, val or all")
        super().__init__(files=[stems[s] for s in chosen], transform=transform, seed=seed, skip_bad=skip_bad,
                         description=description)

    def load_image(self, path: Path) -> np.ndarray:
        image = read_bands(path, bands=self.num_bands)
        if image.shape[2] != self.num_bands:
            raise DatasetError(f"{path}: {image.shape[2]} bands, but {STATS_FILE} says NumBands {self.num_bands}; the "
                               "chip does not belong to this export (or pass --skip-bad)")
        return image

    def image_header(self, path: Path) -> tuple[int, int, str]:
        return image_header(path)

    def _label_hint(self) -> str:
        shown = ", ".join(f"{v} ({n})" for v, n in zip(self.class_values, self.class_names))
        return f"label chips hold a class Value of {EMD_FILE} ({shown}) or 0 (NoData)."

    def value_hint(self) -> str:
        """What the data report says about stored values that are no class."""
        return f"the classes are the Values {EMD_FILE} lists ({', '.join(map(str, self.class_values))}) and 0 (NoData)"


def class_value_lut(values: Sequence[int]) -> np.ndarray:
    """A 256-entry table from a stored class Value to its class index (0 and unknown values: 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for index, value in enumerate(values):
        lut[int(value)] = index
    return lut
