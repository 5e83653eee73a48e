"""A data report: what a dataset holds, and loud warnings when it looks read wrong.

`data_report` reads the masks of each split (up to `max_masks` per split, evenly spaced) and counts the values they
store before label mapping, the labels those values become, and the image sizes and modes (from the file headers).
`report_warnings` turns the counts into warnings that name the flag that fixes them; those marked `stop` make
`deeplab train` refuse to start (a run on masks read wrong trains and validates happily on the wrong task: black/
white masks with 255 read as the ignore label score val mIoU 1.0 on the one class left). `format_report` is the
text `deeplab data` and `deeplab train` print.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bands import BandStatistics
from .base import DatasetError, describe_values

__all__ = ["DataWarning", "SplitStats", "class_pixel_shares", "data_report", "format_report",
           "median_frequency_weights", "report_warnings"]

_MODE_WORDS = {"L": "grayscale", "RGB": "RGB", "RGBA": "RGBA (alpha dropped)", "P": "palette", "LA": "grayscale+alpha",
               "I;16": "16-bit grayscale (scaled by 1/257)", "I": "32-bit grayscale (scaled by 1/257)",
               "F": "float grayscale", "CMYK": "CMYK"}


@dataclass
class SplitStats:
    """Counts over the masks of one split that were read (`masks_read` of `images`)."""

    split: str
    images: int
    masks_read: int
    source: str  # where the split's list came from
    class_pixels: list[int]  # per class, after label mapping
    ignore_pixels: int
    stored_values: dict[int, int]  # stored mask value -> pixels (index masks only)
    invalid_values: dict[int, int]  # stored values that map to no class and are not the ignore label
    image_sizes: dict[str, int]  # "WxH" -> images
    image_modes: dict[str, int]  # PIL mode -> images
    single_value_masks: list[str] = field(default_factory=list)  # "file: value"
    unreadable: list[str] = field(default_factory=list)  # "file: reason"
    size_mismatches: list[str] = field(default_factory=list)  # "mask file: mask WxH, image WxH"
    # Per-band mean and std of the images read ({"bands", "dtype", "mean", "std"}), for datasets of any band count
    # (`num_bands`): what a model of those bands is normalised with. None for RGB photo datasets.
    band_stats: dict[str, Any] | None = None

    @property
    def labelled_pixels(self) -> int:
        return sum(self.class_pixels) + self.ignore_pixels


@dataclass
class DataWarning:
    message: str
    stop: bool  # True: training would learn the wrong task; `deeplab train` refuses without --ignore-data-warnings


def _evenly_spaced(n: int, k: int) -> list[int]:
    if k <= 0 or n <= k:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def _image_header(dataset: Any, path: Any) -> tuple[int, int, str]:
    """(width, height, mode) from the image file's header: the dataset's reader when it has one (rasters of any band
    count), else PIL's."""
    header = getattr(dataset, "image_header", None)
    if header is not None:
        return header(path)
    with Image.open(path) as im:
        return im.width, im.height, im.mode


def _split_stats(dataset: Any, split: str, *, max_masks: int | None, progress: bool) -> SplitStats:
    k = dataset.num_classes
    ignore = int(getattr(dataset, "ignore_index", 255))
    files = list(getattr(dataset, "files", []) or [])
    indices = _evenly_spaced(len(dataset), max_masks if max_masks is not None else len(dataset))
    class_pixels = np.zeros(k, dtype=np.int64)
    stored = np.zeros(256, dtype=np.int64)
    invalid = np.zeros(256, dtype=np.int64)
    ignore_pixels = 0
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    single: list[str] = []
    unreadable: list[str] = []
    mismatched: list[str] = []
    lut = getattr(dataset, "label_lut", None)
    bands = BandStatistics() if getattr(dataset, "num_bands", None) is not None and files else None
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"reading {split} masks", unit="mask", dynamic_ncols=True)
    for i in indices:
        try:
            if files:
                image_path, mask_path = files[i]
                width, height, mode = _image_header(dataset, image_path)  # the header only: size and mode
                sizes[f"{width}x{height}"] += 1
                modes[mode] += 1
                image_hw = (height, width)
                if bands is not None:
                    bands.add(dataset.load_image(image_path))
                raw = dataset.stored_values(mask_path)
                name = Path(mask_path).name
                mask_hw = tuple(raw.shape[:2]) if raw is not None else tuple(dataset.read_mask(mask_path).shape[:2])
                if mask_hw != image_hw:
                    mismatched.append(f"{mask_path}: mask {mask_hw[1]}x{mask_hw[0]}, image {image_hw[1]}x{image_hw[0]}")
            else:  # generated data (synthetic): the labels are the stored values
                image, labels = dataset.load(i)
                sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
                modes["RGB"] += 1
                raw, name = labels.astype(np.int64), f"sample {i}"
            if raw is None:  # a colour mask: its labels come from the palette
                labels = dataset.read_mask(mask_path).astype(np.int64)
            else:
                if raw.min() < 0 or raw.max() > 255:
                    raise DatasetError(f"{mask_path}: stored values {describe_values(raw[(raw < 0) | (raw > 255)])} "
                                       "are outside 0..255")
                counts = np.bincount(raw.ravel(), minlength=256)
                stored += counts
                labels_of_value = lut if lut is not None else np.arange(256)
                bad = (labels_of_value < 0) & (counts > 0)
                invalid[bad] += counts[bad]
                mapped = labels_of_value[raw]
                labels = mapped[mapped >= 0]
            if raw is not None and len(np.unique(raw)) == 1:
                single.append(f"{name}: all {int(raw.flat[0])}")
            elif raw is None and len(np.unique(labels)) == 1:
                single.append(f"{name}: all class {int(labels.flat[0])}")
            class_pixels += np.bincount(labels[labels != ignore].ravel(), minlength=k)[:k]
            ignore_pixels += int((labels == ignore).sum())
        except (DatasetError, OSError) as exc:
            unreadable.append(str(exc).splitlines()[0])
    return SplitStats(
        split=split, images=len(dataset), masks_read=len(indices), source=getattr(dataset, "description", split),
        class_pixels=class_pixels.tolist(), ignore_pixels=ignore_pixels,
        stored_values={int(v): int(c) for v, c in enumerate(stored) if c},
        invalid_values={int(v): int(c) for v, c in enumerate(invalid) if c},
        image_sizes=dict(sizes.most_common()), image_modes=dict(modes.most_common()),
        single_value_masks=single, unreadable=unreadable, size_mismatches=mismatched,
        band_stats=bands.result() if bands is not None else None,
    )


