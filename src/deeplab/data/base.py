"""What every dataset shares: loading, label mapping, validation, bad-sample handling, seeding.

A sample is a pure function of ``(seed, epoch, index)``: ``__getitem__`` hands the transform
``np.random.default_rng([seed, epoch, index])``, so resuming training at an epoch reproduces
the exact crops and flips. ``set_epoch`` must be called in the process that owns the dataset
before each epoch; DataLoader workers started afresh each epoch (the default,
``persistent_workers=False``) see the new epoch, persistent workers do not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .palettes import Palette
from .transforms import EvalTransform

IGNORE_INDEX = 255

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class DatasetError(ValueError):
    """A dataset file or layout problem; the message names the file, the value and the fix."""


# PIL modes of one-channel images wider than 8 bits; PIL's convert("RGB") would clip them at 255.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL image.

    Grayscale repeats its channel; RGBA and LA drop alpha (no compositing: the colours as stored); palette images
    take their colours. 16-bit (and 32-bit integer) grayscale is scaled to 8 bits as value / 257, which maps the
    full 0..65535 range onto 0..255 (PIL's own conversion clips every value above 255). Float images are read as
    0..1 when no value exceeds 1, else as 0..255, and clipped.
    """
    if im.mode in WIDE_GREY_MODES:
        arr = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            scaled = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        else:
            scaled = arr / 257.0
        grey = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB (see `image_to_rgb`); raises DatasetError for a missing, unreadable or truncated file."""
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found; check the dataset root and split list")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not inside a transform
            return image_to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path}: cannot decode image ({exc}); re-download or remove the file, "
            "or pass --skip-bad to skip bad samples"
        ) from exc


def read_mask_file(path: Path) -> Image.Image:
    """The decoded mask image, any mode; raises DatasetError if missing or unreadable."""
    if not path.is_file():
        raise DatasetError(
            f"{path}: mask file not found; every image needs a mask with the matching name "
            "(or pass --skip-bad to skip images without one)"
        )
    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path}: cannot decode mask ({exc}); re-download or remove the file, "
            "or pass --skip-bad to skip bad samples"
        ) from exc


def index_values(im: Image.Image, path: Path) -> np.ndarray:
    """The stored label values of an index mask ('P', 'L', 16/32-bit grey), as int64 (H, W).

    A 'P' PNG's values are its palette indices (the VOC convention), not its colours. An RGB
    mask is accepted only when it is grey (R == G == B), as some tools save index masks that way.
    """
    if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            if not np.all(arr == np.round(arr)):
                raise DatasetError(f"{path}: mask holds non-integer values; masks must store integer labels")
        return arr.astype(np.int64)
    if im.mode in ("RGB", "RGBA"):
        arr = np.asarray(im.convert("RGB"))
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            return arr[..., 0].astype(np.int64)
        raise DatasetError(
            f"{path}: mask is a colour ({im.mode}) image, but this dataset expects label indices "
            "stored as a single-channel or palette PNG; use the index masks (e.g. Cityscapes "
            "*_labelIds.png, VOC SegmentationClass 'P' PNGs), or the 'folder' dataset with a palette"
        )
    raise DatasetError(f"{path}: unsupported mask mode {im.mode!r}; save masks as 8-bit 'L' or 'P' PNGs")


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry raw-value -> label table; raw values not in ``mapping`` are invalid (-1)."""
    lut = np.full(256, -1, dtype=np.int16)
    for raw, label in mapping.items():
        lut[raw] = label
    return lut


def describe_values(values: np.ndarray, limit: int = 8) -> str:
    values = np.unique(values)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


