"""The file-backed datasets (PASCAL VOC 2012, Cityscapes, ADE20K, CamVid, a generic folder),
the synthetic one, and ``build_dataset`` over the plain ``DATASETS`` dict.

Every dataset takes keyword arguments ``root, split, transform, seed, skip_bad`` and yields
``(image (3, H, W) float32, mask (H, W) int64)`` with labels in ``[0, num_classes)`` or 255.
Files are listed when the dataset is built (cheap: names only); each sample is decoded and
validated when loaded, and ``validate()`` does that for all of them up front.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import palettes
from .arcgis import ClassifiedTiles
from .base import (
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    Transform,
    describe_values,
    held_out_stems,
    index_values,
    make_lut,
    read_mask_file,
)
from .palettes import (
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    PALETTES,
    Palette,
    colors_to_index,
    default_palette,
)
from .synthetic import SyntheticShapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found; {fix}")
    return path


def _read_list(path: Path) -> list[list[str]]:
    """Non-empty, non-comment lines of a split file, split on whitespace."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# -- PASCAL VOC 2012 -------------------------------------------------------------------------


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 segmentation (21 classes, 255 = void boundary).

    ``root`` is the ``VOC2012`` folder (or a folder holding ``VOCdevkit/VOC2012`` or
    ``VOC2012``). Splits: ``train``, ``val``, ``trainval`` from ``ImageSets/Segmentation``,
    masks from ``SegmentationClass`` ('P' PNGs whose indices are the labels); ``train_aug``
    (alias ``trainaug``) is the 10,582-image SBD-augmented set the DeepLab papers train on:
    ids from ``ImageSets/Segmentation/train_aug.txt``, masks from ``SegmentationClassAug``.
    """

    class_names = palettes.VOC.class_names
    palette = palettes.VOC
    label_lut = make_lut({**{k: k for k in range(21)}, IGNORE_INDEX: IGNORE_INDEX})

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        base = self.find_root(Path(root))
        split = "train_aug" if split == "trainaug" else split
        sets = base / "ImageSets" / "Segmentation"
        if split == "train_aug":
            list_file = next((p for p in (sets / "train_aug.txt", sets / "trainaug.txt") if p.is_file()), None)
            mask_dir = base / "SegmentationClassAug"
            missing = [str(p) for p, ok in ((sets / "train_aug.txt", list_file is not None), (mask_dir, mask_dir.is_dir())) if not ok]
            if missing:
                raise DatasetError(
                    f"split 'train_aug' needs {' and '.join(missing)}, which are missing; it is the SBD-augmented "
                    "set: put the SBD label PNGs converted to VOC index PNGs in SegmentationClassAug/ and the "
                    "10,582 training ids in ImageSets/Segmentation/train_aug.txt, or use --train-split train"
                )
        else:
            list_file = sets / f"{split}.txt"
            mask_dir = base / "SegmentationClass"
            if not list_file.is_file():
                have = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
                raise DatasetError(
                    f"{list_file}: split list not found for split {split!r}; VOC splits are train, val, "
                    f"trainval, train_aug (found: {have or 'none'})"
                )
        files = []
        for tokens in _read_list(list_file):
            # Plain ids ("2007_000032") or "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs.
            stem = Path(tokens[0]).stem
            files.append((base / "JPEGImages" / f"{stem}.jpg", mask_dir / f"{stem}.png"))
        super().__init__(files=files, transform=transform, seed=seed, skip_bad=skip_bad, description=f"{list_file}")

    @staticmethod
    def find_root(root: Path) -> Path:
        for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir():
                return candidate
        raise DatasetError(
            f"{root}: no JPEGImages folder here or in VOC2012/ or VOCdevkit/VOC2012/; point root at the "
            "VOC2012 folder of the VOC devkit"
        )

    def _label_hint(self) -> str:
        return "VOC masks must be index PNGs (SegmentationClass 'P' PNGs), not colour renderings."


# -- Cityscapes ------------------------------------------------------------------------------


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, the 19 evaluated classes.

    Images ``leftImg8bit/{split}/{city}/*_leftImg8bit.png``, masks
    ``gtFine/{split}/{city}/*_gtFine_labelIds.png``; the 34 label ids map to the 19 train ids
    of the official table, every other id (and 255, as the -1 license plate is stored) to 255.
    """

    class_names = palettes.CITYSCAPES.class_names
    palette = palettes.CITYSCAPES
    label_lut = make_lut(
        {**{k: IGNORE_INDEX for k in range(34)}, **dict(CITYSCAPES_LABEL_TO_TRAIN_ID), IGNORE_INDEX: IGNORE_INDEX}
    )

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        fix = "point root at the Cityscapes folder holding leftImg8bit/ and gtFine/ (splits: train, val, test)"
        image_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes image", fix)
        mask_dir = _require_dir(root / "gtFine" / split, "Cityscapes gtFine", fix)
        suffix = "_leftImg8bit.png"
        files = [
            (p, mask_dir / p.parent.name / (p.name[: -len(suffix)] + "_gtFine_labelIds.png"))
            for p in sorted(image_dir.glob(f"*/*{suffix}"))
        ]
        super().__init__(files=files, transform=transform, seed=seed, skip_bad=skip_bad, description=str(image_dir))

    def _label_hint(self) -> str:
        return "Cityscapes masks must be the *_gtFine_labelIds.png files (label ids 0..33), not *_color.png."