def data_report(
    datasets: dict[str, Any], *, max_masks: int | None = 1000, progress: bool = False
) -> dict[str, Any]:
    """Counts and warnings for `datasets` ({split name: dataset}, all with the same classes); a JSON-ready dict.

    `max_masks` caps the masks read per split (evenly spaced over the split; None reads all).
    """
    first = next(iter(datasets.values()))
    splits = {name: _split_stats(ds, name, max_masks=max_masks, progress=progress) for name, ds in datasets.items()}
    hint = getattr(first, "value_hint", None)
    warnings = report_warnings(splits, class_names=tuple(first.class_names), ignore_index=int(first.ignore_index),
                               sparse_labels=bool(getattr(first, "sparse_labels", False)),
                               value_hint=hint() if hint is not None else None)
    train = splits.get("train") or next(iter(splits.values()))
    return {
        "classes": list(first.class_names),
        "ignore_index": int(first.ignore_index),
        "splits": {name: asdict(st) for name, st in splits.items()},
        "warnings": [asdict(w) for w in warnings],
        "class_pixel_shares": class_pixel_shares(train.class_pixels),
        "band_stats": train.band_stats,
    }


def class_pixel_shares(class_pixels: list[int]) -> list[float]:
    """Each class's share of the labelled (not ignored) pixels."""
    total = sum(class_pixels)
    return [c / total if total else 0.0 for c in class_pixels]