class SegmentationDataset(Dataset):
    """Base class: subclasses fill ``files``, ``class_names``, ``palette`` and ``label_lut``.

    ``load(i)`` returns the raw pair (image (H, W, 3) uint8, mask (H, W) uint8 after label
    mapping, values in ``[0, num_classes)`` or ``ignore_index``), validated; ``__getitem__(i)``
    applies ``transform(image, mask, rng)`` and returns ``(image (3, H, W) float32, mask (H, W)
    int64)``. With ``transform=None`` the pair is only normalized with the ImageNet statistics.

    With ``skip_bad=True`` a bad sample is warned about, recorded in ``bad_files`` and replaced
    by the next good index (wrapping around), which is deterministic because badness is a
    property of the files. The record is per process: DataLoader workers keep their own.
    """

    class_names: tuple[str, ...] = ()
    palette: Palette
    ignore_index: int = IGNORE_INDEX
    # Raw stored value -> label (int16, -1 = invalid value); subclasses set it.
    label_lut: np.ndarray

    def __init__(
        self,
        *,
        files: list[tuple[Path, Path]],
        transform: Transform | None,
        seed: int,
        skip_bad: bool,
        description: str,
    ) -> None:
        if not files:
            raise DatasetError(f"{description}: the split is empty (no image/mask pairs found); {self._empty_hint()}")
        self.files: list[tuple[Path, Path]] = files
        self.transform: Transform = transform if transform is not None else EvalTransform()
        self.seed = int(seed)
        self.skip_bad = bool(skip_bad)
        self.epoch = 0
        self.description = description
        # index -> reason, for samples found bad in this process (only filled with skip_bad).
        self._bad: dict[int, str] = {}

    def _empty_hint(self) -> str:
        return "check the root folder and the split name"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bad_count(self) -> int:
        return len(self._bad)

    @property
    def bad_files(self) -> list[tuple[Path, str]]:
        """(image path, reason) of every sample skipped so far in this process."""
        return [(self.files[i][0], self._bad[i]) for i in sorted(self._bad)]

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} samples, {self.num_classes} classes)"

    # -- loading ---------------------------------------------------------------------------

    def load_image(self, path: Path) -> np.ndarray:
        """The image at `path` as (H, W, C); the default reads photos as (H, W, 3) uint8 RGB (`read_image`)."""
        return read_image(path)

    def stored_values(self, path: Path) -> np.ndarray | None:
        """The mask's values as stored, before label mapping ((H, W) int64), or None for a colour mask."""
        return index_values(read_mask_file(path), path)

    def read_mask(self, path: Path) -> np.ndarray:
        """Raw mask -> labels (uint8). The default reads an index mask through ``label_lut``."""
        raw = index_values(read_mask_file(path), path)
        return self.map_labels(raw, path)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        out_of_table = (raw < 0) | (raw > 255)
        if out_of_table.any():
            raise DatasetError(self._bad_label_message(path, raw[out_of_table]))
        mapped = self.label_lut[raw.astype(np.intp)]
        invalid = mapped < 0
        if invalid.any():
            raise DatasetError(self._bad_label_message(path, raw[invalid]))
        return mapped.astype(np.uint8)

    def _bad_label_message(self, path: Path, values: np.ndarray) -> str:
        return (
            f"{path}: label value(s) {describe_values(values)} are not valid for "
            f"{type(self).__name__} ({self.num_classes} classes, ignore label {self.ignore_index}); "
            f"{self._label_hint()} Or pass --skip-bad to skip such samples."
        )

    def _label_hint(self) -> str:
        return "check that the masks store class indices, not colours."

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The validated raw pair for ``index``; raises DatasetError naming the bad file."""
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} samples")
        image_path, mask_path = self.files[index]
        image = self.load_image(image_path)
        mask = self.read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from its image "
                f"{image_path} {image.shape[1]}x{image.shape[0]}; masks must be pixel-aligned with their "
                "images, so fix or remove the pair (or pass --skip-bad)"
            )
        return image, mask

    def _load_or_skip(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Load ``index``, or with ``skip_bad`` the next good sample after it (wrapping)."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                image, mask = self.load(j)
                return j, image, mask
            except DatasetError as exc:
                if not self.skip_bad:
                    raise
                self._mark_bad(j, str(exc))
        raise DatasetError(f"{self.description}: every one of the {n} samples is bad; see the warnings above")

    def _mark_bad(self, index: int, reason: str) -> None:
        if index not in self._bad:
            self._bad[index] = reason
            warnings.warn(f"skipping bad sample {index}: {reason}", stacklevel=3)

    def item_or_none(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Sample `index` as `__getitem__` gives it, or None when it is bad and `skip_bad` is on (recorded in
        `bad_files`). Never a substitute: evaluation counts every good image once and no bad one."""
        if index in self._bad:
            return None
        try:
            image, mask = self.load(index)
        except DatasetError as exc:
            if not self.skip_bad:
                raise
            self._mark_bad(index, str(exc))
            return None
        return self.transform(image, mask, self.rng_for(index))

    def rng_for(self, index: int) -> np.random.Generator:
        """The augmentation generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        _, image, mask = self._load_or_skip(index)
        # The rng follows the requested index, not the substitute, so a skipped sample does
        # not make its neighbour's augmentation appear twice.
        return self.transform(image, mask, self.rng_for(index))

    def validate(self, *, progress: bool = False) -> list[tuple[Path, str]]:
        """Load every sample; return ``(image path, reason)`` for each bad one.

        Without ``skip_bad`` any bad sample raises a DatasetError listing them all (up to 10);
        with it, bad samples are recorded (and later skipped without re-reading) and returned.
        """
        indices = range(len(self.files))
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"validating {self.description}", unit="sample")
        problems: list[tuple[int, str]] = []
        for i in indices:
            if i in self._bad:
                problems.append((i, self._bad[i]))
                continue
            try:
                self.load(i)
            except DatasetError as exc:
                problems.append((i, str(exc)))
                if self.skip_bad:
                    self._mark_bad(i, str(exc))
        if problems and not self.skip_bad:
            listed = "\n  ".join(reason for _, reason in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DatasetError(
                f"{self.description}: {len(problems)} of {len(self.files)} samples are bad:\n  {listed}{more}\n"
                "Fix or remove them, or pass --skip-bad to skip them."
            )
        return [(self.files[i][0], reason) for i, reason in problems]


def held_out_stems(stems: Sequence[str], *, fraction: float, seed: int) -> set[str]:
    """The validation stems of a folder without split lists: round(fraction * n) of them (at least 1, at most n - 1).

    Stems are ordered by a hash of (seed, stem), so the choice depends on the names and the seed only: not on the
    listing order, and an image added later does not move the others between the splits.
    """
    import hashlib

    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction {fraction:g}: must be between 0 and 1 (e.g. 0.2)")
    if len(stems) < 2:
        raise DatasetError(
            f"{len(stems)} image(s): too few to hold out a validation split; add images or write splits/val.txt"
        )
    k = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    order = sorted(stems, key=lambda s: hashlib.sha256(f"{seed}/{s}".encode()).hexdigest())
    return set(order[:k])