# -- ADE20K ----------------------------------------------------------------------------------


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes.

    ``images/{training,validation}/*.jpg`` with ``annotations/{...}/*.png``; annotation 0
    ("other") is ignored, value k becomes class k - 1. Splits ``train``/``val`` or the folder
    names ``training``/``validation``.
    """

    class_names = palettes.ADE20K.class_names
    palette = palettes.ADE20K
    label_lut = make_lut({0: IGNORE_INDEX, **{k: k - 1 for k in range(1, 151)}})
    _SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in self._SPLITS:
            raise DatasetError(f"unknown ADE20K split {split!r}; choose from {sorted(self._SPLITS)}")
        folder = self._SPLITS[split]
        fix = "point root at ADEChallengeData2016 (holding images/ and annotations/)"
        image_dir = _require_dir(root / "images" / folder, "ADE20K image", fix)
        mask_dir = _require_dir(root / "annotations" / folder, "ADE20K annotation", fix)
        files = [(p, mask_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
        super().__init__(files=files, transform=transform, seed=seed, skip_bad=skip_bad, description=str(image_dir))

    def _label_hint(self) -> str:
        return "ADE20K annotations store 0 (other) .. 150."


# -- CamVid ----------------------------------------------------------------------------------


class CamVid(SegmentationDataset):
    """CamVid in SegNet's layout: ``{split}/``, ``{split}annot/`` and ``{split}.txt``.

    ``{split}.txt`` lists ``image label`` pairs; SegNet wrote them as absolute paths on its own
    machine (``/SegNet/CamVid/train/x.png``), so each path is resolved as its last two
    components under ``root``. Without the txt the folders are paired by file name. 11 classes;
    annotation 11 ("Unlabelled") is ignored.
    """

    class_names = palettes.CAMVID.class_names
    palette = palettes.CAMVID
    label_lut = make_lut({**{k: k for k in range(11)}, 11: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX})

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        list_file = root / f"{split}.txt"
        if list_file.is_file():
            files = []
            for line_no, tokens in enumerate(_read_list(list_file), start=1):
                if len(tokens) != 2:
                    raise DatasetError(
                        f"{list_file}:{line_no}: expected 'image label' (two paths), got {' '.join(tokens)!r}"
                    )
                files.append((self._resolve(root, tokens[0]), self._resolve(root, tokens[1])))
            description = str(list_file)
        else:
            image_dir = _require_dir(
                root / split, f"CamVid {split!r} image", f"expected {list_file} or {root / split}/ with {root / split}annot/"
            )
            mask_dir = root / f"{split}annot"
            files = [(p, mask_dir / p.name) for p in sorted(image_dir.glob("*.png"))]
            description = str(image_dir)
        super().__init__(files=files, transform=transform, seed=seed, skip_bad=skip_bad, description=description)

    @staticmethod
    def _resolve(root: Path, listed: str) -> Path:
        path = Path(listed)
        if not path.is_absolute() and (root / path).exists():
            return root / path
        # SegNet's lists hold paths from its own machine: keep "<folder>/<file>" under root.
        return root / Path(*path.parts[-2:]) if len(path.parts) >= 2 else root / path.name

    def _label_hint(self) -> str:
        return "SegNet CamVid annotations store 0..10 and 11 for Unlabelled."


# -- generic folder --------------------------------------------------------------------------


def _parse_palette_file(path: Path) -> tuple[tuple[int, int, int], ...]:
    colors = []
    for line_no, tokens in enumerate(_read_list(path), start=1):
        values = " ".join(tokens).replace(",", " ").split()
        try:
            rgb = tuple(int(v) for v in values)
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise DatasetError(f"{path}:{line_no}: expected 'R G B' with values 0..255, got {' '.join(tokens)!r}")
        colors.append(rgb)
    return tuple(colors)  # type: ignore[return-value]


DEFAULT_VAL_FRACTION = 0.2


def parse_label_map(text: str) -> dict[int, int]:
    """'0:0,255:1' -> {0: 0, 255: 1}: stored mask value -> class index; a class of 'ignore' is the ignore label."""
    out: dict[int, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        stored, sep, cls = item.partition(":")
        try:
            value = int(stored)
            label = IGNORE_INDEX if cls.strip().lower() == "ignore" else int(cls)
        except ValueError:
            value = label = -1
        if not sep or not 0 <= value <= 255 or label < 0:
            raise DatasetError(
                f"--label-map {text}: {item.strip()!r} is not STORED:CLASS with STORED a mask value 0..255 and CLASS "
                "a class index or 'ignore' (e.g. --label-map 0:0,255:1)"
            )
        if value in out and out[value] != label:
            raise DatasetError(f"--label-map {text}: stored value {value} is mapped twice")
        out[value] = label
    if not out:
        raise DatasetError(f"--label-map {text!r}: no STORED:CLASS pairs (e.g. --label-map 0:0,255:1)")
    return out


def format_label_map(mapping: Mapping[int, int]) -> str:
    """The inverse of `parse_label_map`."""
    return ",".join(f"{k}:{'ignore' if v == IGNORE_INDEX else v}" for k, v in sorted(mapping.items()))


def _listed_stems(split_file: Path, found: dict[str, Path], image_suffix: str | None) -> list[str]:
    stems = []
    for tokens in _read_list(split_file):
        name = tokens[0]
        stem = name if name in found else Path(name).stem
        if image_suffix and name.endswith(image_suffix):
            stem = name[: -len(image_suffix)]
        if stem not in found:
            raise DatasetError(f"{split_file}: lists {name!r}, but no such image is in the image folder; fix the list")
        stems.append(stem)
    return stems


class FolderDataset(SegmentationDataset):
    """Any ``images/`` + ``masks/`` folder pair; masks share the image's stem.

    Layout under ``root`` (all names configurable)::

        images/<stem>.<jpg|png|...>     masks/<stem>.png     classes.txt     [palette.txt]
        [splits/<split>.txt]            # stems (or file names), one per line

    ``split='all'`` takes every image; a split with ``splits/<split>.txt`` takes that list. Without
    list files, ``'train'`` and ``'val'`` split the images by ``val_fraction`` (default 0.2) and
    ``seed`` (`held_out_stems`); with only one of the two lists, the other split is its complement.
    Images may be RGB, grayscale, RGBA or 16-bit (`deeplab.data.base.image_to_rgb`). Masks are index masks ('L'/'P' PNGs: the stored values are labels, 255 ignored) or colour
    masks (RGB PNGs mapped through the palette; the palette's void colour -> 255, unknown
    colours are an error). ``mask_mode`` is ``"auto"`` (by the PNG's mode), ``"index"`` or
    ``"color"``. ``label_map`` maps stored index values to classes when they differ, e.g.
    ``{0: 0, 255: 1}`` (or the flag's text ``"0:0,255:1"``) for binary masks saved as black/white
    (the ISBI membrane data); values it does not list are errors.

    ``classes`` (names) and ``palette`` (a name in ``PALETTES`` such as ``"voc"``, a palette file,
    or a list of RGB colours) override ``classes.txt`` / ``palette.txt``; a named palette also supplies the
    class names. Files named ``<stem><image_suffix>`` / ``<stem><mask_suffix>`` can share a folder:
    the VOC samples ``1_image.png`` / ``1_target.png`` load with ``image_dir='.', mask_dir='.',
    image_suffix='_image.png', mask_suffix='_target.png', palette='voc'``.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        split: str = "all",
        transform: Transform | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffix: str | None = None,
        mask_suffix: str = ".png",
        classes: Sequence[str] | None = None,
        palette: str | Palette | Sequence[Sequence[int]] | None = None,
        mask_mode: str = "auto",
        label_map: Mapping[int, int] | str | None = None,
        val_fraction: float | None = None,
    ) -> None:
        root = Path(root)
        if isinstance(label_map, str):
            label_map = parse_label_map(label_map)
        if mask_mode not in ("auto", "index", "color"):
            raise DatasetError(f"unknown mask_mode {mask_mode!r}; choose from ['auto', 'color', 'index']")
        self.mask_mode = mask_mode
        self.class_names, self.palette, self._has_explicit_palette = self._classes_and_palette(root, classes, palette)
        n = len(self.class_names)
        if label_map is None:
            self.label_lut = make_lut({**{k: k for k in range(n)}, IGNORE_INDEX: IGNORE_INDEX})
        else:
            bad = {raw: cls for raw, cls in label_map.items() if not (0 <= raw <= 255 and (0 <= cls < n or cls == IGNORE_INDEX))}
            if bad:
                shown = ",".join(f"{k}:{v}" for k, v in bad.items())
                raise DatasetError(
                    f"--label-map {shown}: stored values must be 0..255 and classes 0..{n - 1} (the {n} classes) "
                    "or 'ignore'"
                )
            self.label_lut = make_lut(dict(label_map))

        images = _require_dir(root / image_dir, "image", f"put the images in {root / image_dir} or pass --image-dir")
        masks = root / mask_dir
        if image_suffix:
            found = {p.name[: -len(image_suffix)]: p for p in images.iterdir() if p.name.endswith(image_suffix)}
        else:
            if images.resolve() == masks.resolve():
                # Without an image suffix the masks in the same folder would be listed as images.
                raise DatasetError(
                    f"{images}: images and masks share this folder; pass --image-suffix and --mask-suffix "
                    "(e.g. _image.png and _target.png) to tell them apart"
                )
            found = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        stems, description = self._split_stems(root, split, found, image_suffix, val_fraction=val_fraction, seed=seed)
        self.split_source = description
        files = [(found[s], masks / f"{s}{mask_suffix}") for s in stems]
        super().__init__(files=files, transform=transform, seed=seed, skip_bad=skip_bad, description=description)

    @staticmethod
    def _split_stems(
        root: Path, split: str, found: dict[str, Path], image_suffix: str | None, *, val_fraction: float | None,
        seed: int,
    ) -> tuple[list[str], str]:
        """The stems of `split` and a description of where they came from.

        'all' is every image; a split with a list file ``splits/<split>.txt`` is that list. Without one, 'train' and
        'val' are derived: the complement of the other's list when only that one exists, otherwise a held-out
        fraction (`val_fraction`, default 0.2) chosen by `seed` (see `held_out_stems`).
        """
        if split == "all":
            return sorted(found), f"{root} (all {len(found)} images)"
        split_dir = root / "splits"
        split_file = split_dir / f"{split}.txt"
        if split_file.is_file():
            return _listed_stems(split_file, found, image_suffix), str(split_file)
        if split not in ("train", "val"):
            have = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
            raise DatasetError(
                f"{split_file}: split list not found for split {split!r} (found: {have or 'none'}); "
                "write one image stem per line there, or use --split all"
            )
        other_file = split_dir / f"{'val' if split == 'train' else 'train'}.txt"
        if other_file.is_file():
            other = set(_listed_stems(other_file, found, image_suffix))
            return sorted(s for s in found if s not in other), f"{root} (all images not in {other_file})"
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
        if len(found) < 2:
            raise DatasetError(
                f"{root}: {len(found)} image(s) found (--image-dir, --image-suffix); a training run needs at least two, "
                "one held out for validation (or a splits/val.txt)"
            )
        val = held_out_stems(sorted(found), fraction=fraction, seed=seed)
        stems = sorted(val) if split == "val" else sorted(s for s in found if s not in val)
        return stems, (
            f"{root} ({split}: {len(stems)} of {len(found)} images, held out by --val-fraction {fraction:g} "
            f"and --seed {seed}; no splits/{split}.txt)"
        )

    @staticmethod
    def _classes_and_palette(
        root: Path,
        classes: Sequence[str] | None,
        palette: str | Palette | Sequence[Sequence[int]] | None,
    ) -> tuple[tuple[str, ...], Palette, bool]:
        named: Palette | None = None
        colors: tuple[tuple[int, int, int], ...] | None = None
        if isinstance(palette, str) and palette not in PALETTES:
            if not Path(palette).is_file():
                raise DatasetError(
                    f"--palette {palette}: neither a palette name ({', '.join(sorted(PALETTES))}) nor a file; "
                    "give a name or a text file with one 'R G B' line per class"
                )
            colors = _parse_palette_file(Path(palette))
        elif isinstance(palette, str):
            named = PALETTES[palette]
        elif isinstance(palette, Palette):
            named = palette
        elif palette is not None:
            colors = tuple(tuple(int(v) for v in c) for c in palette)  # type: ignore[misc]
        elif (root / "palette.txt").is_file():
            colors = _parse_palette_file(root / "palette.txt")

        if classes is not None:
            names = tuple(classes)
        elif (root / "classes.txt").is_file():
            names = tuple(" ".join(t) for t in _read_list(root / "classes.txt"))
        elif named is not None:
            names = named.class_names
        else:
            raise DatasetError(
                f"{root / 'classes.txt'}: not found; write one class name per line there, "
                "or pass --classes NAME,NAME,... or a named --palette (e.g. --palette voc)"
            )
        if not 1 <= len(names) <= 255:
            raise DatasetError(f"{root}: {len(names)} classes; need 1..255 (255 is the ignore label)")

        if named is not None:
            if len(named.colors) < len(names):
                raise DatasetError(f"palette has {len(named.colors)} colours for {len(names)} classes; give one per class")
            return names, Palette(names, named.colors[: len(names)], named.void_color), True
        if colors is not None:
            if len(colors) < len(names):
                raise DatasetError(
                    f"{root}: the palette has {len(colors)} colours for {len(names)} classes; give one colour per class"
                )
            # A colour after the class colours, if given, is the void colour.
            void = colors[len(names)] if len(colors) > len(names) else (224, 224, 192)
            return names, Palette(names, colors[: len(names)], void), True
        return names, default_palette(names), False

    def _is_color(self, im) -> bool:
        return im.mode in ("RGB", "RGBA") if self.mask_mode == "auto" else self.mask_mode == "color"

    def stored_values(self, path: Path) -> np.ndarray | None:
        im = read_mask_file(path)
        return None if self._is_color(im) else index_values(im, path)

    def read_mask(self, path: Path) -> np.ndarray:
        im = read_mask_file(path)
        is_color = self._is_color(im)
        if not is_color:
            return self.map_labels(index_values(im, path), path)
        if not self._has_explicit_palette:
            raise DatasetError(
                f"{path}: colour mask but no palette to read it with; add palette.txt (one 'R G B' per class) "
                "or pass --palette (a name such as voc, or a file), or save masks as index PNGs"
            )
        index, unknown = colors_to_index(np.asarray(im.convert("RGB")), self.palette, ignore_index=self.ignore_index)
        if len(unknown):
            shown = ", ".join(str(tuple(int(v) for v in c)) for c in unknown[:6])
            more = f" ... ({len(unknown)} colours)" if len(unknown) > 6 else ""
            raise DatasetError(
                f"{path}: colour(s) {shown}{more} are not in the palette; fix the palette "
                "(palette.txt / --palette) or the mask, or pass --skip-bad"
            )
        return index

    def _label_hint(self) -> str:
        return (
            "index masks must store values below the number of classes (classes.txt or --classes), or 255 (ignore); "
            "pass --label-map STORED:CLASS,... if they use other values (e.g. --label-map 0:0,255:1 for black/white "
            "masks; `deeplab data` shows the stored values)."
        )


# -- registry-free lookup --------------------------------------------------------------------


DATASETS: dict[str, Callable[..., SegmentationDataset | SyntheticShapes]] = {
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "camvid": CamVid,
    "folder": FolderDataset,
    "classified-tiles": ClassifiedTiles,
    "synthetic": SyntheticShapes,
}


def build_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str = "train",
    transform: Transform | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    **options: Any,
) -> SegmentationDataset | SyntheticShapes:
    """Build dataset ``name`` from ``DATASETS``; ``options`` go to its constructor."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if name != "synthetic" and root is None:
        raise ValueError(f"--dataset {name} reads files: pass --data-root FOLDER (only synthetic needs none)")
    return DATASETS[name](root=root, split=split, transform=transform, seed=seed, skip_bad=skip_bad, **options)


__all__ = [
    "ADE20K",
    "DATASETS",
    "CamVid",
    "Cityscapes",
    "ClassifiedTiles",
    "DatasetError",
    "FolderDataset",
    "SegmentationDataset",
    "VOCSegmentation",
    "build_dataset",
    "describe_values",
    "format_label_map",
    "held_out_stems",
    "parse_label_map",
]