def median_frequency_weights(shares: list[float], *, power: float = 0.5) -> tuple[float, ...]:
    """Class weights (median(f) / f_c) ** power over the classes' pixel shares f: Eigen & Fergus's median-frequency
    balancing, softened by its square root (power 0.5) as the README's recipes do. The median is over the classes
    that have pixels; a class without pixels gets weight 0 (it cannot be learned from this data, and the data
    report says so)."""
    present = sorted(f for f in shares if f > 0)
    if not present:
        raise DatasetError("no labelled pixels in the training masks; --class-weights auto has nothing to balance")
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return tuple((median / f) ** power if f > 0 else 0.0 for f in shares)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def report_warnings(
    splits: dict[str, SplitStats], *, class_names: tuple[str, ...], ignore_index: int = 255,
    sparse_labels: bool = False, value_hint: str | None = None,
) -> list[DataWarning]:
    """The warnings of a report, worst first; each names the fix in flags. `sparse_labels`: the dataset's ignored
    pixels are unlabelled ground (an ArcGIS export's NoData), so a large share of them is not a sign of masks read
    wrong. `value_hint` replaces the --label-map advice for stored values that are no class."""
    out: list[DataWarning] = []
    k = len(class_names)
    for name, st in splits.items():
        if st.unreadable:
            out.append(DataWarning(
                f"{name}: {len(st.unreadable)} sample(s) cannot be read, e.g. {st.unreadable[0]}", stop=True))
        if st.size_mismatches:
            out.append(DataWarning(
                f"{name}: {len(st.size_mismatches)} mask(s) differ in size from their image, e.g. "
                f"{st.size_mismatches[0]}; each mask must label its image pixel for pixel (check --mask-dir and "
                "--mask-suffix)", stop=True))
        if st.invalid_values:
            values = sorted(st.stored_values)
            hint = (f"if the {k} stored values are the classes in order, add --label-map "
                    + ",".join(f"{v}:{i}" for i, v in enumerate(values)) if len(values) == k else
                    "map them with --label-map STORED:CLASS,... (STORED:ignore for void)")
            if value_hint is not None:
                out.append(DataWarning(
                    f"{name}: masks store values {describe_values(np.array(sorted(st.invalid_values)))} that are no "
                    f"class ({sum(st.invalid_values.values())} pixels); {value_hint}", stop=True))
                continue
            out.append(DataWarning(
                f"{name}: masks store values {describe_values(np.array(sorted(st.invalid_values)))} that are not "
                f"classes 0..{k - 1} or {ignore_index} (ignore) ({sum(st.invalid_values.values())} pixels); {hint}; "
                "if the masks are colour images, pass --palette", stop=True))
    train = splits.get("train") or next(iter(splits.values()))
    labelled = train.labelled_pixels
    values = sorted(train.stored_values)
    empty = [class_names[c] for c in range(k) if train.class_pixels[c] == 0]
    ignored_share = train.ignore_pixels / labelled if labelled else 0.0
    suggests_map = bool(empty) and ignore_index in values and len(values) == k and value_hint is None
    if sparse_labels:
        if ignored_share > 0.5:
            out.append(DataWarning(
                f"{_pct(train.ignore_pixels, labelled)} of the {train.split} label pixels are NoData (ignored); only "
                "the labelled rest trains the model", stop=False))
    elif suggests_map:
        listed = " and ".join(str(v) for v in values) if len(values) == 2 else describe_values(np.array(values))
        mapping = ",".join(f"{v}:{i}" for i, v in enumerate(values))
        out.append(DataWarning(
            f"the masks store only the values {listed}; {ignore_index} is the ignore label, so "
            f"{_pct(train.ignore_pixels, labelled)} of the pixels are ignored and class(es) {', '.join(empty)} get "
            f"none. If {ignore_index} marks a class (e.g. black/white masks), add --label-map {mapping}", stop=True))
    elif ignored_share > 0.5:
        out.append(DataWarning(
            f"{_pct(train.ignore_pixels, labelled)} of the labelled pixels of the {train.split} masks are the ignore "
            f"label {ignore_index}; if that value marks a class, map it with --label-map (e.g. "
            f"--label-map {ignore_index}:{k - 1})", stop=True))
    if empty and not suggests_map and not train.invalid_values and train.masks_read:
        complete = train.masks_read == train.images
        fix = value_hint if value_hint is not None else (
            "check --classes (or classes.txt) and --label-map against the stored values "
            + (describe_values(np.array(values)) if values else "(colour masks)"))
        out.append(DataWarning(
            f"class(es) {', '.join(empty)} have no pixels in the {train.masks_read} {train.split} masks read"
            + ("" if complete else f" (of {train.images})") + f"; {fix}", stop=complete))
    # One-value masks happen (an image of background only); every mask of every split being one is a wrong folder.
    every = all(len(st.single_value_masks) == st.masks_read > 0 for st in splits.values())
    for name, st in splits.items():
        if st.single_value_masks:
            out.append(DataWarning(
                f"{name}: {len(st.single_value_masks)} of {st.masks_read} masks hold a single value "
                f"(e.g. {', '.join(st.single_value_masks[:3])})"
                + ("; every mask is one value: check --mask-dir and --mask-suffix" if every else ""), stop=every))
    return out


def format_report(report: dict[str, Any], *, title: str) -> str:
    """The report as text lines for a terminal."""
    names = report["classes"]
    lines = [f"data: {title}, {len(names)} classes"]
    for split, st in report["splits"].items():
        labelled = sum(st["class_pixels"]) + st["ignore_pixels"]
        read = "" if st["masks_read"] == st["images"] else f", masks read: {st['masks_read']} evenly spaced"
        lines.append(f"  {split}: {st['images']} images from {st['source']}{read}")
        sizes = ", ".join(f"{s} ({n})" for s, n in list(st["image_sizes"].items())[:4])
        more = f", ... ({len(st['image_sizes'])} sizes)" if len(st["image_sizes"]) > 4 else ""
        modes = ", ".join(f"{_MODE_WORDS.get(m, m)} ({n})" for m, n in st["image_modes"].items())
        lines.append(f"    image sizes {sizes}{more}; modes {modes}")
        if st["stored_values"]:
            total = sum(st["stored_values"].values())
            shown = ", ".join(f"{v} ({_pct(c, total)})" for v, c in list(st["stored_values"].items())[:12])
            more = f", ... ({len(st['stored_values'])} values)" if len(st["stored_values"]) > 12 else ""
            lines.append(f"    stored mask values: {shown}{more}")
        share = ", ".join(f"{n} {_pct(c, labelled)}" for n, c in zip(names, st["class_pixels"]))
        lines.append(f"    pixels: {share}, ignore {_pct(st['ignore_pixels'], labelled)}")
        if st.get("band_stats"):
            b = st["band_stats"]
            lines.append(f"    {b['bands']} bands ({b['dtype']}): mean {', '.join(f'{v:.4g}' for v in b['mean'])}; "
                         f"std {', '.join(f'{v:.4g}' for v in b['std'])}")
    for w in report["warnings"]:
        lines.append(f"{'error' if w['stop'] else 'warning'}: {w['message']}")
    return "\n".join(lines)
